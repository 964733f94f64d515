"""The entry points choose XLA:CPU's memory-optimized scheduler through ``XLA_FLAGS``, which XLA
reads once when its backend starts: so importing any entry point must not start it."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT

from user_llm import xla_options

ENTRY_POINTS = (
    "user_llm.train", "user_llm.evaluate", "user_llm.encoder_eval", "user_llm.generate",
    "user_llm.main_job", "user_llm.experiments", "user_llm.item_head_refit", "user_llm.probe",
    "user_llm.import_checkpoint",
)  # fmt: skip


def test_the_memory_scheduler_is_added_unless_the_user_chose_one():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    xla_options.prefer_memory_scheduler(env)
    assert env["XLA_FLAGS"] == (
        "--xla_force_host_platform_device_count=8 "
        "--xla_cpu_enable_concurrency_optimized_scheduler=false"
    )
    chosen = {"XLA_FLAGS": xla_options.CONCURRENCY_SCHEDULER}
    xla_options.prefer_memory_scheduler(chosen)
    assert chosen["XLA_FLAGS"] == xla_options.CONCURRENCY_SCHEDULER
    empty: dict[str, str] = {}
    xla_options.prefer_memory_scheduler(empty)
    assert empty["XLA_FLAGS"] == xla_options.MEMORY_SCHEDULER


def test_importing_the_entry_points_leaves_xla_flags_unread():
    # XLA_FLAGS set after the imports must still be read: an unknown flag then stops the first
    # computation. Had an import started the backend, the flag would be ignored silently.
    code = "\n".join([
        *(f"import {m}" for m in ENTRY_POINTS),
        "import os",
        "os.environ['XLA_FLAGS'] = '--xla_no_such_flag_for_this_test=1'",
        "import jax.numpy as jnp",
        "print(float(jnp.ones(2).sum()))",
    ])  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0, proc.stdout
    assert "xla_no_such_flag_for_this_test" in proc.stderr
