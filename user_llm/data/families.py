"""Dataset families: where each one's files are, and its examples, built once per process.

A ``Family`` names a dataset, where its release files are (a gin setting, else an environment
variable, else a default) and which tasks it supports. Data is read lazily, the first time a
task split is built, so registering tasks never touches the disk, and a task whose files are
absent still registers but fails with a message naming the variable. Histories are built once
per (dataset, data_dir, history config) in this process and shared by every task that uses
them. ``tasks/`` registers SeqIO tasks over these examples and does nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import gin
import numpy as np

from user_llm import errors
from user_llm.data import features as F
from user_llm.data.histories import HistoryConfig
from user_llm.data.task_data import TaskData, build_task_data

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_HISTORY_LENGTHS = (20, 50, 100, 200)


@dataclasses.dataclass(frozen=True)
class Family:
    """A dataset family: where its files are and which tasks it supports."""

    name: str  # "movielens"; also the ``readers.load`` dataset name
    env_var: str
    default_dir: str | None  # None: the reader's own default (MovieLens: bundled archive)
    text: F.DatasetText
    tasks: tuple[str, ...]
    # Task-name spelling of favorite_genre (e.g. "favorite_category" for reviews datasets).
    favorite_name: str = "favorite_genre"
    history_lengths: tuple[int, ...] = DEFAULT_HISTORY_LENGTHS
    min_interactions: int = 5

    def task_label(self, task: str) -> str:
        return self.favorite_name if task == "favorite_genre" else task


class EmptyTaskError(errors.UserLLMError, ValueError):
    """A task split without a single example; the message names the task and why."""


class MissingDataError(FileNotFoundError):
    """A task's data files are absent; the message says which env var / files to provide."""


# The gin module stays "tasks" (``--gin.tasks.data_settings.lenient=True``), so the
# ``config.gin`` of earlier runs still parses.
@gin.configurable(module="tasks")
def data_settings(
    data_dirs: dict[str, str] | None = None, lenient: bool = False
) -> tuple[dict[str, str], bool]:
    """Where each family's release files are (``{"amazon_reviews": "/data/amazon"}``; a family
    not named falls back to its environment variable, then its default) and whether readers
    skip and count bad rows (``lenient``) instead of stopping at the first. Gin-configurable,
    so a run's ``config.gin`` records both."""
    return dict(data_dirs or {}), bool(lenient)


def resolve_data_dir(family: Family) -> str | None:
    """The family's data directory (gin ``data_settings``, else its env var, else default);
    raises if it does not exist."""
    value = data_settings()[0].get(family.name) or os.environ.get(family.env_var)
    value = value or family.default_dir
    if value is None:
        if family.name == "movielens":
            return None  # the bundled ml-latest-small
        raise MissingDataError(
            f"{family.name} tasks need data: set {family.env_var} to a folder of the release "
            "files (see user_llm/data/readers)."
        )
    path = Path(value)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    if not path.exists():
        raise MissingDataError(
            f"{family.name} data not found at {path}: set {family.env_var} to a folder holding "
            "the release files (see user_llm/data/readers)."
        )
    return str(path)


def data_available(family: Family) -> bool:
    """Whether the family's tasks can be built here (without reading the data)."""
    try:
        resolve_data_dir(family)
    except MissingDataError:
        return False
    return True


@functools.lru_cache(maxsize=8)
def task_data(
    dataset: str, data_dir: str | None, config: HistoryConfig, lenient: bool = False
) -> TaskData:
    """Reads the dataset and builds its histories once per process (several tasks share it)."""
    return build_task_data(dataset, data_dir, config, lenient)


def family_task_data(family: Family, history_length: int) -> TaskData:
    """The family's ``TaskData`` at ``history_length``, from the data folder set now."""
    return _family_task_data(family, resolve_data_dir(family), data_settings()[1], history_length)


def _family_task_data(
    family: Family, data_dir: str | None, lenient: bool, history_length: int
) -> TaskData:
    config = HistoryConfig(
        max_history_length=history_length, min_interactions=family.min_interactions
    )
    return task_data(family.name, data_dir, config, lenient)


@functools.lru_cache(maxsize=32)
def _examples(
    family: Family,
    data_dir: str | None,
    lenient: bool,
    history_length: int,
    task: str,
    form: str,
    split: str,
) -> dict[str, np.ndarray]:
    data = _family_task_data(family, data_dir, lenient, history_length)
    return F.task_examples(
        data.histories,
        split,
        task,
        form,
        family.text,
        review_texts=data.review_texts[split],
        negatives=data.negatives,
    )


def examples(
    family: Family, history_length: int, task: str, form: str, split: str
) -> dict[str, np.ndarray]:
    """The numpy examples of one task split (cached; used by sources, tests and eval)."""
    lenient = data_settings()[1]
    return _examples(family, resolve_data_dir(family), lenient, history_length, task, form, split)
