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

    @property
    def stride(self) -> int:
        """The step between training targets (``train_stride`` or the history length)."""
        return self.train_stride or self.max_history_length


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
    # Every kept user's full chronological item_index sequence (all splits), as CSR: user
    # u = user_index - first_user has user_items[user_offsets[u]:user_offsets[u + 1]].
    # Candidate sampling needs it to exclude every item a user ever interacted with.
    user_offsets: np.ndarray | None = None
    user_items: np.ndarray | None = None
    # split -> each example's target row in the input ``interactions`` table (e.g. to fetch the
    # review text for review generation; a TFDS Beam shard counts its own rows instead, see
    # ``tfds_builders.write_shards``). Depends on the input row order, unlike ``splits``.
    target_rows: dict[str, np.ndarray] | None = None
    # The user_index of user_offsets' first user: 0, or a shard's first user
    # (``HistoryTables.users``); user_ids stays indexed by user_index.
    first_user: int = 0

    def vocabulary_titles(self) -> np.ndarray:
        """Titles by item-vocabulary id (what ``user_item_ids`` holds); "" for pad and OOV."""
        tokens = self.vocabularies["item"].tokens[NUM_RESERVED:]
        index = pd.Index(self.item_ids).get_indexer(np.asarray(tokens))
        return np.concatenate([np.array(["", ""], dtype=object), self.item_titles[index]])

    def items_of_user(self, user_index: int) -> np.ndarray:
        """item_index of every interaction of ``user_index``, oldest first."""
        u = user_index - self.first_user
        if not 0 <= u < len(self.user_offsets) - 1:
            raise IndexError(f"user_index {user_index} is not among these histories' users")
        lo, hi = self.user_offsets[u], self.user_offsets[u + 1]
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


@dataclasses.dataclass
class _Rows:
    """The kept interactions ("rows"), grouped by user and oldest first within each user.

    Every later stage works on this order, so a user's history is one contiguous slice
    ``start[u]:start[u] + length[u]`` and an example's input window is a range of rows.
    """

    # (In a shard of users, ``user``, ``start`` and ``length`` count from its first user.)
    order: np.ndarray  # row -> its row in the input ``interactions`` table
    user: np.ndarray  # row -> user_index (int32; kept users, numbered in user-id order)
    item: np.ndarray  # row -> item_index
    timestamp: np.ndarray  # row -> unix seconds (int64)
    rating: np.ndarray  # row -> rating (float32)
    start: np.ndarray  # user_index -> its first row
    length: np.ndarray  # user_index -> its number of rows
    position: np.ndarray  # row -> position in its user's history (int32; 0 = oldest)
    # The user_index of ``user`` 0: a shard of users (``HistoryTables.users``) numbers its users
    # from 0 and adds this back wherever a user_index is written out.
    first_user: int = 0

    def users(self, lo: int, hi: int) -> _Rows:
        """Users [lo, hi) of these rows (local numbering), their rows only."""
        r0, r1 = int(self.start[lo]), int(self.start[hi - 1] + self.length[hi - 1])
        return _Rows(
            order=self.order[r0:r1],
            user=self.user[r0:r1] - np.int32(lo),
            item=self.item[r0:r1],
            timestamp=self.timestamp[r0:r1],
            rating=self.rating[r0:r1],
            start=self.start[lo:hi] - r0,
            length=self.length[lo:hi],
            position=self.position[r0:r1],
            first_user=self.first_user + lo,
        )


@dataclasses.dataclass
class _Categories:
    """Every row's category list, flattened: row r's codes are codes[offsets[r]:offsets[r + 1]].

    Flat arrays rather than per-row lists, so counting and windowing stay vectorized.
    """

    offsets: np.ndarray  # [num_rows + 1] int64
    codes: np.ndarray  # flat category codes, indexing ``names``
    names: np.ndarray  # distinct category names, sorted: a smaller code is the earlier name

    def rows(self, r0: int, r1: int) -> _Categories:
        """The categories of rows [r0, r1)."""
        lo, hi = int(self.offsets[r0]), int(self.offsets[r1])
        offsets = self.offsets[r0 : r1 + 1] - lo
        return _Categories(offsets=offsets, codes=self.codes[lo:hi], names=self.names)


# How a key of the example dicts is read (``_Feature.read``).
_WINDOW, _TARGET, _EXAMPLE = "window", "target", "example"


@dataclasses.dataclass(frozen=True)
class _Feature:
    """One key of the example dicts: where its values come from (see ``_FEATURES``)."""

    key: str
    read: str  # _WINDOW, _TARGET or _EXAMPLE
    row_feature: str | None = None  # the ``_row_features`` entry read (_WINDOW, _TARGET)
    dtype: type | None = None  # the output dtype (_WINDOW, _TARGET)
    pad: int | float = 0  # the value at padded window positions (_WINDOW)


# How each split's example dict is filled: one line per key, in the order the dicts hold them.
# _WINDOW: a per-row feature (see ``_row_features``) over the example's input window, oldest
#   first, [E, L] ([E, L, G] for genres), ``pad`` where the window has no interaction.
# _TARGET: the same per-row feature at the example's target row, [E] ([E, G] for genres).
# _EXAMPLE: a value computed per example in ``_split_examples`` (mask, title, favorite genre).
# A new per-interaction feature is one _WINDOW line here (plus, for a per-row value that does
# not exist yet, one entry in ``_row_features``).
_FEATURES = (
    _Feature("user_index", _TARGET, "user", np.int32),
    _Feature("user_item_ids", _WINDOW, "item_id", np.int32, pad=PAD_ID),
    _Feature("user_item_index", _WINDOW, "item_index", np.int32, pad=-1),
    _Feature("user_ratings", _WINDOW, "rating_id", np.int32, pad=PAD_ID),
    _Feature("user_rating_values", _WINDOW, "rating", np.float32, pad=0),
    _Feature("user_genres", _WINDOW, "genres", np.int32, pad=PAD_ID),
    _Feature("user_timestamps", _WINDOW, "timestamp", np.int64, pad=0),
    _Feature("user_time_buckets", _WINDOW, "time_bucket", np.int32, pad=PAD_ID),
    _Feature("user_mask", _EXAMPLE),
    _Feature("history_length", _EXAMPLE),
    _Feature("target_position", _TARGET, "position", np.int32),
    _Feature("target_item_id", _TARGET, "item_id", np.int32),
    _Feature("target_item_index", _TARGET, "item_index", np.int32),
    _Feature("target_title", _EXAMPLE),
    _Feature("target_rating", _TARGET, "rating", np.float32),
    _Feature("target_timestamp", _TARGET, "timestamp", np.int64),
    _Feature("favorite_genre", _EXAMPLE),
    _Feature("favorite_genre_id", _EXAMPLE),
    # The target interaction's own features (encoder pretraining appends them).
    _Feature("target_rating_id", _TARGET, "rating_id", np.int32),
    _Feature("target_genres", _TARGET, "genres", np.int32),
    _Feature("target_time_bucket", _TARGET, "time_bucket", np.int32),
)


@dataclasses.dataclass
class HistoryTables:
    """What the global pass over every interaction gives the per-user pass.

    Item, user and category codes, the kept rows in user and time order, and the training
    vocabularies each need every interaction; once they exist, a user's examples need only
    that user's rows and these tables. So ``users(lo, hi)`` cuts the tables to a shard of users
    and ``histories_from_tables`` builds the shard's examples, equal to the same users' examples
    of the whole (tested): the TFDS Beam builders run the per-user pass per shard.
    """

    config: HistoryConfig
    rows: _Rows
    categories: _Categories
    vocabularies: dict[str, Vocabulary]
    item_to_id: np.ndarray  # item_index -> item vocabulary id
    genre_to_id: np.ndarray  # category code -> genre vocabulary id
    user_ids: np.ndarray  # user_index -> user_id (every kept user, also in a shard)
    item_ids: np.ndarray
    item_titles: np.ndarray
    num_users_dropped: int

    @property
    def num_users(self) -> int:
        return len(self.rows.length)

    def examples_per_user(self) -> dict[str, np.ndarray]:
        """{split: [num_users] how many examples of the split each user gives}."""
        targets = _example_targets(self.rows, self.config.stride)
        return {
            split: np.bincount(self.rows.user[target], minlength=self.num_users)
            for split, target in targets.items()
        }

    def users(self, lo: int, hi: int) -> HistoryTables:
        """The tables of users [lo, hi) of these tables (local indices), with their rows only."""
        if not 0 <= lo < hi <= self.num_users:
            raise ValueError(f"users [{lo}, {hi}) is not a non-empty range of {self.num_users}")
        rows = self.rows.users(lo, hi)
        r0 = int(self.rows.start[lo])
        categories = self.categories.rows(r0, r0 + len(rows.order))
        return dataclasses.replace(self, rows=rows, categories=categories)


def global_pass(
    interactions: pd.DataFrame, items: pd.DataFrame, config: HistoryConfig | None = None
) -> HistoryTables:
    """Codes, row order and training vocabularies: everything that reads every interaction."""
    config = config or HistoryConfig()
    item_codes, item_ids, item_titles = _code_items(interactions, items)
    rows, user_ids, num_dropped = _order_rows(interactions, item_codes, config.min_interactions)
    del item_codes  # in input row order: ``rows.item`` has what the later stages need
    categories = _row_categories(interactions, rows.order)
    vocabularies, item_to_id, genre_to_id = _training_vocabularies(
        rows, categories, item_ids, config.min_item_count
    )
    return HistoryTables(
        config,
        rows,
        categories,
        vocabularies,
        item_to_id,
        genre_to_id,
        user_ids,
        item_ids,
        item_titles,
        num_dropped,
    )


def histories_from_tables(t: HistoryTables, splits: tuple[str, ...] = SPLITS) -> Histories:
    """The per-user pass: the examples of ``splits`` for every user of ``t`` (all, or a shard)."""
    rows, config = t.rows, t.config
    row_features = _row_features(
        rows, t.categories, t.vocabularies, t.item_to_id, t.genre_to_id, config
    )
    examples, target_rows = {}, {}
    for name, target in _example_targets(rows, config.stride).items():
        if name not in splits:
            continue
        examples[name] = _split_examples(
            target, rows, row_features, t.categories, t.genre_to_id, t.item_titles, config
        )
        target_rows[name] = rows.order[target].astype(np.int64)
    return Histories(
        config=config,
        splits=examples,
        vocabularies=t.vocabularies,
        user_ids=t.user_ids,
        item_ids=t.item_ids,
        item_titles=t.item_titles,
        num_users_dropped=t.num_users_dropped,
        user_offsets=np.concatenate([[0], np.cumsum(rows.length)]).astype(np.int64),
        user_items=rows.item.astype(np.int32),
        target_rows=target_rows,
        first_user=rows.first_user,
    )


def build_histories(
    interactions: pd.DataFrame, items: pd.DataFrame, config: HistoryConfig | None = None
) -> Histories:
    """Splits every user's chronological history into train / validation / test examples."""
    return histories_from_tables(global_pass(interactions, items, config))


def _code_items(
    interactions: pd.DataFrame, items: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item code of each interaction, item_index -> item_id, item_index -> title).

    The items table and the interactions are coded together, because an item may appear in
    only one of them; codes follow the sorted ids, so every tie-break by item is reproducible.
    """
    # Arrow strings throughout: a 20M-row column as Python str objects would cost >1 GB.
    all_item_ids = pa.chunked_array(
        [_arrow_str(items["item_id"]), _arrow_str(interactions["item_id"])], type=pa.string()
    )
    codes, item_ids = sorted_codes(all_item_ids)
    item_titles = np.full(len(item_ids), "", dtype=object)
    item_titles[codes[: len(items)]] = np.asarray(items["title"], dtype=object)
    if len(item_titles) and not any(item_titles):
        # No metadata at all (e.g. Amazon reviews without their meta_<Category> file): the item
        # id stands in for the title, so next-item tasks still have targets and candidates.
        logging.warning(
            "No item has a title (no item metadata was read): next-item targets, candidates "
            "and text histories use the item id as the title for all %d items.",
            len(item_titles),
        )
        item_titles = np.asarray([str(i) for i in np.asarray(item_ids)], dtype=object)
    return codes[len(items) :], item_ids, item_titles


def _order_rows(
    interactions: pd.DataFrame, item_codes: np.ndarray, min_interactions: int
) -> tuple[_Rows, np.ndarray, int]:
    """The rows of users with enough interactions, grouped by user and in time order.

    Returns (rows, user_index -> user_id, number of users dropped). Ties in time are broken by
    item id, then rating, so the order is the same on every run and machine.
    """
    user_codes, user_ids = sorted_codes(pa.array(interactions["user_id"].array))
    timestamps = interactions["timestamp"].to_numpy(dtype=np.int64)
    ratings = interactions["rating"].to_numpy(dtype=np.float32)
    order = np.lexsort((ratings, item_codes, timestamps, user_codes))
    order, kept_users = _drop_short_histories(order, user_codes, len(user_ids), min_interactions)
    # Kept users are renumbered 0.. (user_index), keeping the user-id order.
    user_index = np.full(len(user_ids), -1, dtype=np.int32)
    user_index[kept_users] = np.arange(len(kept_users), dtype=np.int32)
    user = user_index[user_codes[order]]
    length = np.bincount(user, minlength=len(kept_users))
    start = np.concatenate([[0], np.cumsum(length)[:-1]])
    rows = _Rows(
        order=order,
        user=user,
        item=item_codes[order],
        timestamp=timestamps[order],
        rating=ratings[order],
        start=start,
        length=length,
        position=(np.arange(len(order), dtype=np.int64) - start[user]).astype(np.int32),
    )
    return rows, user_ids[kept_users], int(len(user_ids) - len(kept_users))


def _drop_short_histories(
    order: np.ndarray, user_codes: np.ndarray, num_users: int, min_interactions: int
) -> tuple[np.ndarray, np.ndarray]:
    """(``order`` without the rows of users with < ``min_interactions``, the kept user codes).

    Every kept user needs a test target, a validation target and at least one input.
    """
    counts = np.bincount(user_codes, minlength=num_users)
    order = order[counts[user_codes[order]] >= min_interactions]
    if len(order) == 0:
        raise ValueError(f"no user has >= {min_interactions} interactions")
    return order, np.flatnonzero(counts >= min_interactions)


def _row_categories(interactions: pd.DataFrame, order: np.ndarray) -> _Categories:
    """Every row's categories (genres), in row order, with codes sorted by name."""
    lists = arrow_lists(interactions["categories"]).take(pa.array(order))
    offsets = lists.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]
    flat = lists.flatten()
    del lists
    if len(flat):
        codes, names = sorted_codes(flat)
    else:
        codes, names = np.zeros(0, np.int32), np.zeros(0, dtype=object)
    return _Categories(offsets=offsets, codes=codes, names=names)


def _last_training_position(length: np.ndarray) -> np.ndarray:
    """Per user: the last position that training sees (the last two are the validation and
    test targets)."""
    return length - 3


def _training_vocabularies(
    rows: _Rows, categories: _Categories, item_ids: np.ndarray, min_item_count: int
) -> tuple[dict[str, Vocabulary], np.ndarray, np.ndarray]:
    """Item, genre and rating vocabularies, plus the item-code and genre-code -> id maps.

    Counted over training rows only (everything before each user's validation target), so
    tokens seen only in held-out targets are OOV and the ids do not leak them.
    """
    is_train = rows.position <= _last_training_position(rows.length)[rows.user]
    item_vocab, item_to_id = _vocabulary(rows.item[is_train], item_ids, min_item_count)
    # A row's flag repeated once per category of the row.
    category_is_train = np.repeat(is_train, np.diff(categories.offsets))
    genre_vocab, genre_to_id = _vocabulary(categories.codes[category_is_train], categories.names)
    rating_values, rating_codes = np.unique(rows.rating, return_inverse=True)
    rating_vocab, _ = _vocabulary(rating_codes[is_train], rating_values.astype(object))
    vocabularies = {
        "item": item_vocab,
        "genre": genre_vocab,
        "rating": _sort_rating_vocab(rating_vocab),
    }
    return vocabularies, item_to_id, genre_to_id


def _row_features(
    rows: _Rows,
    categories: _Categories,
    vocabularies: dict[str, Vocabulary],
    item_to_id: np.ndarray,
    genre_to_id: np.ndarray,
    config: HistoryConfig,
) -> dict[str, np.ndarray]:
    """Every per-interaction value, one array per feature indexed by row.

    Computed once per row, not per example: ``_FEATURES`` reads them over every window that
    holds the row (windows overlap when ``train_stride`` < ``max_history_length``) and at targets.
    """
    genres = _row_genres(
        len(rows.order), categories, genre_to_id, vocabularies["genre"].size, config.max_categories
    )
    return {
        "user": rows.user + np.int32(rows.first_user),
        "position": rows.position,
        "item_index": rows.item,
        "item_id": item_to_id[rows.item],
        "rating": rows.rating,
        "rating_id": vocabularies["rating"].lookup(rows.rating),
        "timestamp": rows.timestamp,
        "time_bucket": time_buckets(rows.timestamp, rows.position == 0, config.num_time_buckets),
        "genres": genres,
    }


def _row_genres(
    num_rows: int,
    categories: _Categories,
    genre_to_id: np.ndarray,
    vocab_size: int,
    max_categories: int,
) -> np.ndarray:
    """[num_rows, max_categories] ids of each row's first ``max_categories`` genres, 0-padded."""
    category_row = np.repeat(np.arange(num_rows, dtype=np.int32), np.diff(categories.offsets))
    rank = np.arange(len(categories.codes), dtype=np.int64) - categories.offsets[category_row]
    # Smallest dtype that holds the ids (int16 for any realistic genre / category vocabulary):
    # this array is gathered into every window.
    genres = np.zeros(
        (num_rows, max_categories), dtype=np.int16 if vocab_size < 2**15 else np.int32
    )
    kept = rank < max_categories
    genres[category_row[kept], rank[kept]] = genre_to_id[categories.codes[kept]]
    return genres


def _example_targets(rows: _Rows, stride: int) -> dict[str, np.ndarray]:
    """Each split's example targets (rows), by user; training targets oldest window first.

    Test: each user's last row; validation: the one before. Training targets step back from
    the last training position (``length - 3``) by ``stride``, down to position 1 at the
    earliest (position 0 has no input before it).
    """
    last = rows.start + rows.length - 1
    # Positions 1 .. the last training position can be training targets.
    num_train_positions = _last_training_position(rows.length)
    per_user = np.where(num_train_positions >= 1, (num_train_positions - 1) // stride + 1, 0)
    example_user = np.repeat(np.arange(len(rows.length)), per_user)
    first_of_user = np.repeat(np.cumsum(per_user) - per_user, per_user)
    rank_in_user = np.arange(per_user.sum()) - first_of_user
    strides_back = np.repeat(per_user, per_user) - 1 - rank_in_user  # oldest window first
    train = rows.start[example_user] + num_train_positions[example_user] - strides_back * stride
    targets = {"train": train, "validation": last - 1, "test": last}
    return {name: np.asarray(target, dtype=np.int64) for name, target in targets.items()}


def _split_examples(
    target: np.ndarray,
    rows: _Rows,
    row_features: dict[str, np.ndarray],
    categories: _Categories,
    genre_to_id: np.ndarray,
    item_titles: np.ndarray,
    config: HistoryConfig,
) -> dict[str, np.ndarray]:
    """One split's examples: the keys of ``_FEATURES``, for the examples ending at ``target``.

    An example's window is the up to ``max_history_length`` rows strictly before its target.
    """
    max_length = config.max_history_length
    user = rows.user[target]
    window_start = np.maximum(rows.start[user], target - max_length)
    history_length = (target - window_start).astype(np.int32)
    slots = np.arange(max_length)[None, :]
    mask = slots < history_length[:, None]
    # The row of each window slot (row 0 at padded slots, overwritten by ``_gather``).
    window_rows = np.where(mask, window_start[:, None] + slots, 0)
    window_rows = window_rows.astype(np.int32 if len(rows.order) < 2**31 else np.int64)
    pad = ~mask
    favorite_name, favorite_id = _favorite_genres(window_start, target, categories, genre_to_id)
    per_example = {
        "user_mask": mask,
        "history_length": history_length,
        "target_title": item_titles[rows.item[target]],
        "favorite_genre": favorite_name,
        "favorite_genre_id": favorite_id,
    }
    examples = {}
    for feature in _FEATURES:
        if feature.read == _WINDOW:
            values = row_features[feature.row_feature]
            examples[feature.key] = _gather(values, window_rows, pad, feature.pad, feature.dtype)
        elif feature.read == _TARGET:
            values = row_features[feature.row_feature][target]
            examples[feature.key] = values.astype(feature.dtype, copy=False)
        else:  # _EXAMPLE
            examples[feature.key] = per_example[feature.key]
    return examples


def _favorite_genres(
    window_start: np.ndarray, target: np.ndarray, categories: _Categories, genre_to_id: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(name, vocabulary id) of each example's most frequent window genre; ("", 0) if none."""
    code = _favorite_chunked(window_start, target, categories.offsets, categories.codes)
    names = np.full(len(target), "", dtype=object)
    ids = np.zeros(len(target), dtype=np.int32)
    found = code >= 0
    names[found] = categories.names[code[found]]
    ids[found] = genre_to_id[code[found]]
    return names, ids


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
