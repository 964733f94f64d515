"""MovieLens ratings and movies (GroupLens releases) into the common tables.

Variants, detected from the files present in a folder or in the release .zip itself:
- ``csv``: ml-latest-small, ml-latest, ml-20m, ml-25m (``ratings.csv``, ``movies.csv``; genres
  ``|``-separated, ``(no genres listed)`` = none; titles quoted CSV).
- ``dat``: ml-1m and ml-10m (``ratings.dat``, ``movies.dat``, ``::``-separated, latin-1).
- ``100k``: ml-100k (``u.data`` tab-separated; ``u.item`` ``|``-separated latin-1 with 19 genre
  flags named by ``u.genre``; the ``unknown`` genre counts as none, like ``(no genres listed)``).

Item ids are the MovieLens movie ids as strings; timestamps are unix seconds; ratings 0.5..5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from user_llm.data import tables
from user_llm.data.readers._io import decode_text, read_delimited, strip_bad_utf8
from user_llm.data.readers._source import FileSource

BUNDLED_ZIP = Path(__file__).resolve().parents[1] / "bundled" / "ml-latest-small.zip"
RATING_RANGE = (0.5, 5.0)
NO_GENRE = ("(no genres listed)", "unknown")

_VARIANT_FILES = {
    "csv": ("ratings.csv", "movies.csv"),
    "dat": ("ratings.dat", "movies.dat"),
    "100k": ("u.data", "u.item"),
}
_RATING_TYPES = {
    "user": pa.int64(),
    "item": pa.int64(),
    "rating": pa.float64(),
    "timestamp": pa.int64(),
}


def detect_variant(source: FileSource) -> str:
    """Which release layout ``source`` holds (``csv``, ``dat`` or ``100k``)."""
    for variant, files in _VARIANT_FILES.items():
        if all(source.find(f) for f in files):
            return variant
    raise tables.DataError(
        str(source.root),
        None,
        "no MovieLens files found: expected ratings.csv + movies.csv (ml-latest*, ml-20m, "
        "ml-25m), ratings.dat + movies.dat (ml-1m) or u.data + u.item (ml-100k)",
    )


def read_movielens(
    data_dir: str | Path | None = None, *, lenient: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame, tables.ParseReport]:
    """Reads a MovieLens release (folder or .zip; default: the bundled ml-latest-small.zip).

    Returns (interactions, items, report). Items hold every movie in the movies file, rated or
    not; rated movies missing from it get an empty title and are counted in the report.
    """
    source = FileSource(BUNDLED_ZIP if data_dir is None else data_dir)
    variant = detect_variant(source)
    report = tables.ParseReport(variant=variant)
    ratings_name, movies_name = (source.find(f) for f in _VARIANT_FILES[variant])
    report.files = [source.display(ratings_name), source.display(movies_name)]
    items = _read_movies(source, movies_name, variant, report, lenient)
    interactions = _read_ratings(source, ratings_name, variant, report, lenient)
    interactions = tables.attach_item_categories(interactions, items)
    items = tables.add_missing_items(items, interactions, report)
    return interactions, items, report


def _read_ratings(source, name, variant, report, lenient) -> pd.DataFrame:
    display = source.display(name)
    data = source.read(name)
    skipped_before = report.num_skipped
    # Ratings are ASCII in every release: a line with invalid UTF-8 is a bad line.
    data = strip_bad_utf8(data, display, 1, report, lenient)
    if variant == "csv":
        table = read_delimited(
            data, display, list(_RATING_TYPES), _RATING_TYPES, report, lenient, header=True
        )
    else:  # "dat" (1M/10M/20M, "::"-separated) and "100k" (tab-separated u.data)
        if variant == "dat":
            data = data.replace(b"::", b"\t")
        table = read_delimited(
            data,
            display,
            list(_RATING_TYPES),
            _RATING_TYPES,
            report,
            lenient,
            delimiter="\t",
            header=False,
            quoting=False,
        )
    report.rows_read += table.num_rows + report.num_skipped - skipped_before
    del data  # the raw file (hundreds of MB for ml-20m) is no longer needed
    df = pd.DataFrame(
        {
            "user_id": pc.cast(table["user"], pa.string()).to_pandas(),
            "item_id": pc.cast(table["item"], pa.string()).to_pandas(),
            "rating": table["rating"].to_numpy(),
            "timestamp": table["timestamp"].to_numpy(),
            "_source": tables.source_column(display, table.num_rows),
            "_line": table["_line"].to_numpy(),
        }
    )
    del table
    users_seen = df["user_id"].nunique()
    lo, hi = RATING_RANGE
    rating = df["rating"].to_numpy()
    df = tables.reject_rows(
        df, (rating < lo) | (rating > hi), "rating_out_of_range", report, lenient
    )
    df = tables.reject_rows(
        df, tables.bad_timestamps(df["timestamp"]), tables.TIMESTAMP_RANGE, report, lenient
    )
    return tables.finalize_interactions(df, report, lenient, users_seen=users_seen)


def _read_movies(source, name, variant, report, lenient) -> pd.DataFrame:
    display = source.display(name)
    data = source.read(name)
    cols = ["item", "title", "genres"]
    types = {"item": pa.int64(), "title": pa.string(), "genres": pa.string()}
    options: dict[str, Any] = {"delimiter": "\t", "header": False, "quoting": False}
    if variant == "csv":
        data = strip_bad_utf8(data, display, 1, report, lenient)
        options = {"header": True}
    elif variant == "dat":
        data = decode_text(data).encode("utf-8").replace(b"::", b"\t")
    else:  # 100k's u.item: '|'-separated, one 0/1 column per genre
        genre_names = _read_100k_genres(source)
        flags = [f"g{i}" for i in range(len(genre_names))]
        cols = ["item", "title", "release", "video_release", "url", *flags]
        types = {"item": pa.int64(), "title": pa.string()} | {f: pa.int64() for f in flags}
        data = decode_text(data).encode("utf-8")
        options["delimiter"] = "|"
    table = read_delimited(data, display, cols, types, report, lenient, **options)
    if variant in ("csv", "dat"):
        genres = split_genres(table["genres"], "|")
    else:
        matrix = np.stack([table[f].to_numpy() for f in flags], axis=1) if flags else None
        genres = genres_from_flags(matrix, genre_names)
    report.meta_rows_read += table.num_rows
    df = pd.DataFrame(
        {
            "item_id": pc.cast(table["item"], pa.string()).to_pandas(),
            "title": table["title"].to_pandas(),
            "categories": pd.Series(genres, dtype=pd.ArrowDtype(genres.type)),
            "text": "",
        }
    )
    return tables.finalize_items(df)


def split_genres(column: pa.ChunkedArray | pa.Array, sep: str) -> pa.ListArray:
    """``"A|B"`` -> ``["A", "B"]``, dropping empty names and the releases' "no genre" markers."""
    lists = pc.split_pattern(column, sep)
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    flat = pc.utf8_trim_whitespace(lists.flatten())
    parents = pc.list_parent_indices(lists).to_numpy()
    keep = ~np.isin(flat.to_numpy(zero_copy_only=False), [*NO_GENRE, ""])
    counts = np.bincount(parents[keep], minlength=len(lists))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), flat.filter(pa.array(keep)))


def genres_from_flags(matrix: np.ndarray | None, names: list[str]) -> pa.ListArray:
    """A 0/1 genre-flag matrix (ml-100k ``u.item``) -> lists of genre names."""
    if matrix is None:
        return pa.array([], type=pa.list_(pa.string()))
    names_arr = np.asarray(names, dtype=object)
    on = (matrix > 0) & ~np.isin(names_arr, NO_GENRE)[None, :]
    rows, cols = np.nonzero(on)
    offsets = np.concatenate([[0], np.cumsum(on.sum(axis=1))]).astype(np.int32)
    values = pa.array(names_arr[cols].tolist(), type=pa.string())
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _read_100k_genres(source: FileSource) -> list[str]:
    name = source.find("u.genre")
    if name is None:
        raise tables.DataError(str(source.root), None, "ml-100k layout without u.genre")
    names: dict[int, str] = {}
    for i, line in enumerate(decode_text(source.read(name)).splitlines(), start=1):
        if not line.strip():
            continue
        genre, _, index = line.rpartition("|")
        if not index.strip().isdigit():
            raise tables.DataError(
                source.display(name), i, f"expected 'name|index', got {tables.shown(line)}"
            )
        names[int(index)] = genre
    if sorted(names) != list(range(len(names))):
        raise tables.DataError(source.display(name), None, "genre indices are not 0..n-1")
    return [names[i] for i in range(len(names))]
