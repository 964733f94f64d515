"""Evaluation metrics: ranking among candidates, candidate tokens, exact match, ROUGE-Lsum."""

from __future__ import annotations

import numpy as np
import pytest

from user_llm import evaluate, metrics


def test_ranking_metrics_rank_the_labelled_candidate_among_valid_ones():
    scores = np.array([[0.1, 0.9, 0.5, 7.0], [3.0, 2.0, 1.0, 0.0]])
    labels = np.array([1, 2])
    valid = np.array([[True, True, True, False], [True, True, True, True]])
    out = evaluate.ranking_metrics(scores, labels, valid, "x_")
    # Row 0: the invalid 7.0 does not count, so the label ranks first; row 1 ranks third.
    np.testing.assert_array_equal(out["x_recall@1"], [1.0, 0.0])
    np.testing.assert_array_equal(out["x_recall@5"], [1.0, 1.0])
    np.testing.assert_allclose(out["x_ndcg@5"], [1.0, 1.0 / np.log2(4.0)])


def test_candidate_tokens_end_with_eos_truncate_and_leave_missing_candidates_empty():
    titles = np.array(["ab", "abcdef", "z"], dtype=object)
    encode = lambda s: [ord(c) for c in s]  # noqa: E731
    out = evaluate.candidate_tokens(titles, np.array([[0, -1, 1]]), encode, eos_id=1, width=4)
    assert out.shape == (1, 3, 4)
    assert out[0, 0].tolist() == [97, 98, 1, 0]
    assert out[0, 1].tolist() == [0, 0, 0, 0]
    assert out[0, 2].tolist() == [97, 98, 99, 100]


def test_exact_match_ignores_case_punctuation_and_spacing():
    got = metrics.exact_matches(
        ["Toy Story (1995)", "Heat (1995)", "Drama"], ["toy story 1995", "Heat (1996)", " drama."]
    )
    assert got.tolist() == [True, False, True]


def test_rouge_lsum_scores_identical_disjoint_and_partial_texts():
    targets = ["A fine movie. Great cast.", "Loved it.", "The plot was slow but the end was great."]
    predictions = ["A fine movie. Great cast.", "Terrible sound.", "The plot was slow."]
    got = evaluate.rouge_lsum(targets, predictions)
    assert got[0] == pytest.approx(1.0)
    assert got[1] == pytest.approx(0.0)
    assert 0.2 < got[2] < 0.9


def test_summaries_are_percentages_with_intervals_around_the_point():
    out = evaluate.summarize({"acc": np.array([1.0, 0.0, 1.0, 1.0])})
    assert out["acc"] == pytest.approx(75.0)
    low, high = out["acc_ci95"]
    assert 0.0 <= low <= 75.0 <= high <= 100.0
    assert out["num_examples"] == 4


def test_rules_on_the_same_examples_pair_the_model_with_popularity_and_the_majority():
    import tasks.movielens  # noqa: F401 - registers the tasks (real ml-latest-small)

    rng = np.random.default_rng(0)
    hits = {k: rng.integers(0, 2, 40).astype(float) for k in ("a", "b", "c", "d")}
    real = {
        "recall@5": hits["a"], "recall@5_norm": hits["b"], "popularity_recall@5": hits["c"],
        "target_token_prob": hits["d"],
    }  # fmt: skip
    out = evaluate.rules_on_the_same_examples("movielens_next_item_userllm_h50", real, [""] * 40)
    diff = out["Popularity"]["paired_diff"]
    # Both scorings are paired with popularity's ranks of the same candidates; nothing else.
    assert set(diff) == {"recall@5", "recall@5_norm"}
    assert diff["recall@5"][0] == pytest.approx(100 * (hits["a"] - hits["c"]).mean())
    assert diff["recall@5_norm"][0] == pytest.approx(100 * (hits["b"] - hits["c"]).mean())

    # Favourite genre: the majority of the training examples answers every question alike.
    task = "movielens_favorite_genre_userllm_h50"
    majority = evaluate.majority_answer(task)
    targets = [majority, "Comedy", majority, "Horror"] * 10
    model = np.array([1.0, 1.0, 0.0, 0.0] * 10)
    out = evaluate.rules_on_the_same_examples(task, {"accuracy": model}, targets)
    ((rule, result),) = out.items()
    assert rule == f"Majority genre ({majority})" and majority == "Drama"
    # The model is right on 2 of every 4, the rule on the 2 majority ones: 50 - 50 = 0.
    assert result["paired_diff"]["accuracy"][0] == pytest.approx(0.0)
