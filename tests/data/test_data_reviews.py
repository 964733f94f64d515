"""Amazon Reviews (2018, 2023) and Google Local readers: real sample, formats, bad input."""

from __future__ import annotations

import json

import pytest
from datagen import AMAZON_2023, write_json_lines, write_lines

from user_llm.data import readers
from user_llm.data.readers.amazon import read_amazon
from user_llm.data.readers.google_local import read_google_local
from user_llm.data.tables import INTERACTION_COLUMNS, DataError


def review23(user, item, ts_ms, rating=5.0, **kw):
    rec = dict(rating=rating, title="t", text="x", images=[], asin=item + "v", parent_asin=item)
    rec |= dict(user_id=user, timestamp=ts_ms, helpful_vote=0, verified_purchase=True)
    return rec | kw


def meta23(item, title, main="Books", categories=()):
    return dict(parent_asin=item, title=title, main_category=main, categories=list(categories),
                description=["A", "book."], details={"x": 1}, price=None)  # fmt: skip


@pytest.mark.skipif(not AMAZON_2023.exists(), reason="../shared/data is absent (no real data)")
def test_amazon_2023_real_sample():
    inter, items, report = readers.load("amazon_reviews", AMAZON_2023)
    assert len(inter) == 3455
    assert inter["user_id"].nunique() == 354
    assert len(items) == 3228
    assert report.items_without_metadata == 0 and not report.rows_skipped
    assert (items["title"] == "").sum() == 74
    assert tuple(inter.columns) == INTERACTION_COLUMNS
    assert inter["timestamp"].between(1_000_000_000, 2_000_000_000).all()  # seconds, not ms
    assert (inter["review_text"] != "").all()
    one, _, _ = read_amazon(AMAZON_2023, categories=["Software"])
    assert one["user_id"].nunique() * 5 == len(one)


def test_amazon_2023_gz_several_categories_and_optional_meta(tmp_path):
    write_json_lines(
        tmp_path / "Books.jsonl.gz",
        [review23("u1", "B1", 2_000_000), review23("u1", "B2", 1_000_000, text=None)],
        gz=True,
    )
    write_json_lines(tmp_path / "Music.jsonl", [review23("u1", "M1", 3_000_500, rating=2)])
    write_json_lines(
        tmp_path / "meta_Books.jsonl.gz",
        [meta23("B1", "One"), meta23("B2", "Two", categories=["Books", "Poetry"])],
        gz=True,
    )
    inter, items, report = read_amazon(tmp_path)
    assert inter["item_id"].tolist() == ["B2", "B1", "M1"]  # parent_asin, chronological
    assert inter["timestamp"].tolist() == [1000, 2000, 3000]
    assert inter["review_text"].tolist() == ["", "x", "x"]
    assert [list(c) for c in inter["categories"]] == [["Books", "Poetry"], ["Books"], []]
    assert report.items_without_metadata == 1  # M1: no meta_Music file
    by_id = items.set_index("item_id")
    assert by_id.loc["M1", "title"] == "" and by_id.loc["B1", "text"] == "A book."
    only_books, _, _ = read_amazon(tmp_path, categories=["Books"])
    assert len(only_books) == 2
    no_meta, items2, rep2 = read_amazon(tmp_path, with_meta=False)
    assert rep2.items_without_metadata == 3 and (items2["title"] == "").all()


def test_amazon_2018_format(tmp_path):
    reviews = [
        dict(reviewerID="A", asin="X1", overall=4.0, unixReviewTime=1400000000,
             reviewText="good", summary="ok", reviewTime="05 13, 2014"),
        dict(reviewerID="A", asin="X2", overall=1.0, unixReviewTime=1300000000, summary="bad"),
    ]  # fmt: skip
    write_json_lines(tmp_path / "Movies_and_TV.json.gz", reviews, gz=True)
    write_json_lines(
        tmp_path / "meta_Movies_and_TV.json",
        [dict(asin="X1", title="Film", category=["Movies & TV", "Drama"], description=["d"])],
    )
    inter, items, report = read_amazon(tmp_path)
    assert report.variant == "2018"
    assert inter["item_id"].tolist() == ["X2", "X1"]
    assert inter["review_title"].tolist() == ["bad", "ok"]
    assert inter["review_text"].tolist() == ["", "good"]
    assert list(inter["categories"].iloc[1]) == ["Movies & TV", "Drama"]
    assert items.set_index("item_id").loc["X1", "title"] == "Film"


def _amazon_file(tmp_path, bad_line: str | bytes):
    good = [json.dumps(review23("u1", "B1", 1000)), json.dumps(review23("u2", "B2", 2000))]
    return write_lines(tmp_path / "Books.jsonl", [good[0], bad_line, good[1]])


BAD_AMAZON = {
    "malformed_json": '{"rating": 5.0, "user_id": "u3"',
    "mistyped_field": json.dumps(review23("u3", "B3", 3000, rating="five")),
    "missing_user_id": json.dumps(review23(None, "B3", 3000)),
    "missing_parent_asin": json.dumps(
        {k: v for k, v in review23("u3", "B", 1).items() if k != "parent_asin"}
    ),  # fmt: skip
    "rating_out_of_range": json.dumps(review23("u3", "B3", 3000, rating=0.0)),
    "invalid_utf8": b'{"rating": 5.0, "title": "caf\xe9"}',
}


@pytest.mark.parametrize("reason", sorted(BAD_AMAZON))
def test_amazon_bad_lines(tmp_path, reason):
    path = _amazon_file(tmp_path, BAD_AMAZON[reason])
    with pytest.raises(DataError, match=r"Books\.jsonl:2: ") as err:
        read_amazon(path)
    assert err.value.line == 2
    inter, _, report = read_amazon(path, lenient=True)
    assert inter["user_id"].tolist() == ["u1", "u2"]
    assert report.rows_skipped == {reason: 1}
    assert report.rows_read == 3


def test_amazon_duplicates_are_dropped_and_counted_in_strict_mode(tmp_path):
    exact = json.dumps(review23("u1", "B1", 1000))
    path = _amazon_file(tmp_path, exact)
    other = write_lines(
        tmp_path / "Other.jsonl",
        [exact, json.dumps(review23("u1", "B1", 1000, rating=1.0)), exact],
    )
    inter, _, report = read_amazon(path)
    assert inter["user_id"].tolist() == ["u1", "u2"]
    assert report.rows_skipped == {"duplicate_row": 1}
    inter, _, report = read_amazon(other)
    assert inter["rating"].tolist() == [5.0]  # the first line is kept
    assert report.rows_skipped == {"duplicate_row": 1, "conflicting_duplicate_row": 1}


def test_amazon_bad_line_in_gz_and_json_array_line(tmp_path):
    lines = [json.dumps(review23("u1", "B1", 1000)), "", "[1, 2]"]
    path = write_lines(tmp_path / "Books.jsonl.gz", lines, gz=True)
    with pytest.raises(DataError, match=r"Books\.jsonl\.gz:3: a JSON line that is not an object"):
        read_amazon(path)


# ----------------------------------------------------------------------------- Google Local


def g_review(user, place, time_ms, rating=5, text="nice"):
    return dict(user_id=user, name="Ann", time=time_ms, rating=rating, text=text, pics=None,
                resp=None, gmap_id=place)  # fmt: skip


def g_meta(place, name, category):
    return dict(name=name, address="1 Main St", gmap_id=place, description=None, latitude=1.0,
                longitude=2.0, category=category, avg_rating=4.2, num_of_reviews=3, price="$$",
                hours=[["Monday", "9AM-5PM"]], MISC={"Service options": ["Takeout"]},
                state="Open", relative_results=["0x1"], url="https://maps")  # fmt: skip


def test_google_local_several_states(tmp_path):
    write_json_lines(
        tmp_path / "review-Alaska.json.gz",
        [g_review("101", "p1", 5000, text=None), g_review("101", "p2", 3000)],
        gz=True,
    )
    write_json_lines(tmp_path / "review-Vermont.json.gz", [g_review("102", "p3", 1000, 3)], gz=True)
    write_json_lines(
        tmp_path / "meta-Alaska.json.gz",
        [g_meta("p1", "Cafe", ["Cafe", "Bakery"]), g_meta("p2", "Gym", None)],
        gz=True,
    )
    inter, items, report = readers.load("google_local", tmp_path)
    assert inter["user_id"].tolist() == ["101", "101", "102"]
    assert inter["item_id"].tolist() == ["p2", "p1", "p3"]
    assert inter["timestamp"].tolist() == [3, 5, 1]
    assert inter["review_text"].tolist() == ["nice", "", "nice"]
    assert [list(c) for c in inter["categories"]] == [[], ["Cafe", "Bakery"], []]
    assert report.items_without_metadata == 1
    assert items.set_index("item_id").loc["p1", "title"] == "Cafe"
    vermont, _, _ = read_google_local(tmp_path, states=["Vermont"])
    assert vermont["item_id"].tolist() == ["p3"]
    with pytest.raises(FileNotFoundError, match="Texas"):
        read_google_local(tmp_path, states=["Texas"])


def test_google_local_bad_rating(tmp_path):
    path = write_json_lines(
        tmp_path / "review-Alaska.json", [g_review("1", "p", 1), g_review("1", "q", 2, 6)]
    )
    with pytest.raises(DataError, match=r"review-Alaska\.json:2: rating out of range"):
        read_google_local(path)
    inter, _, report = read_google_local(path, lenient=True)
    assert len(inter) == 1 and report.rows_skipped == {"rating_out_of_range": 1}


def test_real_amazon_file_with_duplicated_lines_reads_strictly(tmp_path):
    """Real All_Beauty reviews with five lines repeated (as in official 5-core files): the
    default (strict) read drops and counts exactly those, and keeps every other row."""
    from conftest import SHARED_DATA

    source = SHARED_DATA / "amazon_reviews_2023" / "All_Beauty.jsonl"
    lines = source.read_text().splitlines()
    path = write_lines(tmp_path / "All_Beauty.jsonl", lines + lines[3:8])
    clean, _, _ = read_amazon(source)
    inter, _, report = read_amazon(path)
    assert report.rows_skipped == {"duplicate_row": 5}
    assert report.rows_read == len([x for x in lines if x.strip()]) + 5
    assert len(inter) == len(clean)


@pytest.mark.parametrize("damage", ["truncated", "bad_crc", "trailing_garbage"])
def test_corrupt_gz_names_the_file_in_strict_and_lenient_mode(tmp_path, damage):
    lines = [json.dumps(review23(f"u{i}", f"B{i}", 1000 + i)) for i in range(200)]
    path = write_lines(tmp_path / "Books.jsonl.gz", lines, gz=True)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "bad_crc":
        data[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    else:
        data += b"not gzip at all"
    path.write_bytes(bytes(data))
    for lenient in (False, True):
        with pytest.raises(DataError, match=r"Books\.jsonl\.gz(:\d+)?: corrupt or truncated"):
            read_amazon(path, lenient=lenient)


def test_a_timestamp_beyond_int64_in_json_names_its_line_and_is_skipped_leniently(tmp_path):
    huge = review23("u3", "B3", 1000)
    huge["timestamp"] = 10**23
    path = _amazon_file(tmp_path, json.dumps(huge))
    with pytest.raises(DataError, match=r"Books\.jsonl:2: field 'timestamp' has the wrong type"):
        read_amazon(path)
    inter, _, report = read_amazon(path, lenient=True)
    assert inter["user_id"].tolist() == ["u1", "u2"]
    assert report.rows_skipped == {"mistyped_field": 1}


def test_a_bad_first_line_stops_a_strict_read_and_is_skipped_leniently(tmp_path):
    good = [json.dumps(review23(u, b, t)) for u, b, t in (("u1", "B1", 1000), ("u2", "B2", 2000))]
    path = write_lines(tmp_path / "Books.jsonl", ['{"rating": 5.0, "user_id"', *good])
    with pytest.raises(DataError, match=r"Books\.jsonl:1: malformed JSON"):
        read_amazon(path)
    inter, _, report = read_amazon(path, lenient=True)
    assert inter["user_id"].tolist() == ["u1", "u2"]
    assert report.rows_skipped == {"malformed_json": 1}
