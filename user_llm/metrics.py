"""Ranking and generation metrics, with bootstrap confidence intervals (our eval sets are small).

Pure numpy: usable from eval scripts, SeqIO metric functions and tests alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

# Prefix of the metrics of User-LLM's item head (``item_head_recall@5``, ...): the same model's
# ranking in item space, next to its title-likelihood ranking of the same candidates.
ITEM_HEAD = "item_head_"


def target_ranks(scores: np.ndarray, targets: np.ndarray, exclude: np.ndarray | None = None):
    """0-based rank of each row's target among its scores (ties count against the target).

    scores: [n, V]; targets: [n] column indices; exclude: optional [n, V] bool of columns that
    cannot be recommended (e.g. items already in the history, padding ids) - never the target.
    """
    scores = np.asarray(scores, np.float64).copy()
    targets = np.asarray(targets)
    if exclude is not None:
        exclude = np.asarray(exclude, bool).copy()
        exclude[np.arange(len(targets)), targets] = False
        scores[exclude] = -np.inf
    target_scores = scores[np.arange(len(targets)), targets]
    return np.sum(scores >= target_scores[:, None], axis=1) - 1


def recall_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-example hit (1.0 / 0.0): one relevant item, so recall@k = hit rate@k."""
    return (np.asarray(ranks) < k).astype(np.float64)


def ndcg_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-example NDCG@k with one relevant item: 1 / log2(rank + 2) inside the top k."""
    ranks = np.asarray(ranks)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def bootstrap_ci(
    per_example: np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    num_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(point estimate, low, high) by the percentile bootstrap over examples."""
    values = np.asarray(per_example, np.float64)
    if values.size == 0:
        raise ValueError("bootstrap_ci needs at least one example")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), (num_samples, len(values)))
    stats = np.array([statistic(values[i]) for i in idx])
    alpha = (1 - confidence) / 2
    return (
        float(statistic(values)),
        float(np.quantile(stats, alpha)),
        float(np.quantile(stats, 1 - alpha)),
    )


def paired_bootstrap_ci(
    a: np.ndarray,
    b: np.ndarray,
    num_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(mean of a - b, low, high): the percentile bootstrap of the mean paired difference,
    resampling examples (both systems on the same resampled examples)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same shape, got {a.shape} and {b.shape}")
    return bootstrap_ci(a - b, num_samples=num_samples, confidence=confidence, seed=seed)


def popularity_scores(train_item_ids: Sequence[np.ndarray], num_items: int) -> np.ndarray:
    """Item scores [num_items] = interaction counts in the training data (id 0 = padding)."""
    counts = np.zeros(num_items, np.float64)
    for ids in train_item_ids:
        ids = np.asarray(ids).ravel()
        np.add.at(counts, ids[ids > 0], 1.0)
    counts[0] = -np.inf
    return counts


def normalize_answer(text: str) -> str:
    """Lower-cased, punctuation and extra spaces removed: how answers are compared."""
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def exact_matches(targets: Sequence[str], predictions: Sequence[str]) -> np.ndarray:
    """Per-example exact match after lower-casing and stripping punctuation."""
    pairs = zip(targets, predictions, strict=True)
    return np.array([normalize_answer(t) == normalize_answer(p) for t, p in pairs], dtype=bool)


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Recall@1 by exact match (the SeqIO metric function of the tasks)."""
    hits = exact_matches(targets, predictions)
    return {"exact_match": 100.0 * float(np.mean(hits)) if hits.size else 0.0}
