"""Google Local Reviews (2021 release, Li et al.) into the common tables.

A data_dir is one review file or a folder of ``review-<State>.json.gz`` files with optional
``meta-<State>.json.gz`` metadata (plain ``.json``/``.jsonl`` also accepted); several states load
at once. Reviews ``{user_id, name, time (ms), rating, text, pics, resp, gmap_id}``; the item is
the place (``gmap_id``). Meta ``{name, gmap_id, description, category: [...], ...}`` gives the
place name as title, its categories and description. Places without metadata keep their id
with an empty title (counted in the report). Null review text is an empty string.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from user_llm.data.readers._io import read_json_lines
from user_llm.data.readers._reviews import (
    assemble,
    categories_or_main,
    column,
    discover,
    reviews_frame,
)
from user_llm.data.tables import ParseReport

RATING_RANGE = (1.0, 5.0)
_S = pa.string()
_LIST = pa.list_(pa.string())
REVIEWS = pa.schema(
    [
        ("user_id", _S),
        ("gmap_id", _S),
        ("rating", pa.float64()),
        ("time", pa.int64()),
        ("text", _S),
    ]
)
META = pa.schema([("gmap_id", _S), ("name", _S), ("category", _LIST), ("description", _S)])


def _review_group(stem: str) -> str | None:
    if stem.startswith("meta-"):
        return None
    return stem[len("review-") :] if stem.startswith("review-") else stem


def _meta_group(stem: str) -> str | None:
    return stem[len("meta-") :] if stem.startswith("meta-") else None


def read_google_local(
    data_dir: str | Path,
    *,
    states: Sequence[str] | None = None,
    with_meta: bool = True,
    lenient: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame, ParseReport]:
    """Reads Google Local review files (one file, every state in a folder, or ``states``).

    Returns (interactions, items, report); timestamps are converted to unix seconds.
    """
    reviews, metas = discover(data_dir, _review_group, _meta_group, states)
    report = ParseReport(variant="google_local_2021")
    frames, item_frames, users_seen = [], [], set()
    for group, path in reviews.items():
        report.files.append(str(path))
        skipped = report.num_skipped
        table = read_json_lines(path, REVIEWS, report, lenient)
        report.rows_read += table.num_rows + report.num_skipped - skipped
        df, seen = reviews_frame(
            table,
            path,
            user="user_id",
            item="gmap_id",
            rating="rating",
            timestamp="time",
            timestamp_divisor=1000,
            title=None,
            text="text",
            rating_range=RATING_RANGE,
            report=report,
            lenient=lenient,
        )
        frames.append(df)
        users_seen |= seen
        if with_meta and group in metas:
            item_frames.append(_read_meta(metas[group], report, lenient))
    return assemble(frames, item_frames, users_seen, report, lenient)


def _read_meta(path: Path, report: ParseReport, lenient: bool) -> pd.DataFrame:
    report.files.append(str(path))
    table = read_json_lines(path, META, report, lenient)
    report.meta_rows_read += table.num_rows
    text = table["description"].fill_null("").to_numpy(zero_copy_only=False)
    df = pd.DataFrame(
        {
            "item_id": column(table, "gmap_id"),
            "title": column(table, "name"),
            "categories": pd.Series(
                categories_or_main(table["category"], None), dtype=pd.ArrowDtype(_LIST)
            ),
            "text": np.asarray(text, dtype=object),
        }
    )
    return df[df["item_id"].notna()]
