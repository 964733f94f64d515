"""MovieLens reader: real counts, every release layout, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from datagen import ML_SMALL_ZIP, ml_1m, ml_100k, ml_csv, write_lines, zip_folder

from user_llm.data import readers
from user_llm.data.readers.movielens import BUNDLED_ZIP, read_movielens
from user_llm.data.tables import INTERACTION_COLUMNS, ITEM_COLUMNS, DataError


def test_bundled_ml_latest_small_counts():
    interactions, items, report = read_movielens()
    assert len(interactions) == 100836
    assert interactions["user_id"].nunique() == 610
    assert len(items) == 9742
    assert interactions["item_id"].nunique() == 9724
    assert tuple(interactions.columns) == INTERACTION_COLUMNS
    assert tuple(items.columns) == ITEM_COLUMNS
    assert interactions["rating"].dtype == np.float32
    assert interactions["timestamp"].dtype == np.int64
    assert report.rows_read == 100836 and not report.rows_skipped
    assert report.items_without_metadata == 0
    assert interactions["rating"].between(0.5, 5.0).all()
    toy = items.set_index("item_id").loc["1"]
    assert toy["title"] == "Toy Story (1995)"
    assert list(toy["categories"]) == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    # Items with "(no genres listed)" have no categories.
    assert (items["categories"].list.len() == 0).sum() == 34
    assert BUNDLED_ZIP.name == "ml-latest-small.zip"


@pytest.mark.skipif(not ML_SMALL_ZIP.exists(), reason="../shared/data is absent (no real data)")
def test_shared_zip_matches_bundled():
    a, items_a, _ = readers.load("movielens", ML_SMALL_ZIP)
    b, items_b, _ = readers.load("movielens")
    assert a.equals(b) and items_a.equals(items_b)


def test_csv_layout_folder_and_zip_agree(tmp_path):
    folder = ml_csv(tmp_path)
    inter, items, report = read_movielens(folder)
    zipped, zitems, _ = read_movielens(zip_folder(folder, tmp_path / "ml-tiny.zip"))
    assert inter.equals(zipped) and items.equals(zitems)
    assert report.variant == "csv"
    assert len(inter) == 5 and len(items) == 4
    titles = dict(zip(items["item_id"], items["title"], strict=True))
    assert titles["10"] == "Heat, The (1995)"
    assert titles["20"] == 'Say "Hi" (2001)'
    cats = dict(zip(items["item_id"], items["categories"], strict=True))
    assert list(cats["20"]) == [] and list(cats["30"]) == ["Horror", "Sci-Fi"]
    user2 = inter[inter["user_id"] == "2"]
    assert user2["item_id"].tolist() == ["10", "30"]
    assert [list(c) for c in user2["categories"]] == [["Action", "Crime"], ["Horror", "Sci-Fi"]]
    assert user2["rating"].tolist() == [5.0, 0.5]


def test_ml_1m_latin1(tmp_path):
    inter, items, report = read_movielens(ml_1m(tmp_path))
    assert report.variant == "dat"
    assert items.set_index("item_id").loc["10", "title"] == "Misérables, Les (1995)"
    assert inter["timestamp"].tolist() == [978300760, 978300761]
    assert [list(c) for c in inter["categories"]] == [["Drama", "Musical"], ["Animation"]]


def test_ml_100k_genre_flags(tmp_path):
    inter, items, report = read_movielens(ml_100k(tmp_path))
    assert report.variant == "100k"
    assert len(inter) == 3 and inter["user_id"].nunique() == 2
    by_id = items.set_index("item_id")
    assert by_id.loc["10", "title"] == "Café Society (1995)"
    assert list(by_id.loc["10", "categories"]) == ["Action", "Comedy"]
    assert list(by_id.loc["20", "categories"]) == []  # only "unknown"


def test_rated_movie_without_metadata_is_kept_and_counted(tmp_path):
    folder = ml_csv(tmp_path, ratings=["1,10,4.0,100", "1,99,3.0,101"])
    inter, items, report = read_movielens(folder)
    assert report.items_without_metadata == 1
    assert items.set_index("item_id").loc["99", "title"] == ""


BAD_RATINGS = {
    "rating_out_of_range": ("1,10,7.0,100", 3),
    "mistyped_field": ("1,abc,4.0,100", 3),
    "wrong_field_count": ("1,10,4.0", 3),
}


@pytest.mark.parametrize("reason", sorted(BAD_RATINGS))
def test_bad_ratings_raise_with_line_or_are_counted(tmp_path, reason):
    bad, line = BAD_RATINGS[reason]
    folder = ml_csv(tmp_path, ratings=["1,10,4.0,100", bad, "2,20,3.0,5"])
    with pytest.raises(DataError, match=rf"ratings\.csv:{line}: ") as err:
        read_movielens(folder)
    assert err.value.line == line
    inter, _, report = read_movielens(folder, lenient=True)
    assert len(inter) == 2
    assert report.rows_skipped == {reason: 1}
    assert report.rows_read == 3


def test_duplicate_rows_are_dropped_and_counted_by_default(tmp_path):
    """Official releases hold duplicate lines: strict mode keeps the first of each (user, item,
    timestamp) and counts exact and conflicting duplicates apart; nothing is silent."""
    ratings = ["1,10,4.0,100", "1,10,4.0,100", "2,20,3.0,5", "2,20,1.0,5", "1,10,4.0,100"]
    folder = ml_csv(tmp_path, ratings=ratings)
    for lenient in (False, True):
        inter, _, report = read_movielens(folder, lenient=lenient)
        assert sorted(zip(inter["user_id"], inter["rating"], strict=True)) == [
            ("1", 4.0),
            ("2", 3.0),
        ]
        assert report.rows_skipped == {"duplicate_row": 2, "conflicting_duplicate_row": 1}


def test_non_utf8_bytes_in_csv(tmp_path):
    folder = ml_csv(tmp_path)
    path = folder / "movies.csv"
    path.write_bytes(path.read_bytes().replace(b"Alien", b"Al\xe9en"))
    with pytest.raises(DataError, match=r"movies\.csv:4: invalid UTF-8"):
        read_movielens(folder)
    _, items, report = read_movielens(folder, lenient=True)
    assert report.rows_skipped == {"invalid_utf8": 1}
    assert items.set_index("item_id").loc["30", "title"] == ""  # rated, metadata lost


def test_blank_lines_are_ignored(tmp_path):
    folder = ml_csv(tmp_path, ratings=["1,10,4.0,100", "", "2,20,3.0,5", ""])
    inter, _, report = read_movielens(folder)
    assert len(inter) == 2 and not report.rows_skipped


def test_user_losing_all_rows_is_counted(tmp_path):
    folder = ml_csv(tmp_path, ratings=["1,10,4.0,100", "2,10,9.0,100"])
    inter, _, report = read_movielens(folder, lenient=True)
    assert inter["user_id"].tolist() == ["1"]
    assert report.users_without_interactions == 1


def test_no_usable_interactions_is_an_error(tmp_path):
    folder = ml_csv(tmp_path, ratings=["2,10,9.0,100"])
    with pytest.raises(DataError, match="no usable interactions"):
        read_movielens(folder, lenient=True)


def test_unknown_layout(tmp_path):
    write_lines(tmp_path / "something.csv", ["a,b"])
    with pytest.raises(DataError, match="no MovieLens files"):
        read_movielens(tmp_path)


def test_a_file_cut_mid_line_is_refused_or_its_last_line_dropped(tmp_path):
    """A u.data cut inside its last timestamp still parses as a valid row: the missing final
    newline is what gives the cut away."""
    folder = ml_csv(tmp_path, ratings=["1,10,4.0,100", "2,20,3.0,8812"])
    path = folder / "ratings.csv"
    path.write_bytes(path.read_bytes()[:-3])  # "...,88" without its newline
    with pytest.raises(DataError, match=r"ratings\.csv:3: the file does not end with a newline"):
        read_movielens(folder)
    inter, _, report = read_movielens(folder, lenient=True)
    assert inter["user_id"].tolist() == ["1"]
    assert report.rows_skipped == {"unterminated_last_line": 1}


@pytest.mark.parametrize(
    "row,reason",
    [
        ("1e3,10,4.0,100", "mistyped_field"),  # would become user 1000
        ("3,10,4.0,4611686018427387904", "timestamp_out_of_range"),  # 2^62 seconds
        ("3,10,4.0,-5", "timestamp_out_of_range"),
    ],
)
def test_implausible_ids_and_timestamps_are_caught(tmp_path, row, reason):
    folder = ml_csv(tmp_path, ratings=["1,10,4.0,100", row, "2,20,3.0,5"])
    with pytest.raises(DataError, match=r"ratings\.csv:3: "):
        read_movielens(folder)
    inter, _, report = read_movielens(folder, lenient=True)
    assert sorted(inter["user_id"]) == ["1", "2"]
    assert report.rows_skipped == {reason: 1}


def test_zip_member_expanding_implausibly_is_refused(tmp_path):
    import zipfile

    folder = ml_csv(tmp_path)
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for p in folder.iterdir():
            if p.name != "ratings.csv":
                z.write(p, f"ml-tiny/{p.name}")
        z.writestr("ml-tiny/ratings.csv", b"userId,movieId,rating,timestamp\n" + b"0" * (80 << 20))
    with pytest.raises(DataError, match=r"bomb\.zip/ml-tiny/ratings\.csv: expands to"):
        read_movielens(archive)


def test_invalid_utf8_in_u_data_names_the_line_or_is_skipped(tmp_path):
    folder = ml_100k(tmp_path)
    path = folder / "u.data"
    lines = path.read_bytes().split(b"\n")
    lines[1] = b"2\t10\t4\t88\xff1250950"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"u\.data:2: invalid UTF-8"):
        read_movielens(folder)
    inter, _, report = read_movielens(folder, lenient=True)
    assert report.rows_skipped == {"invalid_utf8": 1} and len(inter) == 2


def test_error_messages_cut_a_long_bad_value(tmp_path):
    folder = ml_csv(tmp_path, ratings=["1,10,4.0,100", "1," + "x" * 5000 + ",4.0,100"])
    with pytest.raises(DataError, match=r"ratings\.csv:3: field 'item' is not a number") as err:
        read_movielens(folder)
    assert len(str(err.value)) < 200
