"""Amazon Reviews (McAuley Lab) 2018 and 2023 releases into the common tables.

A data_dir is one review file or a folder of ``<Category>.jsonl`` (or ``.json``, ``.gz``) review
files with optional ``meta_<Category>.jsonl`` metadata; several categories load at once and a
user's interactions across them form one history. The release is detected per file:
- 2023 reviews ``{rating, title, text, asin, parent_asin, user_id, timestamp (ms)}``; the item id
  is ``parent_asin`` (the product, not its variant). Meta ``{parent_asin, title, main_category,
  categories, description}``; categories = ``categories``, or ``[main_category]`` when empty.
- 2018 reviews ``{reviewerID, asin, overall, unixReviewTime (s), reviewText, summary}``; meta
  ``{asin, title, category, description}``.
Items without metadata keep their id with an empty title (counted in the report).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa

from user_llm.data.readers._io import read_json_lines
from user_llm.data.readers._reviews import (
    assemble,
    categories_or_main,
    column,
    discover,
    first_record_keys,
    join_text_lists,
    reviews_frame,
)
from user_llm.data.tables import DataError, ParseReport

RATING_RANGE = (1.0, 5.0)
_S = pa.string()
_LIST = pa.list_(pa.string())
REVIEWS_2023 = pa.schema(
    [
        ("user_id", _S),
        ("parent_asin", _S),
        ("rating", pa.float64()),
        ("timestamp", pa.int64()),
        ("title", _S),
        ("text", _S),
    ]
)
REVIEWS_2018 = pa.schema(
    [
        ("reviewerID", _S),
        ("asin", _S),
        ("overall", pa.float64()),
        ("unixReviewTime", pa.int64()),
        ("summary", _S),
        ("reviewText", _S),
    ]
)
META_2023 = pa.schema(
    [
        ("parent_asin", _S),
        ("title", _S),
        ("main_category", _S),
        ("categories", _LIST),
        ("description", _LIST),
    ]
)
META_2018 = pa.schema([("asin", _S), ("title", _S), ("category", _LIST), ("description", _LIST)])


def _review_group(stem: str) -> str | None:
    return None if stem.startswith("meta_") else stem


def _meta_group(stem: str) -> str | None:
    return stem[len("meta_") :] if stem.startswith("meta_") else None


def read_amazon(
    data_dir: str | Path,
    *,
    categories: Sequence[str] | None = None,
    with_meta: bool = True,
    lenient: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame, ParseReport]:
    """Reads Amazon review files (one file, or every category in a folder, or ``categories``).

    Returns (interactions, items, report); timestamps are converted to unix seconds.
    """
    reviews, metas = discover(data_dir, _review_group, _meta_group, categories)
    report = ParseReport()
    frames, item_frames, users_seen, releases = [], [], set(), set()
    for group, path in reviews.items():
        keys = first_record_keys(path, lenient)
        release = "2018" if "reviewerID" in keys else "2023"
        releases.add(release)
        report.files.append(str(path))
        skipped = report.num_skipped
        if release == "2023":
            table = read_json_lines(path, REVIEWS_2023, report, lenient)
            names = dict(user="user_id", item="parent_asin", rating="rating")
            names |= dict(timestamp="timestamp", timestamp_divisor=1000, title="title", text="text")
        else:
            table = read_json_lines(path, REVIEWS_2018, report, lenient)
            names = dict(user="reviewerID", item="asin", rating="overall")
            names |= dict(timestamp="unixReviewTime", timestamp_divisor=1, title="summary")
            names |= dict(text="reviewText")
        report.rows_read += table.num_rows + report.num_skipped - skipped
        df, seen = reviews_frame(
            table, path, rating_range=RATING_RANGE, report=report, lenient=lenient, **names
        )
        frames.append(df)
        users_seen |= seen
        if with_meta and group in metas:
            item_frames.append(_read_meta(metas[group], report, lenient))
    report.variant = "+".join(sorted(releases))
    return assemble(frames, item_frames, users_seen, report, lenient)


def _read_meta(path: Path, report: ParseReport, lenient: bool) -> pd.DataFrame:
    keys = first_record_keys(path, lenient)
    report.files.append(str(path))
    if "parent_asin" in keys:
        table = read_json_lines(path, META_2023, report, lenient)
        item, cats = "parent_asin", categories_or_main(table["categories"], table["main_category"])
    elif "asin" in keys:
        table = read_json_lines(path, META_2018, report, lenient)
        item, cats = "asin", categories_or_main(table["category"], None)
    else:
        raise DataError(str(path), 1, "metadata lines need 'parent_asin' (2023) or 'asin' (2018)")
    report.meta_rows_read += table.num_rows
    df = pd.DataFrame(
        {
            "item_id": column(table, item),
            "title": column(table, "title"),
            "categories": pd.Series(cats, dtype=pd.ArrowDtype(_LIST)),
            "text": join_text_lists(table["description"]),
        }
    )
    return df[df["item_id"].notna()]
