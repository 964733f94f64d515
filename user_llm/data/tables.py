"""The common schema every reader produces: one interaction table and one item table.

Readers for MovieLens, Amazon Reviews and Google Local all end here, so everything downstream
(histories, tasks, stats) is written once against these columns:

interactions: user_id (str), item_id (str), timestamp (int64, unix seconds), rating (float32),
  categories (list of str: the item's genres / categories), review_title (str, may be empty),
  review_text (str, may be empty). Sorted by (user_id, timestamp, item_id).
items: item_id (str), title (str), categories (list of str), text (str). Sorted by item_id.

List columns use ``pd.ArrowDtype(pa.list_(pa.string()))`` so that 20M rows cost a few hundred MB,
not one Python list per row; ``df.categories.iloc[i]`` is still a plain list of str.

Bad input never yields a silently wrong table: readers raise ``DataError`` naming the file and
line, or (``lenient=True``) drop the row and count it in a ``ParseReport``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

INTERACTION_COLUMNS = (
    "user_id",
    "item_id",
    "timestamp",
    "rating",
    "categories",
    "review_title",
    "review_text",
)
ITEM_COLUMNS = ("item_id", "title", "categories", "text")
LIST_OF_STR = pd.ArrowDtype(pa.list_(pa.string()))

# Timestamps (unix seconds) after 2100-01-01 are not interaction times: a garbled field.
MAX_TIMESTAMP_SECONDS = 4_102_444_800
TIMESTAMP_RANGE = "timestamp_out_of_range"  # the reason every reader reports


def bad_timestamps(seconds: np.ndarray) -> np.ndarray:
    """Rows whose unix-seconds timestamp is negative, fractional or after 2100."""
    seconds = np.asarray(seconds, dtype=np.float64)
    return (seconds < 0) | (seconds > MAX_TIMESTAMP_SECONDS) | (seconds != np.floor(seconds))


# Internal bookkeeping columns readers carry until validation is done.
SOURCE_COLUMN = "_source"
LINE_COLUMN = "_line"


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error names a bad value, not a page."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DataError(ValueError):
    """Bad input data; the message names the file and (1-based) line so it can be fixed."""

    def __init__(self, path: str, line: int | None, reason: str):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


@dataclasses.dataclass
class ParseReport:
    """What a reader read and what it dropped (in lenient mode), so losses are never silent."""

    rows_read: int = 0
    rows_skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    meta_rows_read: int = 0
    items_without_metadata: int = 0
    users_without_interactions: int = 0
    files: list[str] = dataclasses.field(default_factory=list)
    variant: str = ""

    def skip(self, reason: str, count: int = 1) -> None:
        """Counts ``count`` rows dropped for ``reason``."""
        if count:
            self.rows_skipped[reason] = self.rows_skipped.get(reason, 0) + int(count)

    @property
    def num_skipped(self) -> int:
        return sum(self.rows_skipped.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy (for logs and the stats CLI)."""
        return dataclasses.asdict(self)


def reject_rows(
    df: pd.DataFrame,
    bad: np.ndarray | pd.Series,
    reason: str,
    report: ParseReport,
    lenient: bool,
) -> pd.DataFrame:
    """Raises on the first bad row (strict) or drops the bad rows and counts them (lenient).

    ``df`` must carry the ``_source`` and ``_line`` bookkeeping columns.
    """
    bad = np.asarray(bad, dtype=bool)
    if not bad.any():
        return df
    if not lenient:
        first = int(np.flatnonzero(bad)[0])
        row = df.iloc[first]
        raise DataError(
            str(row[SOURCE_COLUMN]),
            int(row[LINE_COLUMN]),
            f"{reason.replace('_', ' ')} (pass lenient=True to skip and count such rows)",
        )
    report.skip(reason, int(bad.sum()))
    return df.loc[~bad].reset_index(drop=True)


def str_column(values: Any) -> pd.Series:
    """A str column with nulls replaced by "" (review text and titles may be absent)."""
    s = values.reset_index(drop=True) if isinstance(values, pd.Series) else pd.Series(values)
    if s.dtype != "str":
        s = s.astype("str")
    return s.fillna("")


def list_column(values: Any) -> pd.Series:
    """A list-of-str column (Arrow-backed); nulls become empty lists."""
    arr = values
    if isinstance(arr, pd.Series):
        arr = pa.array(arr, type=pa.list_(pa.string()), from_pandas=True)
    elif not isinstance(arr, (pa.Array, pa.ChunkedArray)):
        arr = pa.array(list(arr), type=pa.list_(pa.string()))
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = arr.cast(pa.list_(pa.string()))
    if arr.null_count:
        empty = pa.array([[]], type=pa.list_(pa.string()))[0]
        arr = arr.fill_null(empty)
    return pd.Series(arr, dtype=LIST_OF_STR)


def arrow_lists(column: pd.Series) -> pa.ListArray:
    """A list-of-str column as one contiguous Arrow array (for vectorized list operations)."""
    arr = pa.array(column.array, type=pa.list_(pa.string()), from_pandas=True)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr


def empty_lists(n: int) -> pd.Series:
    """``n`` empty lists as a list-of-str column, without building ``n`` Python lists."""
    arr = pa.ListArray.from_arrays(
        pa.array(np.zeros(n + 1, dtype=np.int32)), pa.array([], type=pa.string())
    )
    return pd.Series(arr, dtype=LIST_OF_STR)


def empty_items() -> pd.DataFrame:
    """An item table with no rows (a dataset shipped without metadata)."""
    return pd.DataFrame(
        {
            "item_id": pd.Series([], dtype="str"),
            "title": pd.Series([], dtype="str"),
            "categories": empty_lists(0),
            "text": pd.Series([], dtype="str"),
        }
    )


def source_column(name: str, n: int) -> pd.Categorical:
    """The ``_source`` bookkeeping column: one byte per row, not one string per row."""
    return pd.Categorical.from_codes(np.zeros(n, dtype=np.int8), categories=[str(name)])


def sorted_codes(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of string ``values`` ranked by the sorted distinct values.

    Hashing in Arrow and sorting only the distinct values is much cheaper than sorting
    millions of strings, and ordering by code is ordering by value.
    """
    encoded = pc.dictionary_encode(values)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.unify_dictionaries().combine_chunks() if encoded.num_chunks else None
    if encoded is None or len(encoded) == 0:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=object)
    dictionary = encoded.dictionary.to_numpy(zero_copy_only=False).astype(object)
    order = np.argsort(dictionary, kind="stable")
    # int32 codes: half the memory of int64 for 20M-row columns (fewer than 2**31 values).
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    return rank[encoded.indices.to_numpy(zero_copy_only=False)], dictionary[order]


def finalize_interactions(
    df: pd.DataFrame, report: ParseReport, lenient: bool, users_seen: int | None = None
) -> pd.DataFrame:
    """Sorts by (user_id, timestamp, item_id), drops duplicates and fixes dtypes.

    A row with the same user, item and timestamp as an earlier line is a duplicate, in strict
    mode too (official releases have them: 68 exact duplicate lines in the Amazon 2018 Fashion
    5-core file). The first line is kept; the others are counted in ``report`` as
    ``duplicate_row`` (every field equal) or ``conflicting_duplicate_row`` (another rating,
    text, ...), never dropped silently.

    ``users_seen`` (distinct users in the raw rows) lets the report count users that lost every
    interaction to skipped rows.

    Memory: ``df`` is consumed (its columns are popped one at a time and each is gathered once
    into the output), so at no point do two full copies of the table exist; this is what keeps
    MovieLens-20M within a few GB.
    """
    user_codes, _ = sorted_codes(pa.array(df["user_id"].array, type=pa.string()))
    item_codes, _ = sorted_codes(pa.array(df["item_id"].array, type=pa.string()))
    ts = df["timestamp"].to_numpy(dtype=np.int64)
    # Stable on the original row order, so among duplicates the first line comes first.
    order = np.lexsort((item_codes, ts, user_codes))
    u, i, t = user_codes[order], item_codes[order], ts[order]
    del user_codes, item_codes
    dup = np.zeros(len(order), dtype=bool)
    dup[1:] = (u[1:] == u[:-1]) & (i[1:] == i[:-1]) & (t[1:] == t[:-1])
    del u, i, t
    if dup.any():
        exact = _same_content(df, order, dup)
        report.skip("duplicate_row", int(exact.sum()))
        report.skip("conflicting_duplicate_row", int((~exact).sum()))
        order = order[~dup]
    del dup
    n = len(order)
    indices = pa.array(order)

    def gather(name: str, convert):
        if name not in df:
            return None
        col = df.pop(name)
        arr = pa.array(col.array, from_pandas=True)
        del col
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        return convert(arr.take(indices))

    def as_str(arr):
        return str_column(pd.Series(arr.cast(pa.string()), dtype="str"))

    out = {
        "user_id": gather("user_id", as_str),
        "item_id": gather("item_id", as_str),
        "timestamp": ts[order],
        "rating": gather("rating", lambda a: a.to_numpy(zero_copy_only=False).astype(np.float32)),
        "categories": gather("categories", list_column),
        "review_title": gather("review_title", as_str),
        "review_text": gather("review_text", as_str),
    }
    del ts, order
    df.drop(columns=list(df.columns), inplace=True)
    for name in ("review_title", "review_text"):
        if out[name] is None:
            out[name] = empty(n)
    if out["categories"] is None:
        out["categories"] = empty_lists(n)
    out = pd.DataFrame(out)
    if users_seen is not None:
        report.users_without_interactions = int(users_seen - out["user_id"].nunique())
    if out.empty:
        raise DataError(", ".join(report.files) or "<input>", None, "no usable interactions")
    return out


def _same_content(df: pd.DataFrame, order: np.ndarray, dup: np.ndarray) -> np.ndarray:
    """For each duplicate (``dup`` over rows in ``order``), whether every field equals the
    kept first line of its key (bookkeeping columns aside)."""
    positions = np.arange(len(order))
    kept = np.maximum.accumulate(np.where(dup, 0, positions))
    rows, firsts = order[dup], order[kept[dup]]
    same = np.ones(len(rows), dtype=bool)
    for column in df.columns:
        if column in (SOURCE_COLUMN, LINE_COLUMN):
            continue
        values = df[column]
        pairs = zip(values.iloc[rows].tolist(), values.iloc[firsts].tolist(), strict=True)
        same &= np.fromiter((_equal_values(a, b) for a, b in pairs), bool, len(rows))
    return same


def _equal_values(a: Any, b: Any) -> bool:
    """Field equality for scalars (NaN equals NaN), strings, lists and arrays."""
    try:
        if np.ndim(a) == 0 and np.ndim(b) == 0:
            return bool(a == b) or bool(pd.isna(a) and pd.isna(b))
        return np.shape(a) == np.shape(b) and bool(np.all(np.asarray(a) == np.asarray(b)))
    except (TypeError, ValueError):  # ragged or incomparable: not provably the same
        return False


def empty(n: int) -> pd.Series:
    """``n`` empty strings as a str column (cheap: Arrow, not ``n`` Python objects)."""
    return pd.Series(pa.nulls(n, pa.string()).fill_null(""), dtype="str")


def attach_item_categories(interactions: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """Copies each item's categories onto its interaction rows (empty for unknown items)."""
    codes = pd.Index(items["item_id"]).get_indexer(interactions["item_id"])
    cats = arrow_lists(items["categories"]) if len(items) else None
    if cats is None or (codes < 0).all():
        interactions["categories"] = empty_lists(len(interactions))
        return interactions
    # Index -1 (no metadata) -> a trailing empty list.
    cats = pa.concat_arrays([cats, pa.array([[]], type=pa.list_(pa.string()))])
    codes = np.where(codes < 0, len(cats) - 1, codes)
    interactions["categories"] = list_column(cats.take(pa.array(codes)))
    return interactions


def finalize_items(df: pd.DataFrame) -> pd.DataFrame:
    """Dtypes, one row per item (first occurrence wins) and a stable order."""
    df = df.drop_duplicates("item_id", keep="first")
    out = pd.DataFrame(
        {
            "item_id": str_column(df["item_id"].to_numpy()),
            "title": str_column(df["title"].to_numpy()),
            "categories": list_column(df["categories"]),
            "text": str_column(df["text"].to_numpy()) if "text" in df else empty(len(df)),
        }
    )
    return out.sort_values("item_id", kind="stable").reset_index(drop=True)


def add_missing_items(
    items: pd.DataFrame, interactions: pd.DataFrame, report: ParseReport
) -> pd.DataFrame:
    """Adds items that have interactions but no metadata (id kept, empty title) and counts them."""
    missing = pd.Index(interactions["item_id"].unique()).difference(pd.Index(items["item_id"]))
    report.items_without_metadata = int(len(missing))
    if len(missing) == 0:
        return items
    extra = pd.DataFrame(
        {
            "item_id": str_column(np.asarray(missing, dtype=object)),
            "title": empty(len(missing)),
            "categories": empty_lists(len(missing)),
            "text": empty(len(missing)),
        }
    )
    return finalize_items(pd.concat([items, extra], ignore_index=True))
