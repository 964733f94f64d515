"""Two processes on JAX's distributed runtime (127.0.0.1, 4 CPU devices each) vs one process.

Runs ``launch/local_multiprocess.py`` exactly as the README does. The titles LM is read
unshuffled and unpacked, so a global batch holds the same examples whether one host reads
them or two hosts read alternate examples (``seqio.ShardInfo``): only the row order inside a
batch differs, and the loss is a sum over rows, so parameters agree up to float32 round-off.
"""

from __future__ import annotations

import os
import re
import shutil
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

LAUNCHER = str(REPO_ROOT / "launch" / "local_multiprocess.py")
EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
# Sharded sums in another order (and across processes): float32 round-off, nothing more.
RTOL, ATOL = 1e-4, 1e-6

COMMON = [
    "--gin_file=experiments/movielens_titles_lm.gin",
    "--gin_file=local_tiny.gin",
    "--gin.TASK_FEATURE_LENGTHS={'targets': 64}",
    "--gin.PACK=False",
    "--gin.train/pipeline.DatasetConfig.shuffle=False",
    "--gin.decoder.DecoderConfig.num_kv_heads=4",
    "--gin.train_lib.MeshConfig.mesh_shape=(2, 4)",
    "--gin.train_lib.train.eval_every_steps=0",
]


def _args(model_dir: Path, steps: int, save_every: int, *extra: str) -> list[str]:
    return [
        *COMMON,
        f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.TRAIN_STEPS={steps}",
        f"--gin.train_lib.train.save_every_steps={save_every}",
        *extra,
    ]


def one_process(args: list[str]) -> str:
    """One process, 8 devices, same mesh; returns its stdout."""
    return run_module(["-m", "user_llm.train", *args], env_extra=EIGHT_DEVICES).stdout


def two_processes(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """Two processes x 4 devices through the launcher; output lines are prefixed ``[p<i>]``."""
    return run_module(
        [LAUNCHER, "--num_processes=2", "--devices_per_process=4", "--", *args], check=check
    )


def assert_params_close(a_dir: Path, b_dir: Path) -> None:
    a, b = checkpoints.read_params(a_dir), checkpoints.read_params(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=RTOL, atol=ATOL, err_msg=k)


def _loss(stdout: str, step: int) -> float:
    return float(re.search(rf"step {step}: .*train/loss=(\S+)", stdout).group(1))


@pytest.fixture(scope="module")
def ten_steps(tmp_path_factory) -> dict[str, object]:
    """The same 10 steps run by one process and by two (shared by the tests below)."""
    root = tmp_path_factory.mktemp("ten_steps")
    one_out = one_process(_args(root / "one", 10, 10))
    two_out = two_processes(_args(root / "two", 10, 10)).stdout
    return {"root": root, "one": one_out, "two": two_out}


def test_two_processes_train_like_one(ten_steps):
    root = ten_steps["root"]
    two_out = ten_steps["two"]
    assert "[p0] Processes: {'process': '0/2', 'local_devices': 4, 'global_devices': 8" in two_out
    assert "Mesh {'data': 2, 'model': 4} over 8 devices (2 process(es)" in two_out
    assert "[p1] step 10:" not in two_out  # console log from process 0 only
    assert _loss(two_out, 10) == pytest.approx(_loss(ten_steps["one"], 10), rel=RTOL)
    assert_params_close(root / "one", root / "two")


def test_checkpoints_cross_between_one_and_two_processes(ten_steps, tmp_path):
    """Written by two processes, resumed by one; written by one, resumed by two: same result."""
    root = ten_steps["root"]
    to_one, to_two = tmp_path / "two_then_one", tmp_path / "one_then_two"
    shutil.copytree(root / "two", to_one)
    shutil.copytree(root / "one", to_two)
    # Both paths share every binding (TRAIN_STEPS=20 also sets the schedule for steps 10-20).
    out = one_process(_args(to_one, 20, 10))
    assert "Resumed from checkpoint step 10" in out
    out = two_processes(_args(to_two, 20, 10)).stdout
    assert "[p0] Resumed from checkpoint step 10" in out
    assert "[p1] Resumed from checkpoint step 10" in out
    assert_params_close(to_one, to_two)


def test_sigkill_one_process_then_restart_resumes(tmp_path):
    steps, save_every = 30, 10
    killed = tmp_path / "killed"
    log = tmp_path / "launcher.log"
    cmd = [sys.executable, LAUNCHER, "--", *_args(killed, steps, save_every)]
    with open(log, "w") as f:
        launcher = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "10").exists():
        assert launcher.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    pid = int(re.search(r"\[launcher\] process 1 pid (\d+)", log.read_text()).group(1))
    os.kill(pid, signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0  # the job fails as a whole: process 0 is stopped
    text = log.read_text()
    assert "process 1 exited -9; stopping the others" in text
    done = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert done and done[-1] < steps, f"killed run had already finished: {done}"

    resumed = two_processes(_args(killed, steps, save_every)).stdout
    assert f"[p0] Resumed from checkpoint step {done[-1]}" in resumed
    assert f"[p0] step {steps}:" in resumed
    reference = tmp_path / "reference"
    one_process(_args(reference, steps, save_every))
    assert_params_close(reference, killed)


def test_eval_counts_every_example_once_across_processes(tmp_path):
    """487 validation titles, eval batch 6 (3 per host): host 0 holds 244 titles in 82
    batches, host 1 243 in 81. Both must run 82 steps (the last on zero-weight filler) or the
    job hangs; the token count must equal one process reading the whole set."""
    extra = (
        "--gin.train_lib.train.eval_every_steps=2",
        "--gin.train_lib.train.eval_max_batches=None",
        "--gin.eval/pipeline.DatasetConfig.batch_size=6",
    )
    one = one_process(_args(tmp_path / "one", 2, 0, *extra))
    two = two_processes(_args(tmp_path / "two", 2, 0, *extra)).stdout
    tokens = lambda out: int(re.search(r"eval at step 2: (\d+) target tokens", out).group(1))
    eval_loss = lambda out: float(re.search(r"step 2: eval/loss=(\S+)", out).group(1))
    assert tokens(two) == tokens(one) > 0
    assert eval_loss(two) == pytest.approx(eval_loss(one), rel=RTOL)
