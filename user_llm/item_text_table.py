r"""Writes the frozen per-item text table of the title-feature user encoder.

  python -m user_llm.item_text_table --dataset=movielens --history_length=50 \
    --llm_checkpoint=runs/exp/movielens/smollm2 --output=runs/exp/movielens/item_titles_h50.npy

Row ``i`` belongs to item-vocabulary id ``i`` (what ``user_item_ids`` holds for that dataset and
history length): the mean of the LLM's own input token embeddings over the item's title tokens,
centred over items and scaled to unit RMS, so a fresh projection starts at the scale of the
other features. Pad, OOV and untitled items get zeros. The encoder gin
``models/user_encoder/item_titles.gin`` reads it (``ITEM_TEXT_TABLE``); why: see
``user_llm/user_encoder.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import app, flags

from user_llm import checkpoints
from user_llm.data import families
from user_llm.vocabularies import BPETokenizer

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Flags only when run as a program: importing ``build_table`` defines none (``--output``
    is also ``user_llm.evaluate``'s)."""
    flags.DEFINE_string("dataset", "movielens", "Built-in dataset family (tasks.<dataset>).")
    flags.DEFINE_integer("history_length", 50, "History length of the tasks (its vocabulary).")
    flags.DEFINE_string("llm_checkpoint", None, "An imported LLM (user_llm.import_checkpoint).")
    flags.DEFINE_string("output", None, "The .npy file to write.")


EMBEDDING = "token_embedder/embedding"


def title_vectors(titles: Sequence[str], tokenizer: BPETokenizer, embedding: np.ndarray):
    """[len(titles), D]: mean input embedding of each title's tokens, centred and scaled to
    unit RMS over the titled rows; zeros where the title is empty."""
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    out = np.zeros((len(titles), embedding.shape[1]), np.float64)
    titled = np.zeros(len(titles), bool)
    for i, ids in enumerate(tokenizer.encode_batch([str(t) for t in titles])):
        ids = [t for t in ids if t not in special]
        if str(titles[i]) and ids:
            out[i] = embedding[ids].mean(axis=0)
            titled[i] = True
    if titled.any():
        out[titled] -= out[titled].mean(axis=0)
        rms = np.sqrt(np.mean(np.square(out[titled]), axis=1, keepdims=True))
        out[titled] /= np.maximum(rms, 1e-6)
    return out.astype(np.float32)


def build_table(dataset: str, history_length: int, llm_checkpoint: str | Path) -> np.ndarray:
    """The table of ``dataset``'s item vocabulary at ``history_length`` (rows = vocabulary ids)."""
    histories = families.family_histories(dataset, history_length)
    params = checkpoints.read_params(llm_checkpoint)
    if EMBEDDING not in params:
        raise checkpoints.CheckpointError(
            f"{llm_checkpoint}: no {EMBEDDING} (an imported LLM checkpoint is needed)"
        )
    tokenizer = BPETokenizer.load(llm_checkpoint)
    return title_vectors(histories.vocabulary_titles(), tokenizer, params[EMBEDDING])


def main(argv: Sequence[str]) -> None:
    del argv
    if not FLAGS.llm_checkpoint or not FLAGS.output:
        raise app.UsageError("need --llm_checkpoint and --output")
    table = build_table(FLAGS.dataset, FLAGS.history_length, FLAGS.llm_checkpoint)
    out = Path(FLAGS.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npy")
    np.save(tmp, table)
    tmp.replace(out)  # a finished file or none: the experiment runner skips stages by it
    titled = int(np.any(table != 0, axis=1).sum())
    print(f"Wrote {out}: {table.shape[0]} rows ({titled} titled) x {table.shape[1]}")


if __name__ == "__main__":
    from user_llm import gin_utils

    _define_flags()
    gin_utils.run_main(main)
