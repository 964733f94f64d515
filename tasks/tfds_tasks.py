"""SeqIO tasks that read the TFDS-built datasets (``user_llm.data.tfds_builders``).

Importing this module registers, for the bundled ml-latest-small and history lengths 20, 50,
100 and 200, every MovieLens task again with the suffix ``_tfds``
(``movielens_next_item_userllm_h50_tfds``, ...): the same examples as the reader-backed tasks
(tested), read through ``seqio.TfdsDataSource`` from ``$TFDS_DATA_DIR`` (TFDS's own setting;
default ``~/tensorflow_datasets``). Build the datasets first:

  tfds build --imports=user_llm.data.tfds_builders user_llm_movielens \\
      --config=ml-latest-small_h50

Another release, category or state: ``register_tfds_tasks(tasks.amazon_reviews.FAMILY,
"All_Beauty", data_dir, "_beauty_tfds")``.

Each task's first preprocessor reads its split (a few thousand windows) into memory and forms
the examples with ``features.task_examples``, the code the reader-backed tasks use, with the
candidate sets built into the dataset.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from tasks import common, movielens
from user_llm.data import families, tfds_builders
from user_llm.data import features as F
from user_llm.data.histories import Histories, HistoryConfig, Vocabulary


def tfds_name(family: families.Family, source: str, history_length: int) -> str:
    """``user_llm_{family}/{source}_h{L}:{version}``."""
    return f"user_llm_{family.name}/{source}_h{history_length}:{tfds_builders.VERSION}"


def _catalogue_histories(name: str, data_dir: str | None, history_length: int) -> Histories:
    """A ``Histories`` holding only the catalogue (titles, genre names) of a built dataset: what
    ``task_examples`` reads beyond an example's own fields."""
    meta = tfds.builder(name, data_dir=data_dir).info.metadata
    genres = np.asarray(meta["genre_tokens"], dtype=object)
    return Histories(
        config=HistoryConfig(max_history_length=history_length),
        splits={},
        vocabularies={"genre": Vocabulary(tokens=genres, counts=np.zeros(len(genres), np.int64))},
        user_ids=np.zeros(0, dtype=object),
        item_ids=np.asarray(meta["item_ids"], dtype=object),
        item_titles=np.asarray(meta["item_titles"], dtype=object),
        num_users_dropped=int(meta["num_users_dropped"]),
    )


def _read_split(dataset: tf.data.Dataset) -> dict[str, np.ndarray]:
    """Every element of a TFDS split as stacked numpy arrays (text decoded to str)."""
    rows = list(tfds.as_numpy(dataset))
    if not rows:
        raise families.EmptyTaskError("a TFDS split without examples")
    out = {}
    for key in rows[0]:
        values = np.stack([r[key] for r in rows])
        if values.dtype.kind in "SO":
            values = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(values)
        out[key] = values
    out["user_mask"] = out["user_mask"].astype(bool)
    return out


def _to_task_examples(
    family: families.Family, name: str, data_dir: str | None, length: int, task: str, form: str
) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
    def to_examples(dataset: tf.data.Dataset) -> tf.data.Dataset:
        h = _catalogue_histories(name, data_dir, length)
        h.splits["windows"] = _read_split(dataset)
        examples = F.task_examples(
            h,
            "windows",
            task,
            form,
            family.text,
            review_texts=h.splits["windows"]["review_text"],
        )
        return common.in_memory_dataset(examples)

    return to_examples


def register_tfds_tasks(
    family: families.Family, source: str, data_dir: str | None = None, suffix: str = "_tfds"
) -> list[str]:
    """Registers ``family``'s tasks over the TFDS datasets built from ``source``."""

    def tfds_source(length: int, task: str, form: str):
        name = tfds_name(family, source, length)
        data_source = seqio.TfdsDataSource(
            tfds_name=name,
            tfds_data_dir=data_dir,
            splits={s: s for s in common.SPLITS},
        )
        return data_source, [_to_task_examples(family, name, data_dir, length, task, form)]

    return common.register_family(family, name_suffix=suffix, source=tfds_source)


TASK_NAMES = register_tfds_tasks(
    movielens.FAMILY, "ml-latest-small", os.environ.get("TFDS_DATA_DIR")
)
