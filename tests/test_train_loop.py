"""The train entry point end to end, in subprocesses, on the real ml-latest-small titles task.

Covers: the CLI smoke run, resumption after SIGKILL giving bit-identical parameters, corrupt
and half-written checkpoints, warm start through an assignment map, and the 2x4 mesh on 8
simulated devices matching one device.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, run_module

from user_llm import checkpoints

pytestmark = pytest.mark.slow

BASE = [
    "-m",
    "user_llm.train",
    "--gin_file=experiments/movielens_titles_lm.gin",
    "--gin_file=local_tiny.gin",
    "--gin.TASK_FEATURE_LENGTHS={'targets': 64}",
    "--gin.train_lib.train.eval_every_steps=0",
]


def _train_args(model_dir: Path, steps: int, save_every: int, *extra: str) -> list[str]:
    return [
        *BASE,
        f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.TRAIN_STEPS={steps}",
        f"--gin.train_lib.train.save_every_steps={save_every}",
        *extra,
    ]


def _final_params(model_dir: Path) -> dict[str, np.ndarray]:
    return checkpoints.read_params(model_dir)


def test_cli_smoke_run_writes_config_summaries_and_checkpoints(tmp_path):
    # A relative MODEL_DIR, as the README's main job uses, resolved against the working dir.
    args = _train_args(Path("smoke"), 20, 10, "--gin.train_lib.train.eval_every_steps=10")
    proc = run_module(args, cwd=tmp_path)
    tmp_path = tmp_path / "smoke"
    assert "step 20:" in proc.stdout and "eval/loss" in proc.stdout
    # The default log is progress and results: two saves and two evals, and not one INFO line
    # of Orbax (~50 per save) or SeqIO (one per feature per dataset) among them.
    ours = {p.name for d in ("user_llm", "tasks") for p in (REPO_ROOT / d).rglob("*.py")}
    info = re.findall(r"^I\d{4} [\d:.]+ +\d+ (\S+\.py):\d+\] .*", proc.stderr, re.M)
    assert not [name for name in info if name not in ours], proc.stderr
    assert len((proc.stdout + proc.stderr).splitlines()) < 40, proc.stdout + proc.stderr
    assert (tmp_path / "config.gin").read_text().count("movielens_titles_lm") >= 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
        "10",
        "20",
    ]
    assert any((tmp_path / "summaries").iterdir())
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report[0]["dataset"] == "movielens" and report[0]["rows_read"] == 100836
    assert report[0]["rows_skipped"] == {}
    # Rerunning with the same step count resumes and has nothing left to do.
    again = run_module(_train_args(Path("smoke"), 20, 10), cwd=tmp_path.parent)
    assert "Resumed from checkpoint step 20" in again.stdout


def test_sigkill_and_restart_gives_identical_parameters(tmp_path):
    steps, save_every = 300, 20
    straight = tmp_path / "straight"
    run_module(_train_args(straight, steps, save_every))

    killed = tmp_path / "killed"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(
        [sys.executable, *_train_args(killed, steps, save_every)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "40").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert done and done[-1] < steps, f"killed run had already finished: {done}"
    # Every finished step already has its manifest, whenever the kill came.
    for step in done:
        assert (killed / checkpoints.MANIFEST_DIR / f"{step}.json").exists(), step

    resumed = run_module(_train_args(killed, steps, save_every))
    assert "Resumed from checkpoint step" in resumed.stdout
    a, b = _final_params(straight), _final_params(killed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_corrupt_latest_checkpoint_is_moved_aside_and_previous_used(tmp_path):
    run_module(_train_args(tmp_path, 20, 10))
    data_files = sorted(
        p for p in (tmp_path / "checkpoints" / "20").rglob("*") if p.is_file() and "d" in p.parts
    )
    assert data_files
    victim = data_files[0]
    victim.write_bytes(b"\x00" * max(1, victim.stat().st_size // 2))
    # A half-written step (what a kill during a save leaves) must be ignored too.
    (tmp_path / "checkpoints" / "30.orbax-checkpoint-tmp-1").mkdir()
    (tmp_path / "checkpoints" / "30.orbax-checkpoint-tmp-1" / "junk").write_text("x")

    proc = run_module(_train_args(tmp_path, 30, 10))
    assert "checkpoint step 20 is unreadable" in proc.stdout
    assert "Resumed from checkpoint step 10" in proc.stdout
    moved = list((tmp_path / checkpoints.CORRUPT_DIR).iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("20-")  # kept, not deleted
    assert (tmp_path / "checkpoints" / "30").is_dir()


def test_no_readable_checkpoint_stops_with_a_message(tmp_path):
    run_module(_train_args(tmp_path, 10, 10))
    for p in (tmp_path / "checkpoints" / "10").rglob("*"):
        if p.is_file():
            p.write_bytes(b"garbage")
    proc = run_module(_train_args(tmp_path, 20, 10), check=False)
    assert proc.returncode != 0
    assert "No readable checkpoint" in proc.stdout + proc.stderr
    assert (tmp_path / checkpoints.CORRUPT_DIR).is_dir()
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))


def test_warm_start_with_assignment_map_and_fallback_to_scratch(tmp_path):
    source = tmp_path / "source"
    run_module(_train_args(source, 10, 10))
    target = tmp_path / "target"
    # A model with one more layer: layers_2 has no source and starts from scratch.
    proc = run_module(
        _train_args(
            target,
            10,
            10,
            "--gin.decoder.DecoderConfig.num_layers=3",
            "--gin.train_lib.train.init_checkpoint=@train_lib.InitCheckpoint()",
            f"--gin.train_lib.InitCheckpoint.path='{source}'",
            "--gin.train_lib.InitCheckpoint.fallback_to_scratch=True",
            "--gin.train_lib.InitCheckpoint.assignment_map=[(r'layers_0/mlp/.*', None)]",
            "--gin.LEARNING_RATE=0.0",
        )
    )
    assert "Warm start from" in proc.stdout
    src, out = _final_params(source), _final_params(target)
    np.testing.assert_array_equal(src["layers_1/mlp/wo/kernel"], out["layers_1/mlp/wo/kernel"])
    assert not np.array_equal(src["layers_0/mlp/wo/kernel"], out["layers_0/mlp/wo/kernel"])
    assert "layers_2/mlp/wo/kernel" in out

    # Without fallback, a parameter missing from the source is a clear error.
    proc = run_module(
        _train_args(
            tmp_path / "strict",
            10,
            10,
            "--gin.decoder.DecoderConfig.num_layers=3",
            "--gin.train_lib.train.init_checkpoint=@train_lib.InitCheckpoint()",
            f"--gin.train_lib.InitCheckpoint.path='{source}'",
        ),
        check=False,
    )
    assert proc.returncode != 0
    assert "layers_2" in proc.stderr and "fallback_to_scratch" in proc.stderr


def test_2x4_mesh_on_8_devices_matches_one_device(tmp_path):
    """Same data, same steps: a (data=2, model=4) mesh reproduces the single-device run."""
    args = ("--gin.decoder.DecoderConfig.num_kv_heads=4",)
    one = tmp_path / "one"
    proc_one = run_module(
        _train_args(one, 10, 10, *args, "--gin.train_lib.MeshConfig.mesh_shape=(1, 1)"),
        env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
    )
    eight = tmp_path / "eight"
    proc = run_module(
        _train_args(eight, 10, 10, *args, "--gin.train_lib.MeshConfig.mesh_shape=(2, 4)"),
        env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    assert "step 10:" in proc.stdout
    a, b = _final_params(one), _final_params(eight)
    for k in a:
        # Sharded reductions sum in another order: allow float32 round-off, nothing more.
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    loss = lambda out: float(out.split("step 10:")[1].split("train/loss=")[1].split()[0])
    assert loss(proc.stdout) == pytest.approx(loss(proc_one.stdout), rel=1e-4)
