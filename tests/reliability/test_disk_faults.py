"""A full, read-only or unwritable disk (issue "Nothing good is ever lost", item 11): one clear
line naming the step and the cause, the half-written step removed, every finished step kept,
and a rerun that resumes once the disk is writable again.

The real-disk cases mount a small tmpfs (root or CAP_SYS_ADMIN, as on this project's machines);
where mounting is not permitted they are skipped with the reason. The in-process cases inject
the error Orbax raises and always run.
"""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from test_checkpoint_faults import _steps, _train

from user_llm import checkpoints, errors


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs at tmp_path/disk, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave_bytes: int) -> Path:
    """Fills the file system so that only about ``leave_bytes`` stay free."""
    free = subprocess.run(
        ["df", "--output=avail", "-B1", str(disk)], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    filler = disk / "filler"
    with filler.open("wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(int(free) - leave_bytes, 0))
    return filler


def _remount(disk: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True)


def _state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(256, 256)), jnp.float32), "step": jnp.int32(seed)}


def test_write_failures_are_recognised_in_both_forms():
    assert errors.write_failure_cause(OSError(errno.ENOSPC, "x")) == "the disk is full"
    assert errors.write_failure_cause(OSError(errno.EROFS, "x")) == "the file system is read-only"
    orbax_style = ValueError("RESOURCE_EXHAUSTED: ... No space left on device [os_error_code=28]")
    assert errors.write_failure_cause(orbax_style) == "the disk is full"
    assert errors.write_failure_cause(ValueError("shape mismatch")) is None
    assert errors.write_failure_cause(OSError(errno.ENOENT, "missing")) is None
    line = errors.write_failure_message(OSError(errno.EACCES, "Permission denied", "/m/config.gin"))
    assert "permission denied" in line and "/m/config.gin" in line and "\n" not in line


def test_an_injected_write_failure_removes_only_the_partial_step(tmp_path, monkeypatch):
    ckpt = checkpoints.Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, _state(1))
    ckpt.wait()
    partial = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp"

    def failing_save(step, args, force):
        partial.mkdir()
        (partial / "half").write_bytes(b"x")
        raise ValueError("Failed writing: \"d/ab\": No space left on device [os_error_code='28']")

    monkeypatch.setattr(ckpt._manager, "save", failing_save)
    with pytest.raises(checkpoints.CheckpointWriteError) as info:
        ckpt.save(2, _state(2))
    message = str(info.value)
    assert "step 2" in message and "the disk is full" in message and "[1]" in message
    assert not partial.exists() and _steps(tmp_path) == [1]
    assert sorted(p.name for p in (tmp_path / checkpoints.MANIFEST_DIR).iterdir()) == ["1.json"]
    monkeypatch.undo()
    restored, step = checkpoints.Checkpointer(tmp_path).restore_latest(_state(0))
    assert step == 1 and np.array_equal(restored["w"], _state(1)["w"])


def test_a_full_disk_during_an_async_save_keeps_the_finished_step(small_disk):
    model_dir = small_disk / "run"
    ckpt = checkpoints.Checkpointer(model_dir)
    ckpt.save(1, _state(1))
    ckpt.wait()
    filler = _fill(small_disk, leave_bytes=64 << 10)  # room for a manifest, not for a step
    ckpt.save(2, _state(2))
    with pytest.raises(checkpoints.CheckpointWriteError, match="step 2 .*the disk is full"):
        ckpt.close()
    assert _steps(model_dir) == [1]
    assert not list((model_dir / "checkpoints").glob("2.orbax-checkpoint-tmp*"))
    filler.unlink()
    restored, step = checkpoints.Checkpointer(model_dir).restore_latest(_state(0))
    assert step == 1 and np.array_equal(restored["w"], _state(1)["w"])


@pytest.mark.slow
def test_training_on_a_full_then_read_only_disk_stops_with_one_line_and_resumes(small_disk):
    model_dir = small_disk / "run"
    _train(model_dir, 5, 5)
    good = checkpoints.read_params(model_dir)
    filler = _fill(small_disk, leave_bytes=256 << 10)
    full = _train(model_dir, 10, 5, check=False)
    assert full.returncode == 1, full.stderr[-3000:]
    # Orbax's writer threads log their own failures (absl lines, asyncio traces) around it;
    # ours is the one ERROR line, and says what happened and what is kept.
    errors_ = [ln for ln in full.stderr.splitlines() if ln.startswith("ERROR: ")]
    assert len(errors_) == 1, full.stderr[-3000:]
    assert "step 10" in errors_[0] and "the disk is full" in errors_[0] and "[5]" in errors_[0]
    assert _steps(model_dir) == [5]
    filler.unlink()
    _remount(small_disk, "ro")
    try:
        ro = _train(model_dir, 10, 5, check=False)
    finally:
        _remount(small_disk, "rw")
    assert ro.returncode == 1 and "Traceback" not in ro.stderr, ro.stderr[-3000:]
    assert [ln for ln in ro.stderr.splitlines() if ln.startswith("ERROR: ")] == [
        ro.stderr.rstrip().splitlines()[-1]
    ]
    assert "read-only" in ro.stderr.rstrip().splitlines()[-1]
    after = checkpoints.read_params(model_dir, 5)
    for name, value in good.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    resumed = _train(model_dir, 10, 5)
    assert "Resumed from checkpoint step 5" in resumed.stdout + resumed.stderr
    assert _steps(model_dir)[-1] == 10
