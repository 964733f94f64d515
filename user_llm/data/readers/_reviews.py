"""What the JSON-lines review readers (Amazon, Google Local) share: finding the review and
metadata files of several categories / states, and turning parsed columns into the tables."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from user_llm.data.readers._io import DECOMPRESSION_ERRORS, corrupt_file, open_binary
from user_llm.data.tables import (
    TIMESTAMP_RANGE,
    DataError,
    ParseReport,
    add_missing_items,
    attach_item_categories,
    bad_timestamps,
    empty_items,
    finalize_interactions,
    finalize_items,
    reject_rows,
    source_column,
)

_EXTENSIONS = re.compile(r"\.(jsonl|json)(\.gz)?$|\.gz$")


def strip_extensions(name: str) -> str:
    """``meta_Books.jsonl.gz`` -> ``meta_Books``."""
    return _EXTENSIONS.sub("", name)


def is_json_lines_file(path: Path) -> bool:
    return path.is_file() and bool(_EXTENSIONS.search(path.name))


def discover(
    data_dir: str | Path,
    review_key: Callable[[str], str | None],
    meta_key: Callable[[str], str | None],
    wanted: Sequence[str] | None,
) -> tuple[dict[str, Path], dict[str, Path]]:
    """Review and metadata files per group (category or state) in a folder, or one file.

    ``review_key`` / ``meta_key`` map a file name (extensions stripped) to its group name or None.
    """
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    paths = [root] if root.is_file() else sorted(p for p in root.iterdir() if is_json_lines_file(p))
    reviews: dict[str, Path] = {}
    metas: dict[str, Path] = {}
    for p in paths:
        stem = strip_extensions(p.name)
        group = meta_key(stem)
        if group is not None:
            metas.setdefault(group, p)
            continue
        group = review_key(stem)
        if group is not None:
            reviews.setdefault(group, p)
    if wanted is not None:
        missing = sorted(set(wanted) - set(reviews))
        if missing:
            raise FileNotFoundError(
                f"no review file for {missing} in {root}; found {sorted(reviews)}"
            )
        reviews = {g: reviews[g] for g in wanted}
        metas = {g: metas[g] for g in wanted if g in metas}
    if not reviews:
        raise FileNotFoundError(f"no review files (.json, .jsonl or .gz) in {root}")
    return reviews, metas


def first_record_keys(path: Path, lenient: bool = False) -> set[str]:
    """Keys of the first JSON object in a file (to tell release formats apart). A bad line
    before it stops a strict read; a lenient one looks past it (the parse counts it)."""
    import json

    with open_binary(path) as f:
        i, lines = 0, iter(f)
        while True:
            try:
                raw = next(lines, None)
            except DECOMPRESSION_ERRORS as e:
                raise corrupt_file(path, i + 1, e) from None
            if raw is None:
                break
            i += 1
            if raw.strip():
                try:
                    obj = json.loads(raw)
                except ValueError as e:
                    if lenient:
                        continue
                    raise DataError(str(path), i, f"malformed JSON ({e})") from None
                if isinstance(obj, dict):
                    return set(obj)
                if not lenient:
                    raise DataError(str(path), i, "a JSON line that is not an object")
    return set()


def column(table: pa.Table, name: str) -> np.ndarray:
    """A column as numpy (object for strings, float with NaN for missing numbers)."""
    arr = table[name]
    if pa.types.is_string(arr.type):
        return arr.to_numpy(zero_copy_only=False)
    if pa.types.is_integer(arr.type):
        return arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
    return arr.to_numpy(zero_copy_only=False)


def reviews_frame(
    table: pa.Table,
    path: Path,
    *,
    user: str,
    item: str,
    rating: str,
    timestamp: str,
    timestamp_divisor: int,
    title: str | None,
    text: str | None,
    rating_range: tuple[float, float],
    report: ParseReport,
    lenient: bool,
) -> tuple[pd.DataFrame, set]:
    """Validated interaction rows of one review file (bookkeeping columns kept)."""
    n = table.num_rows
    df = pd.DataFrame(
        {
            "user_id": column(table, user),
            "item_id": column(table, item),
            "rating": column(table, rating),
            "timestamp": column(table, timestamp),
            "review_title": column(table, title) if title else np.full(n, "", dtype=object),
            "review_text": column(table, text) if text else np.full(n, "", dtype=object),
            "_source": source_column(str(path), n),
            "_line": table["_line"].to_numpy(),
        }
    )
    users_seen = set(pd.unique(df["user_id"].dropna()))
    fields = {"user_id": user, "item_id": item, "rating": rating, "timestamp": timestamp}
    for name, field in fields.items():
        col = df[name]
        bad = np.array(col.isna().to_numpy(), dtype=bool)
        if name in ("user_id", "item_id"):
            bad |= (col.fillna("").astype(str).str.strip() == "").to_numpy()
        df = reject_rows(df, bad, f"missing_{field}", report, lenient)
    lo, hi = rating_range
    r = df["rating"].to_numpy()
    df = reject_rows(df, (r < lo) | (r > hi), "rating_out_of_range", report, lenient)
    ts = df["timestamp"].to_numpy()
    # A fractional raw value is bad (-1); milliseconds become whole seconds.
    seconds = np.where(ts == np.floor(ts), np.floor(ts / timestamp_divisor), -1)
    df = reject_rows(df, bad_timestamps(seconds), TIMESTAMP_RANGE, report, lenient)
    df["timestamp"] = df["timestamp"].to_numpy().astype(np.int64) // timestamp_divisor
    return df, users_seen


def assemble(
    frames: list[pd.DataFrame],
    item_frames: list[pd.DataFrame],
    users_seen: set,
    report: ParseReport,
    lenient: bool,
) -> tuple[pd.DataFrame, pd.DataFrame, ParseReport]:
    """Concatenates per-file rows into the final (interactions, items, report)."""
    df = pd.concat(frames, ignore_index=True)
    interactions = finalize_interactions(df, report, lenient, users_seen=len(users_seen))
    if item_frames:
        items = finalize_items(pd.concat(item_frames, ignore_index=True))
    else:
        items = empty_items()
    # Metadata for items nobody reviewed is kept (it is part of the catalogue).
    interactions = attach_item_categories(interactions, items)
    items = add_missing_items(items, interactions, report)
    return interactions, items, report


def join_text_lists(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Lists of paragraphs (or null) -> one string each (item descriptions), vectorized."""
    joined = pc.binary_join(values, " ").fill_null("")
    return joined.to_numpy(zero_copy_only=False)


def categories_or_main(lists: pa.ChunkedArray, main: pa.ChunkedArray | None) -> pa.Array:
    """An item's category list, or ``[main]`` where the list is empty and ``main`` is set."""
    lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    lists = lists.fill_null(pa.scalar([], type=pa.list_(pa.string())))
    if main is None:
        return lists
    main = main.combine_chunks() if isinstance(main, pa.ChunkedArray) else main
    has_main = pc.and_(pc.is_valid(main), pc.not_equal(pc.utf8_length(main.fill_null("")), 0))
    use_main = pc.and_(pc.equal(pc.list_value_length(lists), 0), has_main)
    singles = pa.ListArray.from_arrays(
        pa.array(np.arange(len(main) + 1, dtype=np.int32)), main.fill_null("")
    )
    return pc.if_else(use_main, singles, lists)
