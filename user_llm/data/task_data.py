"""A dataset read once and cut into histories, plus what tasks need beyond them.

``build_task_data`` is the one place a release's files become ``TaskData``: the SeqIO tasks
(through ``user_llm.data.families.task_data``, cached per process) and the TFDS builders
(``user_llm.data.tfds_builders``) both call it, so the two hold the same examples.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
from absl import logging

from user_llm.data import features as F
from user_llm.data import readers
from user_llm.data.histories import (
    SPLITS,
    Histories,
    HistoryConfig,
    HistoryTables,
    global_pass,
    histories_from_tables,
)


@dataclasses.dataclass
class TaskData:
    """Histories plus what tasks need beyond them."""

    histories: Histories
    review_texts: dict[str, np.ndarray]  # split -> review text of each target interaction

    @functools.cached_property
    def negatives(self) -> dict[str, np.ndarray]:
        """{sampling: [users of the histories, NUM_NEGATIVES] negatives} per candidate set."""
        return {s: F.user_negatives(self.histories, sampling=s) for s in F.NEGATIVE_SAMPLINGS}


def read_tables(
    dataset: str,
    data_dir: str | None,
    config: HistoryConfig,
    lenient: bool = False,
    **reader_kw: Any,
) -> tuple[HistoryTables, np.ndarray]:
    """Reads ``dataset`` (``readers.load``, with ``reader_kw`` such as ``categories``) and runs
    the global pass: (tables, the review text of every input row)."""
    interactions, items, report = readers.load(dataset, data_dir, lenient=lenient, **reader_kw)
    if report.rows_skipped:  # in every training and eval log, so a loss is never silent
        logging.warning(
            "%s: read %d rows from %s, dropped %s",
            dataset,
            report.rows_read,
            data_dir or "the bundled data",
            report.rows_skipped,
        )
    tables = global_pass(interactions, items, config)
    return tables, interactions["review_text"].to_numpy(dtype=object)


def task_data_from_tables(
    tables: HistoryTables, reviews: np.ndarray, splits: tuple[str, ...] = SPLITS
) -> TaskData:
    """The per-user pass (``histories_from_tables``) plus each target's review text
    (``reviews``: indexed like ``tables.rows.order``'s values)."""
    h = histories_from_tables(tables, splits)
    return TaskData(histories=h, review_texts={s: reviews[h.target_rows[s]] for s in h.splits})


def build_task_data(
    dataset: str,
    data_dir: str | None,
    config: HistoryConfig,
    lenient: bool = False,
    **reader_kw: Any,
) -> TaskData:
    """Reads ``dataset`` and builds its histories (``read_tables``, then every user at once)."""
    return task_data_from_tables(*read_tables(dataset, data_dir, config, lenient, **reader_kw))
