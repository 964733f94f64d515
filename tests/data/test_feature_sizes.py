"""The encoder's vocabulary sizes: a JSON written when the histories are built, read by the
entry points' gin parsing as macros, so a model gin file never reads the dataset."""

from __future__ import annotations

import json
import os

import gin
import pytest
from datagen import ml_csv, write_lines

import tasks.movielens  # noqa: F401 - registers the family
from user_llm import gin_utils
from user_llm.data import families
from user_llm.data import feature_sizes as FS

FAMILY = families.MOVIELENS
ENCODER_GIN = "models/user_encoder/ar.gin"


def _folder(tmp_path, n_users: int = 8, per_user: int = 12):
    rows = [
        f"{u},{10 * (1 + (u + i) % 7)},{1 + i % 5}.0,{1000 + i}"
        for u in range(1, n_users + 1)
        for i in range(per_user)
    ]
    return ml_csv(tmp_path, ratings=rows)


@pytest.fixture
def small_movielens(tmp_path, monkeypatch):
    """A tiny MovieLens folder set through gin, and a fresh cache folder."""
    monkeypatch.setenv(FS.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.delenv(FAMILY.env_var, raising=False)
    folder = _folder(tmp_path / "data")
    setting = f"tasks.data_settings.data_dirs = {{'movielens': '{folder}'}}"
    families.task_data.cache_clear()
    yield folder, setting
    gin.clear_config()
    families.task_data.cache_clear()


def _parse(setting: str, *bindings: str) -> None:
    bindings = [setting, "DATASET='movielens'", "HISTORY_LENGTH=5", *bindings]
    gin_utils.parse_gin([ENCODER_GIN], bindings, finalize=False)


def _bound() -> dict[str, int]:
    return {m: gin.query_parameter(f"{m}/macro.value") for m in FS.MACROS}


def test_building_histories_writes_their_sizes_and_gin_binds_them(small_movielens):
    folder, setting = small_movielens
    gin.parse_config([setting])
    path = families.feature_sizes_path(FAMILY, 5)
    assert not path.exists()
    histories = families.family_histories(FAMILY, 5)  # the data pipeline's build writes it
    expected = FS.FeatureSizes.from_histories(histories)
    assert expected.item == 7 + 2 and expected.genre > 2  # 7 movies, pad and OOV
    assert FS.read(path, "movielens", 5) == expected
    record = json.loads(path.read_text())
    assert record["dataset"] == "movielens" and record["history_length"] == 5

    _parse(setting)
    assert _bound() == expected.macros()
    config = gin.get_configurable("user_llm.user_encoder.UserEncoderConfig")()
    assert dict(config.categorical_features) == expected.categorical()
    assert dict(config.multivalued_features) == expected.multivalued()
    # The operative config (a run's config.gin) records the sizes themselves.
    assert f"ITEM_VOCAB_SIZE = {expected.item}" in gin.operative_config_str()


def test_gin_reads_the_json_not_the_data(small_movielens):
    """Sizes in the JSON (here edited, so they differ from the data's) are what gin binds: the
    configuration builds no histories when the JSON is there."""
    folder, setting = small_movielens
    gin.parse_config([setting])
    path = families.feature_sizes_path(FAMILY, 5)
    FS.write(FS.FeatureSizes(item=101, rating=7, time_buckets=9, genre=5), path)
    _parse(setting)
    assert families.task_data.cache_info().currsize == 0
    assert _bound() == {
        "ITEM_VOCAB_SIZE": 101,
        "RATING_VOCAB_SIZE": 7,
        "TIME_BUCKETS": 9,
        "GENRE_VOCAB_SIZE": 5,
    }


def test_new_data_files_mean_new_sizes_never_stale_ones(small_movielens, tmp_path):
    folder, setting = small_movielens
    gin.parse_config([setting])
    before = families.feature_sizes_path(FAMILY, 5)
    small = FS.FeatureSizes.from_histories(families.family_histories(FAMILY, 5))
    rows = [f"{u},{10 * (1 + i)},4.0,{1000 + i}" for u in range(1, 9) for i in range(14)]
    write_lines(folder / "ratings.csv", ["userId,movieId,rating,timestamp", *rows])  # more movies
    families.task_data.cache_clear()
    after = families.feature_sizes_path(FAMILY, 5)
    assert after != before and not after.exists()
    _parse(setting)
    assert _bound()["ITEM_VOCAB_SIZE"] > small.item
    assert after.exists()


def test_a_bound_macro_and_a_named_file_win(small_movielens, tmp_path):
    folder, setting = small_movielens
    own = FS.write(
        FS.FeatureSizes(item=50, rating=6, time_buckets=8, genre=4),
        tmp_path / "own.json",
        {"dataset": "movielens", "history_length": 5},
    )
    _parse(setting, f"FEATURE_SIZES_FILE='{own}'", "GENRE_VOCAB_SIZE=33")
    assert _bound() == {
        "ITEM_VOCAB_SIZE": 50,
        "RATING_VOCAB_SIZE": 6,
        "TIME_BUCKETS": 8,
        "GENRE_VOCAB_SIZE": 33,
    }
    # A file of another history length is refused, naming both.
    with pytest.raises(FS.FeatureSizesError, match="history_length 5, not 20"):
        gin_utils.parse_gin(
            [ENCODER_GIN],
            [setting, "DATASET='movielens'", "HISTORY_LENGTH=20", f"FEATURE_SIZES_FILE='{own}'"],
        )


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not readable JSON"),
        ('{"sizes": {}}', "no 'macros' object"),
        ('{"macros": {"ITEM_VOCAB_SIZE": 3}}', "lacks"),
        (
            '{"macros": {"ITEM_VOCAB_SIZE": 0, "RATING_VOCAB_SIZE": 6, "TIME_BUCKETS": 8,'
            ' "GENRE_VOCAB_SIZE": "4"}}',
            "positive integers",
        ),
    ],
)
def test_a_malformed_sizes_file_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "sizes.json"
    path.write_text(text)
    with pytest.raises(FS.FeatureSizesError, match=message):
        FS.read(path)
    with pytest.raises(FS.FeatureSizesError, match="not found"):
        FS.read(tmp_path / "absent.json")


def test_an_unknown_encoder_dataset_is_named(small_movielens):
    folder, setting = small_movielens
    with pytest.raises(Exception, match="Unknown dataset 'netflix'"):
        _parse(setting, "ENCODER_DATASET='netflix'")


def test_an_encoder_without_a_dataset_names_the_overlay(small_movielens):
    with pytest.raises(gin_utils.GinConfigError, match="datasets/movielens.gin"):
        gin_utils.parse_gin([ENCODER_GIN], ["HISTORY_LENGTH=5"])


def test_an_unwritable_cache_is_a_warning_and_sizes_still_bind(small_movielens, tmp_path):
    folder, setting = small_movielens
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would be")
    os.environ[FS.CACHE_ENV_VAR] = str(blocked)  # monkeypatch restores it
    _parse(setting)
    assert _bound()["ITEM_VOCAB_SIZE"] == 9


OLD_CONFIG = """
from __gin__ import dynamic_registration
from tasks import common as task_common
from user_llm import user_encoder

ENCODER_DATASET = 'movielens'
HISTORY_LENGTH = 20
user_encoder.UserEncoderConfig.categorical_features = \\
    @categorical/task_common.encoder_feature_sizes()
user_encoder.UserEncoderConfig.multivalued_features = \\
    @multivalued/task_common.encoder_feature_sizes()
categorical/task_common.encoder_feature_sizes.dataset = %ENCODER_DATASET
categorical/task_common.encoder_feature_sizes.history_length = %HISTORY_LENGTH
categorical/task_common.encoder_feature_sizes.kind = 'categorical'
multivalued/task_common.encoder_feature_sizes.dataset = %ENCODER_DATASET
multivalued/task_common.encoder_feature_sizes.history_length = %HISTORY_LENGTH
multivalued/task_common.encoder_feature_sizes.kind = 'multivalued'
"""


def test_a_config_gin_from_before_the_macros_still_builds_the_same_encoder(tmp_path, monkeypatch):
    """Runs made before the sizes became macros saved ``config.gin`` files that call
    ``tasks.common.encoder_feature_sizes``: they still parse, to the same sizes."""
    monkeypatch.setenv(FS.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.delenv(FAMILY.env_var, raising=False)
    old = tmp_path / "config.gin"
    old.write_text(OLD_CONFIG)
    try:
        gin_utils.parse_gin([str(old)], finalize=False)
        config = gin.get_configurable("user_llm.user_encoder.UserEncoderConfig")()
    finally:
        gin.clear_config()
    sizes = families.feature_sizes(FAMILY, 20)
    assert dict(config.categorical_features) == sizes.categorical()
    assert dict(config.multivalued_features) == sizes.multivalued()
