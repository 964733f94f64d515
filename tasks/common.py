"""SeqIO registration of the User-LLM tasks of every dataset family; only that.

Task names: ``{dataset}_{task}_{form}_h{history_length}{suffix}``, e.g.
``movielens_next_item_userllm_h50``, ``movielens_next_item_tp_h50``,
``amazon_reviews_review_gen_userllm_h20``, and ``{dataset}_encoder_pretrain_h{L}{suffix}``.

Where the data is, and the examples built from it once per process, are
``user_llm.data.families``: a task's source reads them lazily, so registering never touches
the disk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from user_llm import metrics
from user_llm.data import families
from user_llm.data import features as F
from user_llm.data.families import (
    EmptyTaskError,
    Family,
    examples,
    family_task_data,
    resolve_data_dir,
    task_name,
)
from user_llm.data.histories import SPLITS
from user_llm.feature_names import ITEM_TARGET

# Both candidate sets of every text task (features.py): popularity-sampled, then uniform.
CANDIDATE_FEATURES = tuple(
    prefix + key for prefix in F.CANDIDATE_PREFIXES.values() for key in F.CANDIDATE_KEYS
)


def _dataset_fn(family: Family, history_length: int, task: str, form: str) -> Callable:
    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # one in-memory "file"; the task's shuffle buffer shuffles
        ex = examples(family, history_length, task, form, split)
        if not len(next(iter(ex.values()))):
            raise EmptyTaskError(
                f"{task_name(family.name, family.task_label(task), form, history_length)}: no "
                f"{split} examples in {resolve_data_dir(family) or 'the bundled data'}. A user "
                f"needs at least {family.min_interactions} usable interactions (a known item; "
                "for favourite-category tasks items with categories, which Amazon reads from "
                "meta_<Category> files beside the reviews; without any metadata, next-item "
                "tasks use item ids as titles)."
            )
        return in_memory_dataset(ex)

    return dataset_fn


def in_memory_dataset(examples: dict[str, np.ndarray]) -> tf.data.Dataset:
    """numpy examples (strings as object arrays) -> a tf.data dataset of one example each."""
    return tf.data.Dataset.from_tensor_slices(
        {k: tf.constant(v.tolist() if v.dtype == object else v) for k, v in examples.items()}
    )


def int_feature(rank: int) -> seqio.Feature:
    """A non-text int32 feature (user arrays, candidates): passed through untokenized."""
    return seqio.Feature(
        vocabulary=seqio.PassThroughVocabulary(1),
        add_eos=False,
        dtype=tf.int32,
        rank=rank,
        required=False,
    )


def user_output_features() -> dict[str, seqio.Feature]:
    return {k: int_feature(2 if k == "user_genres" else 1) for k in F.ENCODER_FEATURES}


def tokenize_text(dataset: tf.data.Dataset, output_features) -> tf.data.Dataset:
    """``seqio.preprocessors.tokenize`` on the text features only, so int arrays do not get
    ``*_pretokenized`` copies (a ``user_*_pretokenized`` key would look like a user feature)."""
    text = {
        k: v
        for k, v in output_features.items()
        if not isinstance(v.vocabulary, seqio.PassThroughVocabulary)
    }
    return seqio.preprocessors.tokenize(dataset, text)


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """What a registered task name stands for (evaluation looks up titles and genres here)."""

    family: Family
    history_length: int
    task: str  # "next_item" | "favorite_genre" | "review_gen" | "encoder_pretrain"
    form: str | None  # "userllm" | "tp" | "hybrid" | None (encoder pretraining)


class UserLLMTask(seqio.Task):
    """A ``seqio.Task`` of a built-in family that also says what it is (``info``): evaluation
    reads the task kind (candidates to rank, genre names, review texts) from the task itself,
    as T5X reads ``metric_fns``; there is no second registry."""

    def __init__(self, name: str, *args: Any, info: TaskInfo, **kwargs: Any) -> None:
        super().__init__(name, *args, **kwargs)
        self.info = info


def _registered(name: str) -> seqio.Task | None:
    return seqio.TaskRegistry.get(name) if name in seqio.TaskRegistry.names() else None


def is_user_llm_task(name: str) -> bool:
    """Whether ``name`` is one of the built-in User-LLM tasks (candidates, genres, reviews);
    any other registered SeqIO task is evaluated with its own ``metric_fns``."""
    return isinstance(_registered(name), UserLLMTask)


def user_llm_tasks() -> dict[str, TaskInfo]:
    """{name: info} of every registered built-in User-LLM task."""
    return {
        n: t.info
        for n in seqio.TaskRegistry.names()
        if isinstance(t := seqio.TaskRegistry.get(n), UserLLMTask)
    }


def task_info(name: str) -> TaskInfo:
    """The ``TaskInfo`` of a registered User-LLM task (a clear error for anything else)."""
    task = _registered(name)
    if not isinstance(task, UserLLMTask):
        raise ValueError(
            f"{name!r} is not one of the built-in User-LLM tasks (next item, favorite "
            "genre/category, review generation); a task of your own is evaluated with its own "
            f"metric_fns. Built-in: {sorted(user_llm_tasks())[:20]}..."
        )
    return task.info


def item_titles(name: str) -> np.ndarray:
    """Titles by ``item_index`` (what ``candidate_item_index`` points at) for a task."""
    info = task_info(name)
    return family_task_data(info.family, info.history_length).histories.item_titles


def genre_names(name: str) -> np.ndarray:
    """Every genre / category name of a task's dataset (the answers favorite-genre ranks)."""
    info = task_info(name)
    tokens = family_task_data(info.family, info.history_length).histories.vocabularies["genre"]
    return np.asarray(tokens.tokens[2:], dtype=object)  # ids 0 and 1: padding and unknown


def item_popularity(name: str) -> np.ndarray:
    """Interactions per ``item_index`` in the training histories (the popularity baseline)."""
    info = task_info(name)
    h = family_task_data(info.family, info.history_length).histories
    train = h.splits["train"]
    idx = np.asarray(train["user_item_index"])[np.asarray(train["user_mask"], bool)]
    return np.bincount(idx.ravel(), minlength=len(h.item_titles)).astype(np.float64)


def encoder_feature_sizes(dataset: str, history_length: int, kind: str) -> dict[str, int]:
    """The encoder's vocabulary sizes by feature, as the ``config.gin`` of runs made before the
    sizes became macros (``user_llm.data.feature_sizes``) calls it; new gin files use the
    macros. kind: "categorical" or "multivalued"."""
    sizes = families.feature_sizes(families.by_name(dataset), history_length)
    return {"categorical": sizes.categorical, "multivalued": sizes.multivalued}[kind]()


def register_family(
    family: Family,
    vocabulary: seqio.Vocabulary | None = None,
    name_suffix: str = "",
    history_lengths: Sequence[int] | None = None,
    source: Callable[[int, str, str], tuple[seqio.DataSource, list[Callable]]] | None = None,
) -> list[str]:
    """Registers every task of ``family`` (both forms, each history length); returns names.

    ``source(history_length, task, form)``: (data source, preprocessors that turn its elements
    into the task's examples) instead of the in-memory histories (the TFDS-backed tasks of
    ``tasks/tfds_tasks.py``). Re-registering an existing name is a no-op, so importing twice
    is harmless.
    """
    families.register(family)
    vocabulary = vocabulary or seqio.ByteVocabulary()
    text = {
        "inputs": seqio.Feature(vocabulary, add_eos=True),
        "targets": seqio.Feature(vocabulary, add_eos=True),
    }
    # Everything before the placeholder can be cached offline with SeqIO's Beam pipeline
    # (seqio.scripts.cache_tasks_main); EOS is appended after, as sequence lengths require.
    text_preprocessors = [
        tokenize_text,
        seqio.CacheDatasetPlaceholder(),
        seqio.preprocessors.append_eos_after_trim,
    ]
    names = []
    for length in history_lengths or family.history_lengths:
        for task in family.tasks:
            forms = (None,) if task == "encoder_pretrain" else F.FORMS
            for form in forms:
                name = task_name(family.name, family.task_label(task), form, length, name_suffix)
                names.append(name)
                if name in seqio.TaskRegistry.names():
                    continue
                if task == "encoder_pretrain":
                    output_features = user_output_features()
                    preprocessors = [seqio.CacheDatasetPlaceholder()]
                else:
                    output_features = dict(text)
                    if form in ("userllm", "hybrid"):
                        output_features.update(user_output_features())
                    # Every text task carries its next-item candidate sets and the item
                    # head's target (features.py).
                    output_features.update(
                        {
                            k: int_feature(0 if k.endswith("label") else 1)
                            for k in CANDIDATE_FEATURES
                        }
                    )
                    output_features[ITEM_TARGET] = int_feature(0)
                    preprocessors = list(text_preprocessors)
                if source is None:
                    data_source = seqio.FunctionDataSource(
                        _dataset_fn(family, length, task, form or ""), splits=SPLITS
                    )
                else:
                    data_source, to_examples = source(length, task, form or "")
                    preprocessors = [*to_examples, *preprocessors]
                seqio.TaskRegistry.add(
                    name,
                    task_cls=UserLLMTask,
                    info=TaskInfo(family, length, task, form),
                    source=data_source,
                    preprocessors=preprocessors,
                    output_features=output_features,
                    metric_fns=[metrics.exact_match]
                    if task in ("next_item", "favorite_genre")
                    else [],
                )
    return names
