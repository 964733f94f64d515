"""Offline caching with SeqIO's Apache Beam pipeline (DirectRunner's in-process FnApiRunner):
a cached task reads back the same examples and trains to the same first-step loss.

Needs the ``beam`` extra and ``pip install --no-deps apache-beam==2.77.0`` (see setup.py)."""

from __future__ import annotations

import re

import pytest
from conftest import run_module

pytest.importorskip("apache_beam", reason="pip install -e .[beam] and apache-beam --no-deps")
pytestmark = pytest.mark.slow

TASK = "movielens_titles_lm"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("seqio_cache")
    run_module(
        ["-m", "seqio.scripts.cache_tasks_main", "--module_import=tasks.movielens_lm",
         f"--tasks={TASK}", f"--output_cache_dir={out}",
         "--pipeline_options=--runner=FnApiRunner"]
    )  # fmt: skip
    assert (out / TASK).is_dir() and any((out / TASK).rglob("COMPLETED"))
    return out


def _first_step_loss(model_dir, cache_dir=None) -> float:
    from tasks import movielens_lm

    n = len(movielens_lm._movie_lines("validation"))  # one batch = the whole split
    args = ["-m", "user_llm.train", "--gin_file=experiments/movielens_titles_lm.gin",
            "--gin_file=local_tiny.gin", f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=1",
            "--gin.PACK=False", f"--gin.BATCH_SIZE={n}", "--gin.train_lib.train.log_every_steps=1",
            "--gin.train_lib.train.eval_every_steps=0",
            "--gin.train/pipeline.DatasetConfig.split='validation'",
            "--gin.train/pipeline.DatasetConfig.shuffle=False"]  # fmt: skip
    if cache_dir is not None:
        args += ["--gin.train/pipeline.DatasetConfig.use_cached=True",
                 f"--gin.train/pipeline.DatasetConfig.cache_dirs=('{cache_dir}',)"]  # fmt: skip
    out = run_module(args).stdout
    return float(re.search(r"step 1: .*train/loss=(\S+)", out).group(1))


def test_cached_task_reads_back_the_same_examples(cache_dir):
    import seqio

    from tasks import movielens_lm  # noqa: F401

    task = seqio.get_mixture_or_task(TASK)
    lengths = {"targets": 128}
    seqio.add_global_cache_dirs([str(cache_dir)])

    def examples(cached):
        ds = task.get_dataset(lengths, split="validation", use_cached=cached, shuffle=False)
        return sorted(tuple(ex["targets"].tolist()) for ex in ds.as_numpy_iterator())

    assert examples(True) == examples(False)


def test_cached_task_trains_to_the_same_first_step_loss(cache_dir, tmp_path):
    cached = _first_step_loss(tmp_path / "cached", cache_dir)
    uncached = _first_step_loss(tmp_path / "uncached")
    # Same examples in another row order: the loss is a sum over rows, equal up to round-off.
    assert cached == pytest.approx(uncached, rel=1e-5)
