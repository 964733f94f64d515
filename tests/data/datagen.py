"""Writers of tiny release-format files with known answers, shared by the data tests."""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
ML_SMALL_ZIP = SHARED_DATA / "movielens" / "ml-latest-small.zip"
AMAZON_2023 = SHARED_DATA / "amazon_reviews_2023"


def write_lines(path: Path, lines: list[str | bytes], gz: bool = False) -> Path:
    data = b"".join((ln if isinstance(ln, bytes) else ln.encode("utf-8")) + b"\n" for ln in lines)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_json_lines(path: Path, records: list[dict], gz: bool = False) -> Path:
    return write_lines(path, [json.dumps(r) for r in records], gz=gz)


def ml_csv(root: Path, ratings: list[str] | None = None, movies: list[str] | None = None) -> Path:
    """ml-latest-small layout: 3 users, 4 movies (one unrated), a quoted title."""
    folder = root / "ml-tiny"
    folder.mkdir(parents=True)
    write_lines(
        folder / "ratings.csv",
        ["userId,movieId,rating,timestamp"]
        + (
            ratings
            or [
                "1,10,4.0,100",
                "1,20,3.5,200",
                "2,10,5.0,150",
                "2,30,0.5,160",
                "3,20,2.0,300",
            ]
        ),
    )
    write_lines(
        folder / "movies.csv",
        ["movieId,title,genres"]
        + (
            movies
            or [
                '10,"Heat, The (1995)",Action|Crime',
                '20,"Say ""Hi"" (2001)",(no genres listed)',
                "30,Alien (1979),Horror|Sci-Fi",
                "40,Unrated (2000),Drama",
            ]
        ),
    )
    return folder


def ml_1m(root: Path) -> Path:
    folder = root / "ml-1m"
    folder.mkdir(parents=True)
    write_lines(folder / "ratings.dat", ["1::10::4::978300760", "1::20::5::978300761"])
    (folder / "movies.dat").write_bytes(
        "10::Misérables, Les (1995)::Drama|Musical\n20::Toy Story (1995)::Animation\n".encode(
            "latin-1"
        )
    )
    return folder


def ml_100k(root: Path) -> Path:
    folder = root / "ml-100k"
    folder.mkdir(parents=True)
    write_lines(folder / "u.data", ["1\t10\t3\t881250949", "2\t10\t4\t881250950", "2\t20\t1\t5"])
    genres = ["unknown", "Action", "Comedy"]
    write_lines(folder / "u.genre", [f"{g}|{i}" for i, g in enumerate(genres)] + [""])
    (folder / "u.item").write_bytes(
        "10|Café Society (1995)|01-Jan-1995||http://x|0|1|1\n20|Nobody (1995)|||http://y|1|0|0\n"
        .encode("latin-1")
    )  # fmt: skip
    return folder


def zip_folder(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w") as z:
        for p in sorted(folder.rglob("*")):
            z.write(p, p.relative_to(folder.parent).as_posix())
    return target
