"""Property tests of the data readers, like the GGUF header fuzz: any truncation, byte
mutation, inserted garbage or duplicated line in a valid release file gives either a
``DataError`` that names the file, or tables that satisfy the common schema's invariants;
never another exception type, never a hang, and (lenient) every dropped row is counted.

Covers the delimited readers (ml-latest ``ratings.csv``/``movies.csv``, ml-100k ``u.data``,
ml-1m ``ratings.dat``) and the JSON-lines readers (Amazon 2023, Amazon 2018, Google Local),
plain and gzipped.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from datagen import ml_1m, ml_100k, ml_csv, write_json_lines  # noqa: E402

from user_llm.data import readers  # noqa: E402
from user_llm.data.tables import (  # noqa: E402
    INTERACTION_COLUMNS,
    ITEM_COLUMNS,
    DataError,
    bad_timestamps,
)


def _amazon_2023(root: Path) -> Path:
    reviews = [
        dict(rating=float(1 + i % 5), title=f"t{i}", text=f"review {i}", images=[],
             asin=f"B{i % 4}", parent_asin=f"B{i % 4}", user_id=f"u{i % 3}",
             timestamp=1_600_000_000_000 + 1000 * i, helpful_vote=0, verified_purchase=True)
        for i in range(8)
    ]  # fmt: skip
    meta = [
        dict(main_category="Books", title=f"Book {i}", categories=["Books", "Fiction"],
             description=["d"], parent_asin=f"B{i}")
        for i in range(4)
    ]  # fmt: skip
    write_json_lines(root / "Books.jsonl", reviews)
    write_json_lines(root / "meta_Books.jsonl", meta)
    return root


def _amazon_2018_gz(root: Path) -> Path:
    reviews = [
        dict(reviewerID=f"R{i % 3}", asin=f"A{i % 4}", overall=float(1 + i % 5),
             unixReviewTime=1_400_000_000 + i, reviewText=f"text {i}", summary="s")
        for i in range(8)
    ]  # fmt: skip
    write_json_lines(root / "Books_5.json.gz", reviews, gz=True)
    return root


def _google_local(root: Path) -> Path:
    reviews = [
        dict(user_id=f"g{i % 3}", name="n", time=1_500_000_000_000 + i, rating=1 + i % 5,
             text=f"nice {i}", pics=None, resp=None, gmap_id=f"0x{i % 4}")
        for i in range(8)
    ]  # fmt: skip
    meta = [dict(name=f"Place {i}", gmap_id=f"0x{i}", category=["Cafe"]) for i in range(4)]
    write_json_lines(root / "review-Vermont.json", reviews)
    write_json_lines(root / "meta-Vermont.json", meta)
    return root


# (dataset, writer of a valid folder, the file inside it that is damaged)
CASES: dict[str, tuple[str, Callable[[Path], Path], str]] = {
    "ml_latest_ratings": ("movielens", ml_csv, "ratings.csv"),
    "ml_latest_movies": ("movielens", ml_csv, "movies.csv"),
    "ml_100k_u_data": ("movielens", ml_100k, "u.data"),
    "ml_1m_ratings": ("movielens", ml_1m, "ratings.dat"),
    "amazon_2023": ("amazon_reviews", _amazon_2023, "Books.jsonl"),
    "amazon_2023_meta": ("amazon_reviews", _amazon_2023, "meta_Books.jsonl"),
    "amazon_2018_gz": ("amazon_reviews", _amazon_2018_gz, "Books_5.json.gz"),
    "google_local": ("google_local", _google_local, "review-Vermont.json"),
}

_NASTY = [b"\x00", b"\xff\xfe", b"\n", b"\r\n", b",", b"\t", b"::", b"|", b'"', b"{", b"}",
          b"[1,2]", b"1e3", b"-1", b"9" * 23, b"NaN", b"null", b"\xc3"]  # fmt: skip


@st.composite
def damage(draw: st.DrawFn, data: bytes) -> bytes:
    """One or two of: truncation, byte overwrite, inserted bytes, a duplicated or deleted line."""
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["truncate", "overwrite", "insert", "dup_line", "del_line"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "truncate":
            data = data[:pos]
        elif kind in ("overwrite", "insert"):
            chunk = draw(st.one_of(st.sampled_from(_NASTY), st.binary(min_size=1, max_size=8)))
            data = data[:pos] + chunk + data[pos + (len(chunk) if kind == "overwrite" else 0) :]
        else:
            lines = data.split(b"\n")
            i = pos % len(lines)
            lines[i:i] = [lines[i]] if kind == "dup_line" else []
            if kind == "del_line":
                del lines[i]
            data = b"\n".join(lines)
    return data


def _check_tables(inter, items, report) -> None:
    """The common schema's invariants hold for whatever a reader returns."""
    assert tuple(inter.columns) == INTERACTION_COLUMNS
    assert tuple(items.columns) == ITEM_COLUMNS
    for col in ("user_id", "item_id"):
        values = inter[col].to_numpy(dtype=object)
        assert all(isinstance(v, str) and v for v in values), (col, values)
    assert not bad_timestamps(inter["timestamp"].to_numpy()).any()
    assert np.isfinite(inter["rating"].to_numpy(dtype=np.float64)).all()
    keys = list(zip(inter["user_id"], inter["timestamp"], inter["item_id"], strict=True))
    assert keys == sorted(keys), "interactions are sorted by (user, timestamp, item)"
    assert report.rows_read >= len(inter)


def _read_damaged(case: str, damaged: bytes, lenient: bool, root: Path):
    dataset, write, name = CASES[case]
    folder = write(root)
    path = folder / name
    if name.endswith(".gz"):
        damaged = gzip.compress(damaged)  # the damage is inside the compressed text
    path.write_bytes(damaged)
    return readers.load(dataset, folder, lenient=lenient), str(path)


def _original(case: str) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        _, write, name = CASES[case]
        data = (write(Path(d)) / name).read_bytes()
        return gzip.decompress(data) if name.endswith(".gz") else data


@pytest.mark.parametrize("case", sorted(CASES))
def test_valid_files_read_without_loss(case, tmp_path):
    (inter, items, report), _ = _read_damaged(case, _original(case), False, tmp_path)
    _check_tables(inter, items, report)
    assert len(inter) > 0 and report.num_skipped == 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_files_give_a_named_error_or_valid_tables(case):
    original = _original(case)

    @settings(
        max_examples=40,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data(), st.booleans())
    def check(data, lenient):
        damaged = data.draw(damage(original))
        root = Path(tempfile.mkdtemp())
        try:
            try:
                (inter, items, report), path = _read_damaged(case, damaged, lenient, root)
            except DataError as e:
                assert str(e).startswith(str(root)), e  # names the file it could not read
                assert len(str(e)) < 600, e  # a message, not a page of the file
                return
            _check_tables(inter, items, report)
            if not lenient:
                assert report.num_skipped == report.rows_skipped.get("duplicate_row", 0) + (
                    report.rows_skipped.get("conflicting_duplicate_row", 0)
                ), report.rows_skipped  # strict drops nothing but counted duplicates
        finally:
            shutil.rmtree(root)

    check()


def test_damage_really_changes_the_file():
    """The strategy is not a no-op: most drawn damages change a valid file."""
    original = _original("amazon_2023")
    changed = []

    @settings(max_examples=30, deadline=None, derandomize=True)
    @given(st.data())
    def draw(data):
        changed.append(data.draw(damage(original)) != original)

    draw()
    assert sum(changed) >= 25, sum(changed)


def test_strict_error_names_line_of_a_mutated_json_row(tmp_path):
    """A fixed example of what the property promises: a broken line is named by number."""
    folder = _amazon_2023(tmp_path)
    path = folder / "Books.jsonl"
    lines = path.read_bytes().split(b"\n")
    lines[3] = lines[3][:20]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"Books.jsonl:4: "):
        readers.load("amazon_reviews", folder)
    inter, _, report = readers.load("amazon_reviews", folder, lenient=True)
    assert len(inter) == 7 and report.num_skipped == 1
    assert json.loads(lines[0])["user_id"] in set(inter["user_id"])
