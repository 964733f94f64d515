"""Faults that must never lose a good checkpoint (issue "Nothing good is ever lost", items 1-3):
a diverging run, a resume with the wrong config, bit rot in the newest step, and a fresh start
over quarantined steps. The CLI cases run ``python -m user_llm.train`` on the real
ml-latest-small titles task with the tiny overlay; the bit-rot cases use ``Checkpointer``
in-process on a small state."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_module

from user_llm import checkpoints

BASE = [
    "-m",
    "user_llm.train",
    "--gin_file=experiments/movielens_titles_lm.gin",
    "--gin_file=local_tiny.gin",
    "--gin.TASK_FEATURE_LENGTHS={'targets': 32}",
    "--gin.train_lib.train.eval_every_steps=0",
]


def _train(model_dir: Path, steps: int, save_every: int, *extra: str, check: bool = True):
    return run_module(
        [
            *BASE,
            f"--gin.MODEL_DIR='{model_dir}'",
            f"--gin.TRAIN_STEPS={steps}",
            f"--gin.train_lib.train.save_every_steps={save_every}",
            *extra,
        ],
        check=check,
    )


def _steps(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit())


def _one_error_line(proc) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_divergence_stops_at_the_step_saves_nothing_and_keeps_the_last_good(tmp_path):
    _train(tmp_path, 10, 5, "--gin.train_lib.train.keep_checkpoints=1")
    assert _steps(tmp_path) == [10]
    good = checkpoints.read_params(tmp_path)
    # Every step saved, nothing logged, a keep policy of 1: a NaN must still save nothing.
    proc = _train(
        tmp_path,
        30,
        1,
        "--gin.LEARNING_RATE=1e30",
        "--gin.train_lib.train.log_every_steps=0",
        "--gin.train_lib.train.keep_checkpoints=1",
        check=False,
    )
    line = _one_error_line(proc)
    assert "Non-finite training state at step 11" in line, line
    assert f"last good checkpoint is step 10 in {tmp_path / 'checkpoints'}" in line, line
    assert _steps(tmp_path) == [10]
    after = checkpoints.read_params(tmp_path)
    for name, value in good.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    # A rerun with a sane learning rate resumes from the good step.
    proc = _train(tmp_path, 12, 1, "--gin.train_lib.train.keep_checkpoints=1")
    assert "Resumed from checkpoint step 10" in proc.stdout


@pytest.mark.slow
def test_a_config_mismatch_is_refused_and_moves_nothing(tmp_path):
    _train(tmp_path, 10, 10)
    first_config = (tmp_path / "config.gin").read_text()
    proc = _train(tmp_path, 20, 10, "--gin.decoder.DecoderConfig.num_layers=3", check=False)
    line = _one_error_line(proc)
    assert "written by another configuration" in line and "Nothing was moved" in line, line
    assert "layers_2/" in line and "only in this config" in line, line
    assert _steps(tmp_path) == [10]
    assert not (tmp_path / checkpoints.CORRUPT_DIR).exists()
    # The first start's config is kept beside the refused one.
    assert (tmp_path / "config.1.gin").read_text() == first_config
    proc = _train(tmp_path, 20, 10)
    assert "Resumed from checkpoint step 10" in proc.stdout


@pytest.mark.slow
def test_no_fresh_start_over_quarantined_steps_unless_told(tmp_path):
    _train(tmp_path, 10, 10)
    for p in (tmp_path / "checkpoints" / "10").rglob("*"):
        if p.is_file():
            p.write_bytes(b"garbage")
    line = _one_error_line(_train(tmp_path, 10, 10, check=False))
    assert "No readable checkpoint" in line or "unreadable" in line, line
    line = _one_error_line(_train(tmp_path, 10, 10, check=False))
    assert "refusing to start from scratch" in line and "allow_fresh_start" in line, line
    proc = _train(tmp_path, 10, 10, "--gin.train_lib.train.allow_fresh_start=True")
    assert "step 10:" in proc.stdout and _steps(tmp_path) == [10]


def _state(seed: int) -> dict:
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "step": jnp.asarray(seed, jnp.int32),
        "params": {
            "dense": {"kernel": jax.random.normal(keys[0], (64, 32)), "bias": jnp.zeros((32,))},
            "emb": jax.random.normal(keys[1], (100, 16)).astype(jnp.bfloat16),
        },
        "opt_state": [jax.random.normal(keys[2], (64, 32)), jnp.asarray(3, jnp.int32)],
    }


def _abstract(state):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _equal(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def test_manifest_is_on_disk_before_the_save_finishes(tmp_path):
    ckpt = checkpoints.Checkpointer(tmp_path, keep=2, async_save=True)
    ckpt.save(1, _state(1))
    # Right after save() returns (the write may still be in flight) the manifest is there.
    manifest = json.loads((tmp_path / checkpoints.MANIFEST_DIR / "1.json").read_text())
    assert manifest["step"] == 1 and "params/dense/kernel" in manifest["arrays"]
    ckpt.close()


def test_swapped_values_in_the_newest_step_are_caught_and_the_previous_used(tmp_path):
    """Bit rot that Orbax reads without complaint: step 2's files replaced by a valid
    checkpoint of other values. The manifest (written before the save) catches it."""
    ckpt = checkpoints.Checkpointer(tmp_path, keep=3, async_save=False)
    ckpt.save(1, _state(1))
    ckpt.save(2, _state(2))
    ckpt.close()
    other = checkpoints.Checkpointer(tmp_path / "other", keep=3, async_save=False)
    other.save(2, _state(7))
    other.close()
    target = tmp_path / "checkpoints" / "2"
    for src in (tmp_path / "other" / "checkpoints" / "2").rglob("*"):
        if src.is_file():
            dest = target / src.relative_to(tmp_path / "other" / "checkpoints" / "2")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(src.read_bytes())
    restored, step = checkpoints.Checkpointer(tmp_path).restore_latest(_abstract(_state(1)))
    assert step == 1 and _equal(restored, _state(1))
    moved = list((tmp_path / checkpoints.CORRUPT_DIR).iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("2-")


def test_byte_flips_in_the_newest_step_never_restore_silently_wrong_values(tmp_path):
    """Two-byte flips at many offsets of every data file of the newest step: each restore
    either returns exactly the saved values or moves the step aside and falls back."""
    outcomes = set()
    for trial in range(12):
        root = tmp_path / str(trial)
        ckpt = checkpoints.Checkpointer(root, keep=3, async_save=False)
        ckpt.save(1, _state(1))
        ckpt.save(2, _state(2))
        ckpt.close()
        files = sorted(
            p for p in (root / "checkpoints" / "2").rglob("*") if p.is_file() and p.stat().st_size
        )
        victim = files[trial % len(files)]
        data = bytearray(victim.read_bytes())
        offset = (trial * 7919) % max(len(data) - 2, 1)
        data[offset] ^= 0x5A
        data[offset + 1 if offset + 1 < len(data) else offset] ^= 0x21
        victim.write_bytes(bytes(data))
        try:
            restored, step = checkpoints.Checkpointer(root).restore_latest(_abstract(_state(1)))
        except checkpoints.CheckpointError:
            outcomes.add("refused")
            continue
        expected = _state(step)
        assert _equal(restored, expected), f"{victim.name}@{offset}: silently wrong values"
        outcomes.add("same" if step == 2 else "fell back")
    assert "fell back" in outcomes, outcomes


def test_structure_mismatch_names_parameters_and_shapes():
    saved = _abstract(_state(1))
    wanted = _abstract(_state(1))
    wanted["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct((64, 48), jnp.float32)
    wanted["params"]["extra"] = jax.ShapeDtypeStruct((3,), jnp.float32)
    message = checkpoints.structure_mismatch(saved, wanted)
    assert "dense/kernel: checkpoint (64, 32), this config (64, 48)" in message
    assert "extra: only in this config" in message
    assert checkpoints.structure_mismatch(saved, _abstract(_state(2))) is None
    wanted = _abstract(_state(1))
    wanted["opt_state"] = wanted["opt_state"][:1]
    assert "optimizer state differs" in checkpoints.structure_mismatch(saved, wanted)


def test_a_symlinked_bad_step_is_moved_aside_without_writing_through_the_link(tmp_path):
    """A step that is a link to storage elsewhere: quarantining it moves the link and the
    manifest into MODEL_DIR/checkpoints_corrupt; nothing is written where the link points."""
    model_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    ckpt = checkpoints.Checkpointer(model_dir, keep=3, async_save=False)
    ckpt.save(1, _state(1))
    ckpt.save(2, _state(2))
    ckpt.close()
    step = model_dir / "checkpoints" / "2"
    step.rename(elsewhere)
    step.symlink_to(elsewhere, target_is_directory=True)
    for p in elsewhere.rglob("*"):
        if p.is_file():
            p.write_bytes(b"garbage")
    before = sorted(p.name for p in elsewhere.rglob("*"))
    restored, got = checkpoints.Checkpointer(model_dir).restore_latest(_abstract(_state(1)))
    assert got == 1 and _equal(restored, _state(1))
    moved = list((model_dir / checkpoints.CORRUPT_DIR).iterdir())
    assert len(moved) == 1 and (moved[0] / "step_link").is_symlink()
    assert (moved[0] / "user_llm_manifest.json").is_file()
    assert sorted(p.name for p in elsewhere.rglob("*")) == before  # nothing written there


@pytest.mark.slow
def test_a_batch_the_mesh_cannot_split_is_one_clear_line(tmp_path):
    proc = run_module(
        [*BASE, f"--gin.MODEL_DIR='{tmp_path}'", "--gin.BATCH_SIZE=6",
         "--gin.train_lib.MeshConfig.mesh_shape=(4, 1)"],
        env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
        check=False,
    )  # fmt: skip
    line = _one_error_line(proc)
    assert "BATCH_SIZE 6 is not divisible by the 4 data-parallel devices" in line, line


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_save_then_restart(tmp_path):
    """kill -9 while Orbax is writing a step (its temporary folder exists, the step is not
    finalized): the half-written step never counts as finished, every finished step keeps its
    manifest and restores, and the rerun resumes from the newest finished step to the end."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO_ROOT

    args = [*BASE, f"--gin.MODEL_DIR='{tmp_path}'", "--gin.TRAIN_STEPS=400",
            "--gin.train_lib.train.save_every_steps=2"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    ckpt_dir, deadline, partial = tmp_path / "checkpoints", time.time() + 300, []
    try:
        while not partial:
            assert proc.poll() is None, "training ended before a save could be interrupted"
            assert time.time() < deadline, "never saw a save in progress"
            finished = ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
            if finished:
                partial = [p for p in ckpt_dir.iterdir() if "orbax-checkpoint-tmp" in p.name]
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    done = _steps(tmp_path)
    assert done and done[-1] < 400
    for step in done:
        assert (tmp_path / checkpoints.MANIFEST_DIR / f"{step}.json").exists(), step
    resumed = _train(tmp_path, 400, 200)
    assert f"Resumed from checkpoint step {done[-1]}" in resumed.stdout + resumed.stderr
    assert _steps(tmp_path)[-1] == 400
    assert not list(ckpt_dir.glob("*orbax-checkpoint-tmp*"))
