r"""Prints one JSON line of dataset statistics, as parsed (before any history filtering).

  python -m user_llm.data.stats --dataset=movielens            # bundled ml-latest-small
  python -m user_llm.data.stats --dataset=amazon_reviews \
      --data_dir=../shared/data/amazon_reviews_2023

For ml-latest-small: num_interactions 100836, num_users 610, num_items 9742 (movies in
movies.csv; num_rated_items 9724 of them are rated).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import pandas as pd

from user_llm.data import readers


def dataset_stats(interactions: pd.DataFrame, items: pd.DataFrame) -> dict[str, Any]:
    """Counts and per-user history-length percentiles (p5, p25, p50, p75, p95, max)."""
    lengths = interactions.groupby("user_id", sort=False).size().to_numpy()
    pct = np.percentile(lengths, [5, 25, 50, 75, 95]) if len(lengths) else [0] * 5
    ts = interactions["timestamp"]
    return {
        "num_interactions": int(len(interactions)),
        "num_users": int(len(lengths)),
        "num_items": int(len(items)),
        "num_rated_items": int(interactions["item_id"].nunique()),
        "history_length": {
            **{f"p{p}": round(float(v), 2) for p, v in zip((5, 25, 50, 75, 95), pct, strict=True)},
            "max": int(lengths.max()) if len(lengths) else 0,
        },
        "first_timestamp": int(ts.min()) if len(ts) else None,
        "last_timestamp": int(ts.max()) if len(ts) else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, choices=readers.DATASETS)
    parser.add_argument("--data_dir", default=None, help="folder or file; MovieLens: .zip too")
    parser.add_argument("--lenient", action="store_true", help="skip and count bad rows")
    args = parser.parse_args(argv)
    try:
        interactions, items, report = readers.load(
            args.dataset, args.data_dir, lenient=args.lenient
        )
    except (readers.DataError, FileNotFoundError, ConnectionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stats = {"dataset": args.dataset, "variant": report.variant}
    stats |= dataset_stats(interactions, items)
    stats |= {
        "rows_skipped": report.rows_skipped,
        "items_without_metadata": report.items_without_metadata,
    }
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
