"""Histories: split positions, no leakage, determinism, tie-breaking, vocabularies, padding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from user_llm.data.histories import OOV_ID, PAD_ID, HistoryConfig, build_histories, time_buckets
from user_llm.data.readers import load
from user_llm.data.tables import finalize_items, list_column


def table(rows, titles=None):
    """rows: (user, item, timestamp, rating, [categories])."""
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating", "categories"])
    df["categories"] = list_column(df["categories"].tolist())
    df["review_title"] = ""
    df["review_text"] = ""
    item_ids = sorted(set(df["item_id"]))
    items = finalize_items(
        pd.DataFrame(
            {
                "item_id": item_ids,
                "title": [(titles or {}).get(i, f"T{i}") for i in item_ids],
                "categories": list_column([[]] * len(item_ids)),
                "text": "",
            }
        )
    )
    return df, items


def test_without_any_item_metadata_the_item_id_is_the_title(caplog):
    """Amazon reviews without their meta file: next-item targets fall back to item ids."""
    inter, items = table(user_rows("a", 7) + user_rows("b", 6))
    items = items.iloc[:0]  # no metadata file was read
    with caplog.at_level("WARNING"):
        h = build_histories(inter, items, HistoryConfig(max_history_length=4, min_interactions=3))
    assert h.item_titles.tolist() == [str(i) for i in h.item_ids]
    test = h.splits["test"]
    assert test["target_title"].tolist() == h.item_ids[test["target_item_index"]].tolist()
    assert sum("item id as the title" in r.message for r in caplog.records) == 1
    with_titles = build_histories(*table(user_rows("a", 7)), HistoryConfig(4, min_interactions=3))
    assert with_titles.item_titles.tolist() == [f"Tai{k}" for k in range(7)]


def user_rows(user, n, t0=0, genres=None):
    return [(user, f"{user}i{k}", t0 + 10 * k, 4.0, (genres or [["G"]])[k % len(genres or [1])])
            for k in range(n)]  # fmt: skip


@pytest.fixture(scope="module")
def ml_small():
    inter, items, _ = load("movielens")
    return inter, items


def test_split_positions_and_right_padding():
    inter, items = table(user_rows("a", 7))
    h = build_histories(inter, items, HistoryConfig(max_history_length=4, min_interactions=3))
    test, val, train = h.splits["test"], h.splits["validation"], h.splits["train"]
    assert test["target_position"].tolist() == [6] and val["target_position"].tolist() == [5]
    # Training targets step back from position 4 by the stride (= 4): 4, then 0 is no target.
    assert train["target_position"].tolist() == [4]
    assert test["user_mask"].tolist() == [[True] * 4]
    assert train["history_length"].tolist() == [4]
    short = build_histories(inter, items, HistoryConfig(max_history_length=10, min_interactions=3))
    m = short.splits["test"]["user_mask"][0]
    assert m.tolist() == [True] * 6 + [False] * 4  # right-padded
    ids = short.splits["test"]["user_item_ids"][0]
    assert (ids[6:] == PAD_ID).all() and (ids[:6] != PAD_ID).all()
    titles = short.item_titles[short.splits["test"]["user_item_index"][0][:6]]
    assert titles.tolist() == [f"Tai{k}" for k in range(6)]  # oldest first, most recent last
    assert short.splits["test"]["target_title"].tolist() == ["Tai6"]


def test_min_interactions_filter():
    inter, items = table(user_rows("a", 5) + user_rows("b", 4))
    h = build_histories(inter, items, HistoryConfig(min_interactions=5))
    assert h.user_ids.tolist() == ["a"] and h.num_users_dropped == 1
    with pytest.raises(ValueError, match=">= 3"):
        HistoryConfig(min_interactions=2)


def test_no_leakage_on_real_data(ml_small):
    inter, items = ml_small
    cfg = HistoryConfig(max_history_length=20, train_stride=7)
    h = build_histories(inter, items, cfg)
    for name, split in h.splits.items():
        mask = split["user_mask"]
        # The target never appears among its own inputs, and every input is strictly earlier.
        assert not (split["user_item_index"] == split["target_item_index"][:, None]).any(), name
        ts = np.where(mask, split["user_timestamps"], np.iinfo(np.int64).min)
        assert (ts <= split["target_timestamp"][:, None]).all()
        assert (split["history_length"] == mask.sum(1)).all()
    # Validation inputs stop before the validation target; test inputs include it last.
    val, test = h.splits["validation"], h.splits["test"]
    assert (test["target_position"] == val["target_position"] + 1).all()
    last_input = test["user_item_index"][np.arange(len(test["history_length"])),
                                         test["history_length"] - 1]  # fmt: skip
    assert (last_input == val["target_item_index"]).all()
    assert _train_before_validation(h)


def _train_before_validation(h):
    val_pos = dict(zip(h.splits["validation"]["user_index"],
                       h.splits["validation"]["target_position"], strict=True))  # fmt: skip
    train = h.splits["train"]
    return all(p < val_pos[u] for u, p in zip(train["user_index"], train["target_position"],
                                              strict=True))  # fmt: skip


def test_vocabularies_use_training_positions_only():
    rows = user_rows("a", 6, genres=[["Drama"]])
    # 'late' (genre Noir, rating 1.5) is only ever the test target or the validation target.
    rows[-1] = ("a", "late", 1000, 1.5, ["Noir"])
    rows[-2] = ("a", "later_val", 999, 2.5, ["Western"])
    inter, items = table(rows)
    h = build_histories(inter, items, HistoryConfig(max_history_length=8, min_interactions=3))
    assert "late" not in h.vocabularies["item"].tokens
    assert "later_val" not in h.vocabularies["item"].tokens
    assert set(h.vocabularies["genre"].tokens[2:]) == {"Drama"}
    assert h.vocabularies["rating"].tokens[2:].tolist() == [4.0]
    test = h.splits["test"]
    assert test["target_item_id"].tolist() == [OOV_ID]
    # The validation item is a test input: it maps to OOV, with OOV genre and rating.
    last = test["history_length"][0] - 1
    assert test["user_item_ids"][0, last] == OOV_ID
    assert test["user_genres"][0, last, 0] == OOV_ID
    assert test["user_ratings"][0, last] == OOV_ID
    assert test["target_title"].tolist() == ["Tlate"]


def test_tie_breaking_and_determinism(ml_small):
    rows = [("u", "b", 5, 3.0, ["X"]), ("u", "a", 5, 4.0, ["X"]), ("u", "c", 1, 2.0, ["X"]),
            ("u", "d", 9, 1.0, ["X"]), ("u", "e", 9, 5.0, ["X"])]  # fmt: skip
    inter, items = table(rows)
    h = build_histories(inter, items, HistoryConfig(max_history_length=5, min_interactions=3))
    test = h.splits["test"]
    order = h.item_ids[test["user_item_index"][0, : test["history_length"][0]]].tolist()
    assert order == ["c", "a", "b", "d"]  # time, then item_id
    assert h.item_ids[test["target_item_index"]].tolist() == ["e"]

    inter, items = ml_small
    shuffled = inter.sample(frac=1.0, random_state=0).reset_index(drop=True)
    a = build_histories(inter, items, HistoryConfig(max_history_length=16))
    b = build_histories(shuffled, items, HistoryConfig(max_history_length=16))
    for name in a.splits:
        for key, value in a.splits[name].items():
            np.testing.assert_array_equal(value, b.splits[name][key], err_msg=f"{name}/{key}")
    for name in a.vocabularies:
        np.testing.assert_array_equal(a.vocabularies[name].tokens, b.vocabularies[name].tokens)


def test_favorite_genre_counts_window_and_breaks_ties_alphabetically():
    genres = [["Drama", "Comedy"], ["Comedy"], ["Drama"], ["Action"], ["Action"], ["Zed"]]
    inter, items = table(user_rows("a", 6, genres=genres))
    h = build_histories(inter, items, HistoryConfig(max_history_length=10, min_interactions=3))
    # Validation inputs: rows 0..3 -> Drama 2, Comedy 2, Action 1 -> tie -> "Comedy".
    assert h.splits["validation"]["favorite_genre"].tolist() == ["Comedy"]
    # Test inputs: rows 0..4 -> Action 2, Comedy 2, Drama 2 -> "Action".
    assert h.splits["test"]["favorite_genre"].tolist() == ["Action"]
    fav_id = h.splits["test"]["favorite_genre_id"][0]
    assert h.vocabularies["genre"].tokens[fav_id] == "Action"
    short = build_histories(inter, items, HistoryConfig(max_history_length=1, min_interactions=3))
    assert short.splits["test"]["favorite_genre"].tolist() == ["Action"]  # window = row 4 only
    none, items2 = table(user_rows("b", 4, genres=[[]]))
    empty = build_histories(none, items2, HistoryConfig(min_interactions=3))
    assert empty.splits["test"]["favorite_genre"].tolist() == [""]
    assert empty.splits["test"]["favorite_genre_id"].tolist() == [0]


def test_genre_width_and_time_buckets():
    genres = [["A", "B", "C"], ["B"], ["C"], ["A"]]
    inter, items = table(user_rows("a", 4, genres=genres))
    h = build_histories(
        inter, items, HistoryConfig(max_history_length=4, max_categories=2, min_interactions=3)
    )
    g = h.splits["test"]["user_genres"][0]
    assert g.shape == (4, 2)
    vocab = h.vocabularies["genre"]
    assert vocab.tokens[g[0]].tolist() == ["A", "B"]  # first 2 of 3 kept
    assert (g[3] == PAD_ID).all()
    tb = h.splits["test"]["user_time_buckets"][0]
    # Gap of 10 s -> 3 + floor(log2(11)) = 6; the first interaction has its own id 2.
    assert tb.tolist() == [2, 6, 6, 0]
    assert time_buckets(np.array([0, 0, 2**40]), np.array([True, False, False]), 40).tolist() == [
        2, 3, 39,
    ]  # fmt: skip


def test_real_data_shapes(ml_small):
    inter, items = ml_small
    h = build_histories(inter, items, HistoryConfig(max_history_length=50))
    assert len(h.splits["test"]["user_index"]) == 610
    assert len(h.splits["validation"]["user_index"]) == 610
    # Every training interaction is an input or a target of some training example.
    train = h.splits["train"]
    assert train["user_item_ids"].shape[1:] == (50,)
    assert train["user_genres"].shape[1:] == (50, 6)
    covered = train["history_length"].sum() + len(train["history_length"])
    assert covered >= len(inter) - 2 * 610
    assert (h.splits["test"]["target_title"] != "").all()


def test_shards_of_users_give_the_whole_builds_examples_and_candidates(ml_small):
    """The per-user pass on shards of users (what the TFDS Beam builders run per worker) gives
    exactly the examples, negatives and candidate sets of the one-machine build, user for user."""
    from user_llm.data import features as F
    from user_llm.data.histories import global_pass, histories_from_tables

    interactions, items = ml_small
    config = HistoryConfig(max_history_length=20, train_stride=7)
    tables = global_pass(interactions, items, config)
    whole = histories_from_tables(tables)
    bounds = [0, 1, 100, 101, 350, tables.num_users]  # a one-user shard, uneven sizes
    ranges = zip(bounds[:-1], bounds[1:], strict=True)
    shards = [histories_from_tables(tables.users(lo, hi)) for lo, hi in ranges]
    for split, want in whole.splits.items():
        for key, value in want.items():
            got = np.concatenate([s.splits[split][key] for s in shards])
            np.testing.assert_array_equal(got, value, err_msg=f"{split} {key}")
        rows = np.concatenate([s.target_rows[split] for s in shards])
        np.testing.assert_array_equal(rows, whole.target_rows[split])
    assert shards[2].first_user == 100 and shards[2].items_of_user(100).tolist() == (
        whole.items_of_user(100).tolist()
    )
    for sampling in F.NEGATIVE_SAMPLINGS:
        negatives = F.user_negatives(whole, sampling=sampling)
        parts = [F.user_negatives(s, sampling=sampling) for s in shards]
        np.testing.assert_array_equal(np.concatenate(parts), negatives)
        want = F.candidate_sets(whole, whole.splits["test"], negatives)
        for key, value in want.items():
            pairs = zip(shards, parts, strict=True)
            got = [F.candidate_sets(s, s.splits["test"], n)[key] for s, n in pairs]
            np.testing.assert_array_equal(np.concatenate(got), value, err_msg=key)
    with pytest.raises(ValueError, match="not a non-empty range"):
        tables.users(5, 5)
    # A user outside a shard is an error, never another user's row (a negative index).
    with pytest.raises(IndexError, match="user_index 99 is not among"):
        shards[2].items_of_user(99)
    with pytest.raises(IndexError, match="outside these negatives' users"):
        F.candidate_sets(shards[2], whole.splits["test"], parts[2])
