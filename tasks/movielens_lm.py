"""A language-modeling task over real text: ml-latest-small movie titles and genres.

It exists to prove the train loop on real data with no download (the archive is bundled with
the package). Byte-level vocabulary, so no tokenizer training is needed.

Registered: ``movielens_titles_lm`` (splits ``train`` and ``validation``, ~5% of movies held out
by id, so the split is stable across runs).
"""

from __future__ import annotations

import seqio
import tensorflow as tf

from user_llm.data import readers

TASK_NAME = "movielens_titles_lm"
VOCABULARY = seqio.ByteVocabulary()


def _movie_lines(split: str) -> list[str]:
    _, items, _ = readers.load("movielens")  # the bundled ml-latest-small
    held_out = items["item_id"].astype(int) % 20 == 0
    rows = items[held_out] if split == "validation" else items[~held_out]
    return [
        f"{title} | {', '.join(genres) if len(genres) else 'no genres'}"
        for title, genres in zip(rows["title"], rows["categories"], strict=True)
    ]


def _dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # One in-memory "file"; the task's shuffle buffer shuffles examples.
    return tf.data.Dataset.from_tensor_slices({"targets": _movie_lines(split)})


if TASK_NAME not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        TASK_NAME,
        source=seqio.FunctionDataSource(_dataset_fn, splits=("train", "validation")),
        preprocessors=[
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),  # cacheable offline with Beam
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features={"targets": seqio.Feature(VOCABULARY, add_eos=True)},
        metric_fns=[],
    )
