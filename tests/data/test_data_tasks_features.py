"""Task examples: deterministic candidate sets, identical targets across forms, chronological
text prompts, and no validation / test leakage into encoder pretraining."""

from __future__ import annotations

import numpy as np
import pytest

from user_llm.data import features as F
from user_llm.data import readers
from user_llm.data.histories import NUM_RESERVED, HistoryConfig, build_histories

L = 20
TEXT = F.DatasetText()


@pytest.fixture(scope="module")
def ml():
    inter, items, _ = readers.load("movielens")
    return inter, build_histories(inter, items, HistoryConfig(max_history_length=L))


@pytest.mark.parametrize("sampling", F.NEGATIVE_SAMPLINGS)
def test_candidates_deterministic_exclude_user_items_and_hold_target(ml, sampling):
    _, h = ml
    neg = F.user_negatives(h, seed=0, sampling=sampling)
    assert (neg >= 0).all() and neg.shape == (len(h.user_offsets) - 1, F.NUM_NEGATIVES)
    assert np.array_equal(neg, F.user_negatives(h, seed=0, sampling=sampling))
    assert not np.array_equal(neg, F.user_negatives(h, seed=1, sampling=sampling))
    for u in range(len(neg)):
        row = neg[u]
        assert len(set(row.tolist())) == len(row)
        assert not set(row.tolist()) & set(h.items_of_user(u).tolist())
    for split in ("validation", "test"):
        s = h.splits[split]
        c = F.candidate_sets(h, s, neg)
        rows = np.arange(len(c["candidate_label"]))
        assert c["candidate_item_index"].shape == (len(rows), F.NUM_NEGATIVES + 1)
        hit = c["candidate_item_index"][rows, c["candidate_label"]]
        assert np.array_equal(hit, s["target_item_index"])
        assert np.array_equal(
            c["candidate_item_index"], F.candidate_sets(h, s, neg)["candidate_item_index"]
        )
        # Encoder ids match the item vocabulary; negatives are in-vocabulary, titled items.
        ids = h.vocabularies["item"].lookup(h.item_ids[c["candidate_item_index"].ravel()])
        assert np.array_equal(ids.reshape(c["candidate_item_ids"].shape), c["candidate_item_ids"])
        others = np.ones_like(c["candidate_item_ids"], dtype=bool)
        others[rows, c["candidate_label"]] = False
        assert (c["candidate_item_ids"][others] >= NUM_RESERVED).all()
    labels = F.candidate_sets(h, h.splits["test"], neg)["candidate_label"]
    assert len(np.unique(labels)) > 5  # the target is not always first


def test_popularity_negatives_follow_training_popularity(ml):
    """Popularity-sampled negatives are far more popular than uniform ones (the point of them:
    a popularity ranking no longer wins by default), and a missing sampling is refused."""
    _, h = ml
    vocab = h.vocabularies["item"]
    counts = {s: vocab.counts[vocab.lookup(h.item_ids[F.user_negatives(h, sampling=s).ravel()])]
              for s in F.NEGATIVE_SAMPLINGS}  # fmt: skip
    assert np.median(counts["popularity"]) > 5 * max(np.median(counts["uniform"]), 1)
    # Targets are popular too: popularity negatives are about as popular as test targets.
    targets = vocab.counts[h.splits["test"]["target_item_id"]]
    assert np.mean(counts["popularity"]) > 0.3 * np.mean(targets)
    with pytest.raises(ValueError, match="sampling"):
        F.user_negatives(h, sampling="zipf")


@pytest.mark.parametrize("task", ["next_item", "favorite_genre"])
def test_userllm_and_tp_share_examples_and_targets(ml, task):
    _, h = ml
    neg = {s: F.user_negatives(h, sampling=s) for s in F.NEGATIVE_SAMPLINGS}
    for split in ("train", "test"):
        a = F.task_examples(h, split, task, "userllm", TEXT, negatives=neg)
        b = F.task_examples(h, split, task, "tp", TEXT, negatives=neg)
        assert np.array_equal(a["targets"], b["targets"]) and len(a["targets"]) > 0
        assert all(t for t in a["targets"])
        if task == "next_item":
            assert np.array_equal(a["candidate_item_index"], b["candidate_item_index"])
        assert "user_item_ids" in a and "user_item_ids" not in b
        assert a["inputs"][0] in b["inputs"][0]  # same question, TP adds the history
        assert len(b["inputs"][0]) > 10 * len(a["inputs"][0])


def test_tp_prompt_lists_history_titles_in_chronological_order(ml):
    _, h = ml
    s = h.splits["test"]
    ex = F.task_examples(h, "test", "next_item", "tp", TEXT)
    for e in (0, 7, 100):
        n = int(s["history_length"][e])
        titles = h.item_titles[s["user_item_index"][e, :n]]
        prompt = ex["inputs"][e]
        lines = prompt.split("\n")[1:-1]
        assert len(lines) == n
        assert [ln.split(" | ")[0] for ln in lines] == titles.tolist()  # oldest first
        dates = [ln.rsplit(" | ", 1)[1] for ln in lines]
        assert dates == sorted(dates)
        assert prompt.endswith(F.instruction("next_item", TEXT))
        assert s["target_title"][e] not in lines


def test_review_generation_target_is_the_target_review(tmp_path):
    import pandas as pd

    from user_llm.data.tables import finalize_items, list_column

    rows = [("a", f"i{k}", 10 * k, 1.0 + k % 5, ["C"], f"text {k}") for k in range(6)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating",
                                        "categories", "review_text"])  # fmt: skip
    inter["categories"] = list_column(inter["categories"].tolist())
    inter["review_title"] = ""
    names = [f"i{k}" for k in range(6)]
    titles = [f"T{k}" for k in range(6)]
    empty = list_column([[]] * 6)
    items = finalize_items(
        pd.DataFrame({"item_id": names, "title": titles, "categories": empty, "text": ""})
    )
    h = build_histories(inter, items, HistoryConfig(max_history_length=4, min_interactions=3))
    review = inter["review_text"].to_numpy(dtype=object)
    for split, k in (("test", 5), ("validation", 4)):
        texts = review[h.target_rows[split]]
        ex = F.task_examples(h, split, "review_gen", "tp", TEXT, review_texts=texts)
        assert ex["targets"].tolist() == [f"text {k}"]
        assert f'"T{k}"' in ex["inputs"][0] and f"rated {1 + k % 5} out of 5" in ex["inputs"][0]
        assert f"T{k} |" not in ex["inputs"][0]  # the target is not in its own history


def test_pretraining_never_sees_validation_or_test_targets(ml):
    _, h = ml
    train = h.splits["train"]
    pre = F.pretraining_arrays(train)
    assert pre["user_item_ids"].shape == (len(train["user_index"]), L + 1)
    lengths = np.diff(h.user_offsets)
    users = train["user_index"]
    # Appended targets are training positions; windows end there.
    assert (train["target_position"] <= lengths[users] - 3).all()
    rows = np.arange(len(users))
    assert np.array_equal(pre["user_item_ids"][rows, train["history_length"]],
                          train["target_item_id"])  # fmt: skip
    assert (pre["user_mask"].sum(1) == train["history_length"] + 1).all()
    # MovieLens users rate a movie once: their val / test movies never occur in train windows.
    for split in ("validation", "test"):
        s = h.splits[split]
        held = dict(zip(s["user_index"].tolist(), s["target_item_id"].tolist(), strict=True))
        for e in range(len(users)):
            v = held[int(users[e])]
            if v >= NUM_RESERVED:
                assert v not in pre["user_item_ids"][e][pre["user_mask"][e] == 1]
    # Every training interaction is covered by some pretraining window.
    covered = sum(int(m.sum()) for m in pre["user_mask"])
    assert covered >= int((lengths - 2).sum())
    # Evaluation windows end exactly at their own target.
    test = F.pretraining_arrays(h.splits["test"])
    last = test["user_mask"].sum(1) - 1
    assert np.array_equal(test["user_item_ids"][np.arange(len(last)), last],
                          h.splits["test"]["target_item_id"])  # fmt: skip


def test_hybrid_form_has_user_arrays_and_only_the_most_recent_items_as_text(ml):
    _, h = ml
    tp = F.task_examples(h, "test", "next_item", "tp", TEXT)
    hybrid = F.task_examples(h, "test", "next_item", "hybrid", TEXT)
    userllm = F.task_examples(h, "test", "next_item", "userllm", TEXT)
    assert np.array_equal(hybrid["targets"], tp["targets"])
    for key in F.ENCODER_FEATURES:
        assert np.array_equal(hybrid[key], userllm[key])
    for e in range(0, len(tp["inputs"]), 97):
        tp_lines = tp["inputs"][e].splitlines()
        hybrid_lines = hybrid["inputs"][e].splitlines()
        n_items = len(tp_lines) - 2  # header line and question line
        kept = min(n_items, F.RECENT_ITEMS)
        assert len(hybrid_lines) == kept + 2
        assert hybrid_lines[1:-1] == tp_lines[1 + n_items - kept : -1]  # the newest items
        assert hybrid_lines[-1] == tp_lines[-1]


def test_item_target_is_the_next_items_id_on_next_item_examples_only(ml):
    """The item head's target (``item_target_id``): the candidate set's labelled item on every
    next-item example, padding on favourite-genre examples (a mixture adds no item loss there)."""
    _, h = ml
    neg = {s: F.user_negatives(h, sampling=s) for s in F.NEGATIVE_SAMPLINGS}
    nxt = F.task_examples(h, "test", "next_item", "userllm", TEXT, negatives=neg)
    rows = np.arange(len(nxt["candidate_label"]))
    labelled = nxt["candidate_item_ids"][rows, nxt["candidate_label"]]
    np.testing.assert_array_equal(nxt["item_target_id"], labelled)
    assert (nxt["item_target_id"] >= NUM_RESERVED).mean() > 0.9
    genre = F.task_examples(h, "test", "favorite_genre", "userllm", TEXT, negatives=neg)
    assert genre["item_target_id"].dtype == np.int32 and not genre["item_target_id"].any()
