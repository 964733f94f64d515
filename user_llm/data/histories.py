"""Per-user chronological histories, leave-last-out splits and training-only vocabularies.

Input: the interaction / item tables of ``tables.py``. Output: per split, numpy arrays of
fixed shape that the SeqIO tasks and feature converters turn into model features.

Choices (each one is what the User-LLM paper's setup needs, stated so it can be checked):
- Order: a user's interactions sorted by (timestamp, item_id, rating), so ties in time are
  broken the same way on every run and machine.
- Split (leave-last-out, chronological per user): the last interaction is the test target, the
  second-to-last the validation target, and every earlier position is training data. Training
  examples are sliding windows whose targets step back from the last training position by
  ``train_stride`` (default: ``max_history_length``, i.e. non-overlapping windows that still
  cover every training interaction as an input). An example's inputs are the up to
  ``max_history_length`` interactions strictly before its target.
- Vocabularies (item, genre/category, rating) are built only from the training positions
  (everything before each user's validation target): id 0 is padding, id 1 out-of-vocabulary,
  then tokens by descending training frequency, ties by name (ratings: ascending value).
- Time: ``user_time_buckets`` is a log2 bucket of the gap since the user's previous
  interaction (id 2: no previous interaction; id 3 + floor(log2(1 + gap_seconds)), capped), a
  fixed rule, so it cannot leak; raw unix seconds are also given in ``user_timestamps``.
- Layout: right-padded, oldest first and most recent last; ``user_mask`` marks real positions.
- Genres / categories: the first ``max_categories`` of each item's list, padded with 0.
- Favorite genre target: the most frequent genre / category over the example's input window
  (all of each item's categories), ties broken alphabetically; "" (id 0) when none.

Everything is vectorized with numpy / pyarrow (no per-user Python loop), so MovieLens-20M fits
the benchmark goal (minutes, a few GB, two cores).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pyarrow as pa
from absl import logging

from user_llm.data.tables import arrow_lists, sorted_codes
from user_llm.feature_names import FIRST_ITEM_ID

PAD_ID = 0
OOV_ID = 1
NUM_RESERVED = FIRST_ITEM_ID  # ids 0 (pad) and 1 (OOV) come first
SPLITS = ("train", "validation", "test")
_FIRST_INTERACTION_BUCKET = 2


@dataclasses.dataclass(frozen=True)
class HistoryConfig:
    """How histories are cut into examples."""

    max_history_length: int = 50
    # Users with fewer interactions are dropped (>= 3: a test, a validation and an input).
    min_interactions: int = 5
    max_categories: int = 6
    # Step between training targets; None = max_history_length (non-overlapping windows).
    train_stride: int | None = None
    # Items seen fewer times in training map to OOV.
    min_item_count: int = 1
    # Time-gap buckets including pad, OOV and "first interaction" (log2 seconds: 3 + 0..).
    num_time_buckets: int = 40

    def __post_init__(self):
        if self.min_interactions < 3:
            raise ValueError("min_interactions must be >= 3 (test, validation and one input)")
        if self.max_history_length < 1 or self.max_categories < 1:
            raise ValueError("max_history_length and max_categories must be positive")
        if self.train_stride is not None and self.train_stride < 1:
            raise ValueError("train_stride must be positive")


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Token <-> id for one feature; ids 0 (pad) and 1 (OOV) are reserved."""

    tokens: np.ndarray  # tokens[id]; tokens[0] = "<pad>", tokens[1] = "<oov>"
    counts: np.ndarray  # training frequency per id (0 for reserved ids)

    @property
    def size(self) -> int:
        return len(self.tokens)

    def lookup(self, values) -> np.ndarray:
        """Ids of ``values`` (OOV_ID for unknown ones)."""
        ids = pd.Index(self.tokens[NUM_RESERVED:]).get_indexer(np.asarray(values))
        return np.where(ids < 0, OOV_ID, ids + NUM_RESERVED).astype(np.int32)


@dataclasses.dataclass
class Histories:
    """Examples per split plus what is needed to read them back (ids -> items, titles)."""

    config: HistoryConfig
    splits: dict[str, dict[str, np.ndarray]]
    vocabularies: dict[str, Vocabulary]
    user_ids: np.ndarray  # user_index -> user_id
    item_ids: np.ndarray  # item_index -> item_id (every item, in vocabulary or not)
    item_titles: np.ndarray  # item_index -> title ("" without metadata)
    num_users_dropped: int
    # Every kept user's full chronological item_index sequence (all splits), as CSR:
    # user u's items are user_items[user_offsets[u]:user_offsets[u + 1]]. Candidate sampling
    # needs it to exclude every item a user ever interacted with.
    user_offsets: np.ndarray | None = None
    user_items: np.ndarray | None = None
    # split -> each example's target row in the input ``interactions`` table (e.g. to fetch the
    # review text for review generation). Depends on the input row order, unlike ``splits``.
    target_rows: dict[str, np.ndarray] | None = None

    def vocabulary_titles(self) -> np.ndarray:
        """Titles by item-vocabulary id (what ``user_item_ids`` holds); "" for pad and OOV."""
        tokens = self.vocabularies["item"].tokens[NUM_RESERVED:]
        index = pd.Index(self.item_ids).get_indexer(np.asarray(tokens))
        return np.concatenate([np.array(["", ""], dtype=object), self.item_titles[index]])

    def items_of_user(self, user_index: int) -> np.ndarray:
        """item_index of every interaction of ``user_index``, oldest first."""
        lo, hi = self.user_offsets[user_index], self.user_offsets[user_index + 1]
        return self.user_items[lo:hi]


def _vocabulary(codes: np.ndarray, names: np.ndarray, min_count: int = 1):
    """Vocabulary from training occurrences of ``codes``; returns (vocab, code -> id map)."""
    counts = np.bincount(codes, minlength=len(names))
    keep = np.flatnonzero(counts >= max(min_count, 1))
    # Descending count, ties by name (names are sorted, so by code).
    keep = keep[np.lexsort((keep, -counts[keep]))]
    ids = np.full(len(names), OOV_ID, dtype=np.int32)
    ids[keep] = np.arange(NUM_RESERVED, NUM_RESERVED + len(keep), dtype=np.int32)
    tokens = np.concatenate([np.array(["<pad>", "<oov>"], dtype=object), names[keep]])
    vocab_counts = np.concatenate([[0, 0], counts[keep]]).astype(np.int64)
    return Vocabulary(tokens=tokens, counts=vocab_counts), ids


def time_buckets(timestamps: np.ndarray, first: np.ndarray, num_buckets: int) -> np.ndarray:
    """Log2 bucket of the gap to the previous interaction (``first``: no previous one)."""
    gap = np.diff(timestamps, prepend=timestamps[:1]).astype(np.float64)
    bucket = 3 + np.floor(np.log2(1.0 + np.maximum(gap, 0.0))).astype(np.int64)
    bucket = np.minimum(bucket, num_buckets - 1)
    return np.where(first, _FIRST_INTERACTION_BUCKET, bucket).astype(np.int32)


def build_histories(
    interactions: pd.DataFrame, items: pd.DataFrame, config: HistoryConfig | None = None
) -> Histories:
    """Splits every user's chronological history into train / validation / test examples."""
    config = config or HistoryConfig()
    L, G = config.max_history_length, config.max_categories

    # ---- codes: users and items in sorted-id order, so every tie-break is reproducible.
    user_codes, user_ids = sorted_codes(pa.array(interactions["user_id"].array))
    # Arrow strings throughout: a 20M-row column as Python str objects would cost >1 GB.
    all_item_ids = pa.chunked_array(
        [_arrow_str(items["item_id"]), _arrow_str(interactions["item_id"])], type=pa.string()
    )
    item_codes_all, item_ids = sorted_codes(all_item_ids)
    item_codes = item_codes_all[len(items) :]
    item_titles = np.full(len(item_ids), "", dtype=object)
    item_titles[item_codes_all[: len(items)]] = np.asarray(items["title"], dtype=object)
    if len(item_titles) and not any(item_titles):
        # No metadata at all (e.g. Amazon reviews without their meta_<Category> file): the item
        # id stands in for the title, so next-item tasks still have targets and candidates.
        logging.warning(
            "No item has a title (no item metadata was read): next-item targets, candidates "
            "and text histories use the item id as the title for all %d items.",
            len(item_titles),
        )
        item_titles = np.asarray([str(i) for i in np.asarray(item_ids)], dtype=object)

    timestamps = interactions["timestamp"].to_numpy(dtype=np.int64)
    ratings = interactions["rating"].to_numpy(dtype=np.float32)
    order = np.lexsort((ratings, item_codes, timestamps, user_codes))

    # ---- drop short histories.
    counts = np.bincount(user_codes, minlength=len(user_ids))
    keep_row = counts[user_codes[order]] >= config.min_interactions
    order = order[keep_row]
    kept_users = np.flatnonzero(counts >= config.min_interactions)
    num_dropped = int(len(user_ids) - len(kept_users))
    if len(order) == 0:
        raise ValueError(f"no user has >= {config.min_interactions} interactions")
    remap = np.full(len(user_ids), -1, dtype=np.int32)
    remap[kept_users] = np.arange(len(kept_users), dtype=np.int32)
    user = remap[user_codes[order]]
    user_ids = user_ids[kept_users]
    item = item_codes[order]
    ts = timestamps[order]
    rating = ratings[order]
    n_rows = len(order)
    del user_codes, item_codes, timestamps, ratings, keep_row, remap

    length = np.bincount(user, minlength=len(user_ids))
    start = np.concatenate([[0], np.cumsum(length)[:-1]])
    pos = (np.arange(n_rows, dtype=np.int64) - start[user]).astype(np.int32)
    is_train_row = pos <= length[user] - 3

    # ---- categories per row: flat values in row order, global codes sorted by name.
    cat_lists = arrow_lists(interactions["categories"]).take(pa.array(order))
    offsets = cat_lists.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]
    flat = cat_lists.flatten()
    del cat_lists
    if len(flat):
        cat_codes, cat_names = sorted_codes(flat)
    else:
        cat_codes, cat_names = np.zeros(0, np.int32), np.zeros(0, dtype=object)
    del flat
    cat_row = np.repeat(np.arange(n_rows, dtype=np.int32), np.diff(offsets))

    # ---- vocabularies from training rows only.
    item_vocab, item_to_id = _vocabulary(item[is_train_row], item_ids, config.min_item_count)
    cat_vocab, cat_to_id = _vocabulary(cat_codes[is_train_row[cat_row]], cat_names)
    rating_values, rating_codes = np.unique(rating, return_inverse=True)
    rating_vocab, _ = _vocabulary(rating_codes[is_train_row], rating_values.astype(object))
    rating_vocab = _sort_rating_vocab(rating_vocab)
    rating_ids = rating_vocab.lookup(rating)

    # Row -> first G category ids.
    rank = np.arange(len(cat_codes), dtype=np.int64) - offsets[cat_row]
    # Smallest dtype that holds the ids (int16 for any realistic genre / category vocabulary).
    row_cats = np.zeros((n_rows, G), dtype=np.int16 if cat_vocab.size < 2**15 else np.int32)
    sel = rank < G
    row_cats[cat_row[sel], rank[sel]] = cat_to_id[cat_codes[sel]]
    del rank, sel, cat_row

    row_time = time_buckets(ts, pos == 0, config.num_time_buckets)
    row_item_ids = item_to_id[item]

    # ---- example targets (global row indices), per split.
    last = start + length - 1
    stride = config.train_stride or L
    n_train_targets = length - 3  # positions 1 .. n-3 can be training targets
    per_user = np.where(n_train_targets >= 1, (n_train_targets - 1) // stride + 1, 0)
    ex_user = np.repeat(np.arange(len(user_ids)), per_user)
    k = np.arange(per_user.sum()) - np.repeat(np.cumsum(per_user) - per_user, per_user)
    k = np.repeat(per_user, per_user) - 1 - k  # oldest window first within a user
    targets = {
        "train": start[ex_user] + n_train_targets[ex_user] - k * stride,
        "validation": last - 1,
        "test": last,
    }

    splits, target_rows = {}, {}
    for name, target in targets.items():
        target = np.asarray(target, dtype=np.int64)
        u = user[target]
        window_start = np.maximum(start[u], target - L)
        hist_len = (target - window_start).astype(np.int32)
        idx = window_start[:, None] + np.arange(L)[None, :]
        mask = np.arange(L)[None, :] < hist_len[:, None]
        idx = np.where(mask, idx, 0).astype(np.int32 if n_rows < 2**31 else np.int64)
        pad = ~mask
        fav_code = _favorite_chunked(window_start, target, offsets, cat_codes)
        fav_name = np.full(len(target), "", dtype=object)
        fav_id = np.zeros(len(target), dtype=np.int32)
        has_fav = fav_code >= 0
        fav_name[has_fav] = cat_names[fav_code[has_fav]]
        fav_id[has_fav] = cat_to_id[fav_code[has_fav]]
        # Gather, then zero the padding in place: one [E, L(, G)] array per feature, not three.
        splits[name] = {
            "user_index": u.astype(np.int32),
            "user_item_ids": _gather(row_item_ids, idx, pad, PAD_ID, np.int32),
            "user_item_index": _gather(item, idx, pad, -1, np.int32),
            "user_ratings": _gather(rating_ids, idx, pad, PAD_ID, np.int32),
            "user_rating_values": _gather(rating, idx, pad, 0, np.float32),
            "user_genres": _gather(row_cats, idx, pad, PAD_ID, np.int32),
            "user_timestamps": _gather(ts, idx, pad, 0, np.int64),
            "user_time_buckets": _gather(row_time, idx, pad, PAD_ID, np.int32),
            "user_mask": mask,
            "history_length": hist_len,
            "target_position": pos[target].astype(np.int32),
            "target_item_id": row_item_ids[target].astype(np.int32),
            "target_item_index": item[target].astype(np.int32),
            "target_title": item_titles[item[target]],
            "target_rating": rating[target].astype(np.float32),
            "target_timestamp": ts[target],
            "favorite_genre": fav_name,
            "favorite_genre_id": fav_id,
            # The target interaction's own features (encoder pretraining appends them).
            "target_rating_id": rating_ids[target].astype(np.int32),
            "target_genres": row_cats[target].astype(np.int32),
            "target_time_bucket": row_time[target],
        }
        target_rows[name] = order[target].astype(np.int64)
        del idx, pad
    return Histories(
        config=config,
        splits=splits,
        vocabularies={"item": item_vocab, "genre": cat_vocab, "rating": rating_vocab},
        user_ids=user_ids,
        item_ids=item_ids,
        item_titles=item_titles,
        num_users_dropped=num_dropped,
        user_offsets=np.concatenate([[0], np.cumsum(length)]).astype(np.int64),
        user_items=item.astype(np.int32),
        target_rows=target_rows,
    )


def _arrow_str(column: pd.Series) -> pa.Array:
    """A str column as an Arrow string array without materializing Python strings."""
    arr = pa.array(column.array, from_pandas=True)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.cast(pa.string())


def _gather(values: np.ndarray, idx: np.ndarray, pad: np.ndarray, fill, dtype) -> np.ndarray:
    """``values[idx]`` with ``fill`` where ``pad`` (broadcast over trailing axes)."""
    out = values[idx].astype(dtype, copy=False)
    out[pad] = fill
    return out


def _favorite_chunked(
    window_start: np.ndarray,
    target: np.ndarray,
    offsets: np.ndarray,
    cat_codes: np.ndarray,
    chunk: int = 65536,
) -> np.ndarray:
    """``_favorite`` over blocks of examples, so its flat temporaries stay small."""
    parts = [
        _favorite(window_start[i : i + chunk], target[i : i + chunk], offsets, cat_codes)
        for i in range(0, len(target), chunk)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _sort_rating_vocab(vocab: Vocabulary) -> Vocabulary:
    """Rating ids in ascending rating order (ordinal), not by frequency."""
    values = vocab.tokens[NUM_RESERVED:].astype(np.float64)
    order = np.argsort(values, kind="stable")
    tokens = np.concatenate([vocab.tokens[:NUM_RESERVED], vocab.tokens[NUM_RESERVED:][order]])
    counts = np.concatenate([vocab.counts[:NUM_RESERVED], vocab.counts[NUM_RESERVED:][order]])
    return Vocabulary(tokens=tokens, counts=counts)


def _favorite(
    window_start: np.ndarray, target: np.ndarray, offsets: np.ndarray, cat_codes: np.ndarray
) -> np.ndarray:
    """Most frequent category code in rows [window_start, target) per example (-1: none).

    Each example's categories are one contiguous slice of the flat category array, so the
    (example, category) pairs come from index arithmetic; ties go to the smaller code, which
    is the alphabetically first name.
    """
    lo, hi = offsets[window_start], offsets[target]
    sizes = hi - lo
    result = np.full(len(target), -1, dtype=np.int64)
    total = int(sizes.sum())
    if total == 0:
        return result
    ex = np.repeat(np.arange(len(target)), sizes)
    flat_idx = np.arange(total) - np.repeat(np.cumsum(sizes) - sizes, sizes) + np.repeat(lo, sizes)
    codes = cat_codes[flat_idx]
    num_codes = int(cat_codes.max()) + 1
    pairs, pair_counts = np.unique(ex * num_codes + codes, return_counts=True)
    pair_ex, pair_code = pairs // num_codes, pairs % num_codes
    best = np.lexsort((pair_code, -pair_counts, pair_ex))
    first = np.concatenate([[True], pair_ex[best][1:] != pair_ex[best][:-1]])
    chosen = best[first]
    result[pair_ex[chosen]] = pair_code[chosen]
    return result
