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
from user_llm.data.histories import SPLITS, Histories, HistoryConfig, build_histories


@dataclasses.dataclass
class TaskData:
    """Histories plus what tasks need beyond them."""

    histories: Histories
    review_texts: dict[str, np.ndarray]  # split -> review text of each target interaction

    @functools.cached_property
    def negatives(self) -> dict[str, np.ndarray]:
        """{sampling: [num_users, NUM_NEGATIVES] negatives} for each candidate set."""
        return {s: F.user_negatives(self.histories, sampling=s) for s in F.NEGATIVE_SAMPLINGS}


def build_task_data(
    dataset: str,
    data_dir: str | None,
    config: HistoryConfig,
    lenient: bool = False,
    **reader_kw: Any,
) -> TaskData:
    """Reads ``dataset`` (``readers.load``, with ``reader_kw`` such as ``categories``) and
    builds its histories."""
    interactions, items, report = readers.load(dataset, data_dir, lenient=lenient, **reader_kw)
    if report.rows_skipped:  # in every training and eval log, so a loss is never silent
        logging.warning(
            "%s: read %d rows from %s, dropped %s", dataset, report.rows_read,
            data_dir or "the bundled data", report.rows_skipped,
        )  # fmt: skip
    h = build_histories(interactions, items, config)
    reviews = interactions["review_text"].to_numpy(dtype=object)
    review_texts = {s: reviews[h.target_rows[s]] for s in SPLITS}
    return TaskData(histories=h, review_texts=review_texts)
