r"""Next-item ranking of a pretrained user encoder against the popularity baseline.

  python -m user_llm.encoder_eval --gin_file=experiments/encoder_pretrain.gin \
      --gin_file=datasets/movielens.gin --gin.MODEL_DIR=\"runs/encoder\" \
      [--split=test] [--k=10] [--pooling=last]

Reads the run's own gin files (the same ones it trained with), restores the newest checkpoint
in MODEL_DIR and, for every user of the split, ranks all items for the interaction after the
history (the held-out last item for ``test``). Items already in the history, padding and the
out-of-vocabulary id are not recommended. Prints one JSON line: Recall@k and NDCG@k with 95%
bootstrap intervals, for the encoder and for popularity (counts in the training split).

``--pooling=mean`` scores the mean of the encoder's states instead of its last one: a
diagnostic of what a reader that cannot tell the states apart could reach (an AR encoder only).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import flags

from user_llm import metrics
from user_llm.data import pipeline
from user_llm.user_encoder import split_last_interaction

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Flags of the entry point only, so importing this module defines none."""
    flags.DEFINE_string("split", "test", "Split to evaluate (its last interaction is the target).")
    flags.DEFINE_integer("k", 10, "Cut-off for Recall@k and NDCG@k.")
    flags.DEFINE_enum(
        "pooling", "last", ["last", "mean"], "Encoder states the head scores (AR encoder)."
    )


def _batches(cfg: pipeline.DatasetConfig, split: str):
    eval_cfg = pipeline.DatasetConfig(
        **{**cfg.__dict__, "split": split, "shuffle": False, "pack": False}
    )
    ds = pipeline.get_dataset(eval_cfg, num_epochs=1, drop_remainder=False)
    yield from pipeline.numpy_batches(ds)


def evaluate(
    model: Any,
    params: Any,
    dataset_cfg: pipeline.DatasetConfig,
    split: str = "test",
    k: int = 10,
    item_feature: str = "user_item_ids",
    mask_feature: str = "user_mask",
    pooling: str = "last",
) -> dict[str, Any]:
    """Per-example ranks for the encoder and popularity, summarized with bootstrap CIs."""
    train_items = [b[item_feature] * b[mask_feature] for b in _batches(dataset_cfg, "train")]
    score_fn = jax.jit(
        lambda p, b: model.score_next_items(p, b, item_feature=item_feature, pooling=pooling)
    )
    encoder_ranks, popularity_ranks = [], []
    popularity = None
    for batch in _batches(dataset_cfg, split):
        history, last = split_last_interaction(batch, mask_feature)
        history = {k_: np.asarray(v) for k_, v in history.items()}
        last = np.asarray(last)
        has_history = history[mask_feature].sum(axis=1) > 0
        targets = batch[item_feature][np.arange(len(last)), last]
        scores = np.asarray(score_fn(params, history))
        num_items = scores.shape[1]
        if popularity is None:
            popularity = metrics.popularity_scores(train_items, num_items)
        exclude = np.zeros((len(targets), num_items), bool)
        rows = np.repeat(np.arange(len(targets)), history[item_feature].shape[1])
        exclude[rows, (history[item_feature] * history[mask_feature]).ravel()] = True
        exclude[:, :2] = True  # padding and out-of-vocabulary ids
        keep = has_history & (targets > 1)  # an OOV target cannot be ranked by any model
        encoder_ranks.append(metrics.target_ranks(scores, targets, exclude)[keep])
        pop = np.broadcast_to(popularity, scores.shape)
        popularity_ranks.append(metrics.target_ranks(pop, targets, exclude)[keep])
    result: dict[str, Any] = {"split": split, "k": k, "pooling": pooling}
    for name, ranks in (("encoder", encoder_ranks), ("popularity", popularity_ranks)):
        ranks = np.concatenate(ranks)
        for metric, fn in (("recall", metrics.recall_at_k), ("ndcg", metrics.ndcg_at_k)):
            point, low, high = metrics.bootstrap_ci(fn(ranks, k))
            result[f"{name}_{metric}@{k}"] = point
            result[f"{name}_{metric}@{k}_ci95"] = [low, high]
        result["num_examples"] = int(len(ranks))
    return result


def main(argv: Sequence[str]) -> None:
    from user_llm import trained_run

    del argv
    # The run's own gin files say which model, task and MODEL_DIR: evaluate with them.
    run = trained_run.load()
    result = evaluate(
        run.model, run.params, run.dataset, FLAGS.split, FLAGS.k, pooling=FLAGS.pooling
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    from user_llm import gin_utils

    _define_flags()
    gin_utils.run_main(main)
