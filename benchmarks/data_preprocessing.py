"""Data preprocessing cost: wall time and peak memory of reading and history building.

(a) ``--part small``: ml-latest-small end to end (reader, histories, and the first batches of
    ``movielens_next_item_userllm_h50`` through the User-LLM feature converter).
(b) ``--part synthetic``: a generated MovieLens-20M-sized release (``--num_ratings`` ratings,
    138k users, 27k movies, ml-20m CSV layout) written to a temp dir in chunks, then read and
    turned into histories. Goal: under 3 minutes and under 6 GB on 2 cores.

Each part runs in its own interpreter (``--part all`` spawns them), so one part's imports and
garbage do not inflate the other's peak RSS. Usage:

    python benchmarks/data_preprocessing.py --part all --num_ratings 20000000
    python benchmarks/data_preprocessing.py --part synthetic --num_ratings 2000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
_GENRE_TEXT = (
    "Action Adventure Animation Children Comedy Crime Documentary Drama Fantasy Film-Noir "
    "Horror IMAX Musical Mystery Romance Sci-Fi Thriller War Western"
)
GENRES = tuple(_GENRE_TEXT.split())


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_rss_gb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return float("nan")


def generate_movielens(
    folder: Path, num_ratings: int, num_users: int, num_movies: int, seed: int = 0
) -> None:
    """ml-20m-layout ``ratings.csv`` + ``movies.csv`` with skewed user activity and Zipf-like
    movie popularity, written in chunks of users so memory stays small."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.arange(1, num_movies + 1)
    genre_idx = rng.integers(0, len(GENRES), (num_movies, 3))
    n_genres = rng.integers(1, 4, num_movies)
    genres = [
        "|".join(GENRES[g] for g in row[:k]) for row, k in zip(genre_idx, n_genres, strict=True)
    ]
    titles = [f"Movie {i}, The ({1920 + i % 100})" for i in ids]
    pcsv.write_csv(
        pa.table({"movieId": ids, "title": titles, "genres": genres}), folder / "movies.csv"
    )
    # Per-user counts: at least 20 (as in ml-20m), heavy-tailed, summing to num_ratings.
    min_count = min(20, max(num_ratings // num_users, 1))
    extra = rng.lognormal(3.5, 1.2, num_users)
    extra = extra / extra.sum() * (num_ratings - min_count * num_users)
    counts = min_count + np.floor(extra).astype(np.int64)
    counts[: num_ratings - counts.sum()] += 1
    popularity = 1.0 / np.arange(1, num_movies + 1) ** 0.9
    popularity /= popularity.sum()
    options = pcsv.WriteOptions(include_header=True)
    with pcsv.CSVWriter(
        folder / "ratings.csv",
        pa.schema(
            [
                ("userId", pa.int64()),
                ("movieId", pa.int64()),
                ("rating", pa.float64()),
                ("timestamp", pa.int64()),
            ]
        ),
        write_options=options,
    ) as writer:
        chunk = 5000
        for lo in range(0, num_users, chunk):
            c = counts[lo : lo + chunk]
            n = int(c.sum())
            user = np.repeat(np.arange(lo + 1, lo + 1 + len(c)), c)
            movie = rng.choice(ids, size=n, p=popularity)
            rating = rng.integers(1, 11, n) / 2.0
            start = rng.integers(820_000_000, 1_400_000_000, len(c))
            step = np.cumsum(rng.integers(1, 5000, n))
            first = np.repeat(np.cumsum(c) - c, c)
            ts = np.repeat(start, c) + step - np.concatenate([[0], step])[first]
            writer.write_table(
                pa.table({"userId": user, "movieId": movie, "rating": rating, "timestamp": ts})
            )


def part_small(history_length: int = 50, num_batches: int = 10, batch_size: int = 32) -> dict:
    from user_llm.data import readers
    from user_llm.data.histories import HistoryConfig, build_histories

    result = {}
    t0 = time.perf_counter()
    inter, items, _ = readers.load("movielens")
    result["read_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    build_histories(inter, items, HistoryConfig(max_history_length=history_length))
    result["histories_s"] = time.perf_counter() - t
    t = time.perf_counter()
    import tasks.movielens  # noqa: F401  (registers; imports seqio / TF)
    from user_llm.data import pipeline

    result["import_seqio_tasks_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cfg = pipeline.DatasetConfig(
        f"movielens_next_item_userllm_h{history_length}",
        {"inputs": 64, "targets": 32},
        split="train",
        batch_size=batch_size,
        converter="user_prefix_lm",
    )
    it = pipeline.numpy_batches(pipeline.get_dataset(cfg))
    shapes = {k: list(v.shape) for k, v in next(it).items()}
    for _ in range(num_batches - 1):
        next(it)
    result["task_first_batches_s"] = time.perf_counter() - t
    result["total_s"] = time.perf_counter() - t0
    result["batch_shapes"] = shapes
    result["peak_rss_gb"] = peak_rss_gb()
    return result


def part_synthetic(num_ratings: int, num_users: int, num_movies: int, history_length: int):
    from user_llm.data import readers
    from user_llm.data.histories import HistoryConfig, build_histories

    result = {"num_ratings": num_ratings, "num_users": num_users, "num_movies": num_movies}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ml-synthetic"
        t = time.perf_counter()
        generate_movielens(folder, num_ratings, num_users, num_movies)
        result["generate_s"] = time.perf_counter() - t
        result["csv_mb"] = (folder / "ratings.csv").stat().st_size / 2**20
        result["rss_before_gb"] = current_rss_gb()
        t0 = time.perf_counter()
        inter, items, report = readers.load("movielens", folder)
        result["read_s"] = time.perf_counter() - t0
        result["peak_rss_after_read_gb"] = peak_rss_gb()
        result["rss_after_read_gb"] = current_rss_gb()
        t = time.perf_counter()
        h = build_histories(inter, items, HistoryConfig(max_history_length=history_length))
        result["histories_s"] = time.perf_counter() - t
        result["read_plus_histories_s"] = time.perf_counter() - t0
        result["peak_rss_gb"] = peak_rss_gb()
        result["rows_read"] = report.rows_read
        result["examples"] = {k: int(len(v["user_index"])) for k, v in h.splits.items()}
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("small", "synthetic", "all"), default="all")
    p.add_argument("--num_ratings", type=int, default=20_000_000)
    p.add_argument("--num_users", type=int, default=None, help="default: 138k scaled")
    p.add_argument("--num_movies", type=int, default=27_000)
    p.add_argument("--history_length", type=int, default=50)
    args = p.parse_args(argv)
    num_users = args.num_users or max(int(138_000 * args.num_ratings / 20_000_000), 10)
    if args.part == "all":
        machine = {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        }
        print(json.dumps({"machine": machine}))
        for part in ("small", "synthetic"):
            cmd = [
                sys.executable,
                __file__,
                "--part",
                part,
                "--num_ratings",
                str(args.num_ratings),
                "--num_users",
                str(num_users),
                "--num_movies",
                str(args.num_movies),
                "--history_length",
                str(args.history_length),
            ]
            subprocess.run(cmd, check=True, cwd=REPO_ROOT)
        return
    sys.path.insert(0, str(REPO_ROOT))
    if args.part == "small":
        out = part_small(args.history_length)
    else:
        out = part_synthetic(args.num_ratings, num_users, args.num_movies, args.history_length)
    print(json.dumps({args.part: out}, default=float))


if __name__ == "__main__":
    main()
