"""TFDS builders: built from the bundled ml-latest-small, read through seqio.TfdsDataSource,
equal to the reader-backed tasks; the ``tfds build`` command line on the same data."""

from __future__ import annotations

import numpy as np
import pytest
import seqio
from conftest import run_module

from user_llm.data import families
from user_llm.data import feature_sizes as FS

LENGTH = 20
LENGTHS = {"inputs": 2048, "targets": 64}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import tensorflow_datasets as tfds

    from user_llm.data import tfds_builders  # noqa: F401 - registers the builders

    data_dir = tmp_path_factory.mktemp("tfds")
    manual = tmp_path_factory.mktemp("manual")  # empty: ml-latest-small is bundled
    builder = tfds.builder(f"user_llm_movielens/ml-latest-small_h{LENGTH}", data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
    )
    return builder, data_dir


def _elements(task_name: str, split: str) -> list[dict]:
    task = seqio.get_mixture_or_task(task_name)
    ds = task.get_dataset(LENGTHS, split=split, shuffle=False, use_cached=False)
    return [{k: np.asarray(v) for k, v in ex.items()} for ex in ds.as_numpy_iterator()]


def test_builder_writes_every_split_with_the_catalogue(built):
    builder, _ = built
    import tasks.movielens  # noqa: F401
    from tasks import common

    h = families.family_task_data(tasks.movielens.FAMILY, LENGTH).histories
    for split in common.SPLITS:
        assert builder.info.splits[split].num_examples == len(h.splits[split]["user_index"])
    meta = builder.info.metadata
    assert meta["item_titles"] == [str(t) for t in h.item_titles]
    assert meta["vocabulary_sizes"] == {k: v.size for k, v in h.vocabularies.items()}
    # Its metadata.json is a feature-sizes file: the reader-backed tasks' sizes.
    written = FS.read(builder.data_path / "metadata.json", history_length=LENGTH)
    assert written == families.feature_sizes(families.MOVIELENS, LENGTH)
    assert str(builder.info.version) == "1.0.0"
    first = next(iter(builder.as_dataset(split="test").take(1).as_numpy_iterator()))
    assert first["user_item_titles"].shape == (LENGTH,) and first["candidate_item_ids"].shape == (
        20,
    )


@pytest.mark.parametrize(
    "task",
    [
        "movielens_next_item_userllm_h20",
        "movielens_favorite_genre_tp_h20",
        "movielens_next_item_hybrid_h20",
        "movielens_encoder_pretrain_h20",
    ],
)
def test_tfds_tasks_give_the_reader_tasks_examples(built, monkeypatch, task):
    _, data_dir = built
    import tasks.movielens  # noqa: F401
    from tasks import common, tfds_tasks

    name = task + "_tfds_test"
    if name not in seqio.TaskRegistry.names():
        tfds_tasks.register_tfds_tasks(
            tasks.movielens.FAMILY, "ml-latest-small", str(data_dir), "_tfds_test"
        )
    for split in ("test", "validation"):
        want, got = _elements(task, split), _elements(name, split)
        assert len(got) == len(want) > 500, (split, len(got), len(want))
        for a, b in zip(want, got, strict=True):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{task} {split} {k}")
    assert common.task_info(name).task == common.task_info(task).task


@pytest.mark.slow
def test_tfds_build_command_line_on_the_bundled_data(tmp_path):
    # The real `tfds build` CLI (it needs mlcroissant: the project's "tfds" extra).
    args = ["-m", "tensorflow_datasets.scripts.cli.main", "build",
            "--imports=user_llm.data.tfds_builders", "user_llm_movielens",
            f"--config=ml-latest-small_h{LENGTH}", f"--data_dir={tmp_path / 'data'}",
            f"--manual_dir={tmp_path / 'manual'}"]  # fmt: skip
    (tmp_path / "manual").mkdir()
    run_module(args, timeout=900)
    built = tmp_path / "data" / "user_llm_movielens" / f"ml-latest-small_h{LENGTH}" / "1.0.0"
    assert (built / "dataset_info.json").is_file() and (built / "metadata.json").is_file()
    assert list(built.glob("user_llm_movielens-test.tfrecord*")), sorted(built.iterdir())


def test_amazon_sample_builds_and_reads_as_the_reader_tasks(tmp_path):
    # The Amazon Reviews 2023 sample in ../shared/data (no meta files: item ids stand in for
    # titles), built with the "all" config from that folder as the manual folder.
    import tensorflow_datasets as tfds

    import tasks.amazon_reviews as amazon
    from tasks import tfds_tasks

    if not families.data_available(amazon.FAMILY):
        pytest.skip("the Amazon Reviews sample is not beside the repository")
    manual = families.resolve_data_dir(amazon.FAMILY)
    builder = tfds.builder(f"user_llm_amazon_reviews/all_h{LENGTH}", data_dir=tmp_path)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    tfds_tasks.register_tfds_tasks(amazon.FAMILY, "all", str(tmp_path), "_tfds_amazon")
    for task in ("amazon_reviews_next_item_userllm_h20", "amazon_reviews_review_gen_tp_h20"):
        want, got = _elements(task, "test"), _elements(task + "_tfds_amazon", "test")
        assert len(got) == len(want) > 0, (task, len(got), len(want))
        for a, b in zip(want, got, strict=True):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{task} {k}")


def test_beam_build_in_shards_equals_the_one_machine_build(built, tmp_path):
    """The Beam path (the large releases' builders), run by the DirectRunner on ml-latest-small
    cut into shards of 128 users: every split holds the one-machine build's examples, in its
    order, with the same metadata."""
    import tensorflow_datasets as tfds

    from user_llm.data import tfds_builders

    one_machine, _ = built
    config = tfds_builders.HistoriesConfig(
        name=f"ml-latest-small_h{LENGTH}_beam", source="ml-latest-small", history_length=LENGTH,
        beam=True, users_per_shard=128,
    )  # fmt: skip
    builder = tfds_builders.UserLlmMovielens(config=config, data_dir=tmp_path / "data")
    (tmp_path / "manual").mkdir()
    download = tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual"))
    builder.download_and_prepare(download_dir=tmp_path / "downloads", download_config=download)
    shards = list((tmp_path / "downloads").rglob("shard_*.pkl"))
    assert len(shards) == 5, shards  # 610 users
    assert dict(builder.info.metadata) == dict(one_machine.info.metadata)
    for split in ("train", "validation", "test"):
        want = one_machine.as_dataset(split=split).as_numpy_iterator()
        got = list(builder.as_dataset(split=split).as_numpy_iterator())
        assert len(got) == one_machine.info.splits[split].num_examples > 600, split
        for a, b in zip(want, got, strict=True):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{split} {k}")


def test_large_releases_build_with_beam_and_name_the_install_without_it(monkeypatch):
    import sys

    from user_llm.data import tfds_builders

    configs = {c.name: c for c in tfds_builders.UserLlmMovielens.BUILDER_CONFIGS}
    assert configs["ml-25m_h50"].beam and not configs["ml-latest-small_h50"].beam
    assert all(c.beam for c in tfds_builders.UserLlmAmazonReviews.BUILDER_CONFIGS)
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # as if not installed
    with pytest.raises(ImportError, match=r"ml-25m_h50 builds with Apache Beam.*\[beam\]"):
        tfds_builders._require_beam("user_llm_movielens/ml-25m_h50")
