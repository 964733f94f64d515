"""Ranking metrics and bootstrap intervals against hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest

from user_llm import metrics


def test_ranks_recall_and_ndcg_by_hand():
    scores = np.array([[0.1, 0.9, 0.5, 0.3], [0.4, 0.2, 0.1, 0.8]])
    ranks = metrics.target_ranks(scores, np.array([2, 1]))
    assert ranks.tolist() == [1, 2]
    assert metrics.recall_at_k(ranks, 1).tolist() == [0.0, 0.0]
    assert metrics.recall_at_k(ranks, 2).tolist() == [1.0, 0.0]
    np.testing.assert_allclose(metrics.ndcg_at_k(ranks, 3), [1 / np.log2(3), 1 / np.log2(4)])


def test_excluded_items_cannot_outrank_the_target_but_the_target_is_never_excluded():
    scores = np.array([[0.1, 0.9, 0.5, 0.3]])
    exclude = np.array([[False, True, True, False]])  # item 2 is the target: stays
    assert metrics.target_ranks(scores, np.array([2]), exclude).tolist() == [0]


def test_ties_count_against_the_target():
    assert metrics.target_ranks(np.array([[1.0, 1.0, 1.0]]), np.array([0])).tolist() == [2]


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_data():
    rng = np.random.default_rng(0)
    small = rng.random(30) < 0.3
    large = rng.random(3000) < 0.3
    p, lo, hi = metrics.bootstrap_ci(small)
    assert lo <= p <= hi
    _, lo2, hi2 = metrics.bootstrap_ci(large)
    assert hi2 - lo2 < hi - lo
    with pytest.raises(ValueError):
        metrics.bootstrap_ci(np.array([]))


def test_popularity_counts_training_items_and_never_recommends_padding():
    scores = metrics.popularity_scores([np.array([[1, 2, 2, 0]]), np.array([3, 2])], 5)
    assert scores[2] == 3 and scores[1] == 1 and scores[3] == 1 and scores[4] == 0
    assert scores[0] == -np.inf
