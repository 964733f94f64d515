"""Raw release files -> (interactions, items, report) in the common schema of ``tables.py``.

``load("movielens" | "amazon_reviews" | "google_local", data_dir, **kw)`` is the one entry point
the rest of the code base uses; each dataset's reader documents its own keyword arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from user_llm.data.readers.amazon import read_amazon
from user_llm.data.readers.download import MOVIELENS_MD5, fetch_movielens
from user_llm.data.readers.google_local import read_google_local
from user_llm.data.readers.movielens import read_movielens
from user_llm.data.tables import DataError, ParseReport

DATASETS = ("movielens", "amazon_reviews", "google_local")

# What every ``load`` of this process read and dropped, for the run's records
# (``user_llm.train`` writes it to ``MODEL_DIR/data_report.json``).
LOADED: list[dict[str, Any]] = []

__all__ = [
    "DATASETS",
    "DataError",
    "ParseReport",
    "fetch_movielens",
    "load",
    "read_amazon",
    "read_google_local",
    "read_movielens",
]


def load(
    dataset: str, data_dir: str | Path | None = None, **kw: Any
) -> tuple[pd.DataFrame, pd.DataFrame, ParseReport]:
    """Reads a dataset's release files into (interactions, items, report).

    For MovieLens, ``data_dir`` may be omitted (the bundled ml-latest-small) or be a release
    name such as ``"ml-1m"`` that is not a local path: it is then fetched from GroupLens into
    the cache (``cache_dir=...``), see ``download.fetch_movielens``.
    """
    if dataset == "movielens":
        cache_dir = kw.pop("cache_dir", None)
        if data_dir is not None and not Path(data_dir).exists() and str(data_dir) in MOVIELENS_MD5:
            data_dir = fetch_movielens(str(data_dir), cache_dir)
        out = read_movielens(data_dir, **kw)
    elif data_dir is None:
        raise ValueError(f"{dataset} needs data_dir (a folder of release files or one file)")
    elif dataset == "amazon_reviews":
        out = read_amazon(data_dir, **kw)
    elif dataset == "google_local":
        out = read_google_local(data_dir, **kw)
    else:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    LOADED.append({"dataset": dataset, "lenient": bool(kw.get("lenient")), **out[2].to_dict()})
    return out
