"""The data folder and strict/lenient reading are gin settings that reach every task and are
recorded in the operative config (so a rerun from ``config.gin`` reads the same data)."""

from __future__ import annotations

import gin
import pytest
from datagen import ml_csv

import tasks.movielens  # noqa: F401 - registers the family
from tasks import common
from user_llm.data import families
from user_llm.data.tables import DataError


def _rows(n_users: int = 8, per_user: int = 12) -> list[str]:
    return [f"{u},{10 * (1 + i % 3)},4.0,{1000 + i}" for u in range(1, n_users + 1)
            for i in range(per_user)]  # fmt: skip


def test_gin_data_dir_and_lenient_reach_the_tasks(tmp_path, monkeypatch):
    monkeypatch.delenv(tasks.movielens.FAMILY.env_var, raising=False)
    folder = ml_csv(tmp_path, ratings=[*_rows(), "9,abc,4.0,5"])
    gin.clear_config()
    try:
        gin.parse_config([f"tasks.data_settings.data_dirs = {{'movielens': '{folder}'}}"])
        assert families.resolve_data_dir(tasks.movielens.FAMILY) == str(folder)
        with pytest.raises(DataError, match=r"ratings\.csv:\d+: "):
            families.family_task_data(tasks.movielens.FAMILY, 5)
        gin.parse_config(["tasks.data_settings.lenient = True"])
        data = families.family_task_data(tasks.movielens.FAMILY, 5)
        assert len(data.histories.user_ids) == 8
        assert "data_settings.lenient = True" in gin.operative_config_str()
        assert str(folder) in gin.operative_config_str()
    finally:
        gin.clear_config()
    # Without the setting, the default (bundled ml-latest-small, strict) is back.
    assert families.resolve_data_dir(tasks.movielens.FAMILY) is None


def test_a_task_without_examples_names_the_task_split_and_reason(tmp_path):
    """Amazon reviews without their meta_<Category> file: items have no categories, so the
    favourite-category task is empty; that is one clear error, not a TensorFlow type error.
    Next item falls back to item ids as titles and has examples."""
    import json

    from datagen import write_lines
    from test_data_reviews import review23

    import tasks.amazon_reviews as amazon

    rows = [review23(f"u{u}", f"B{i}", 1000 + 10 * i + u) for u in range(6) for i in range(8)]
    write_lines(tmp_path / "Books.jsonl", [json.dumps(r) for r in rows])
    gin.clear_config()
    try:
        gin.parse_config([f"tasks.data_settings.data_dirs = {{'amazon_reviews': '{tmp_path}'}}"])
        dataset_fn = common._dataset_fn(amazon.FAMILY, 5, "favorite_genre", "userllm")
        with pytest.raises(
            families.EmptyTaskError, match=r"favorite_category_userllm_h5: no test examples"
        ):
            dataset_fn("test", False)
        next_item = families.examples(amazon.FAMILY, 5, "next_item", "userllm", "test")
        assert set(next_item["targets"]) <= {f"B{i}" for i in range(8)}, next_item["targets"]
        # Review generation needs no metadata: it has examples.
        assert len(families.examples(amazon.FAMILY, 5, "review_gen", "userllm", "test")["targets"])
    finally:
        gin.clear_config()
