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
from absl import logging

from user_llm import errors
from user_llm.data import feature_sizes as FS
from user_llm.data import features as F
from user_llm.data.histories import Histories, HistoryConfig
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


MOVIELENS = Family(
    name="movielens",
    env_var="USER_LLM_MOVIELENS_DIR",
    default_dir=None,
    text=F.DatasetText(item_noun="movie", genre_noun="genre", action="watch"),
    tasks=("next_item", "favorite_genre", "encoder_pretrain"),
)
AMAZON_REVIEWS = Family(
    name="amazon_reviews",
    env_var="USER_LLM_AMAZON_DIR",
    default_dir="../shared/data/amazon_reviews_2023",
    text=F.DatasetText(item_noun="product", genre_noun="category", action="review"),
    tasks=("next_item", "favorite_genre", "review_gen", "encoder_pretrain"),
    favorite_name="favorite_category",
)
GOOGLE_LOCAL = Family(
    name="google_local",
    env_var="USER_LLM_GOOGLE_LOCAL_DIR",
    default_dir=None,
    text=F.DatasetText(item_noun="place", genre_noun="category", action="review"),
    tasks=("next_item", "favorite_genre", "review_gen", "encoder_pretrain"),
    favorite_name="favorite_category",
)
# Every family by name: the built-in ones, and each one ``tasks.common.register_family``
# registers (a researcher's own).
BUILT_IN = {f.name: f for f in (MOVIELENS, AMAZON_REVIEWS, GOOGLE_LOCAL)}
_FAMILIES: dict[str, Family] = dict(BUILT_IN)


def register(family: Family) -> None:
    """Makes ``family`` known by name (``by_name``); a different family under a taken name is
    refused."""
    known = _FAMILIES.setdefault(family.name, family)
    if known != family:
        raise ValueError(f"another dataset family is already named {family.name!r}: {known}")


def by_name(name: str) -> Family:
    """The family called ``name`` (built-in, or registered by its tasks module)."""
    if name not in _FAMILIES:
        raise errors.ConfigError(
            f"Unknown dataset {name!r}; known: {sorted(_FAMILIES)} (a family of your own is "
            "known once its tasks module, given with --module_import, registers it)"
        )
    return _FAMILIES[name]


def task_name(
    dataset: str,
    task: str | None,
    form: str | None = None,
    history_length: int = 50,
    suffix: str = "",
) -> str:
    """``{dataset}_{task}_{form}_h{L}{suffix}``: a task's registered name (no form for encoder
    pretraining; no task for a form's mixture, ``{dataset}_{form}_h{L}{suffix}``).

    A dataset-free experiment file names its task with it, from the dataset overlay's
    ``DATASET`` and its own ``HISTORY_LENGTH``: ``MIXTURE_OR_TASK_NAME = @families.task_name()``.
    """
    parts = [dataset] + [p for p in (task, form) if p] + [f"h{history_length}"]
    return "_".join(parts) + suffix


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
    """Reads the dataset and builds its histories once per process (several tasks share it),
    and writes their feature sizes (``feature_sizes``) with them."""
    data = build_task_data(dataset, data_dir, config, lenient)
    FS.write_for_histories(data.histories, dataset, data_dir, lenient)
    return data


def family_task_data(family: Family, history_length: int) -> TaskData:
    """The family's ``TaskData`` at ``history_length``, from the data folder set now."""
    return _family_task_data(family, resolve_data_dir(family), data_settings()[1], history_length)


def family_histories(family: Family | str, history_length: int) -> Histories:
    """The family's (or the named family's) histories at ``history_length``."""
    family = by_name(family) if isinstance(family, str) else family
    return family_task_data(family, history_length).histories


def _history_config(family: Family, history_length: int) -> HistoryConfig:
    return HistoryConfig(
        max_history_length=history_length, min_interactions=family.min_interactions
    )


def _family_task_data(
    family: Family, data_dir: str | None, lenient: bool, history_length: int
) -> TaskData:
    return task_data(family.name, data_dir, _history_config(family, history_length), lenient)


def feature_sizes_path(family: Family, history_length: int) -> Path:
    """Where the feature sizes of the family's data (as set now) at ``history_length`` are."""
    config = _history_config(family, history_length)
    return FS.sizes_path(family.name, resolve_data_dir(family), config, data_settings()[1])


def feature_sizes(family: Family, history_length: int) -> FS.FeatureSizes:
    """The encoder's vocabulary sizes for the family's data at ``history_length``: read from
    the JSON the histories' build wrote, else the histories are built (once per process; that
    writes the JSON for the next process)."""
    path = feature_sizes_path(family, history_length)
    if path.exists():
        return FS.read(path, family.name, history_length)
    logging.info("No feature sizes at %s yet: building the %s histories", path, family.name)
    return FS.FeatureSizes.from_histories(family_histories(family, history_length))


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
