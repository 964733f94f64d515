"""benchmarks/phase2_step.py on the tiny text-prompt model: every way of computing the step
gives the same parameters (across processes too), and the table reports what was compiled."""

from __future__ import annotations

import json

import pytest
from conftest import run_module

pytestmark = pytest.mark.slow


def test_both_schedulers_give_the_same_step_and_reports_remat_flops(tmp_path):
    out = tmp_path / "sched.md"
    proc = run_module([
        "benchmarks/phase2_step.py", "--compare=remat", "--both_schedulers", "--experiment=tp_tiny",
        "--strategies=full", "--steps=1", f"--output={out}",
    ])  # fmt: skip
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["way"] for r in rows] == [
        "concurrency (XLA's default), no remat",
        "concurrency (XLA's default), remat full",
        "memory (the entry points' default), no remat",
        "memory (the entry points' default), remat full",
    ]
    # Each row against the first, parameters read back from the other process's file: the
    # scheduler orders the work and never changes it; remat changes it by float32 round-off.
    assert rows[2]["max_abs_param_diff"] == 0.0
    assert all(0 <= r["max_abs_param_diff"] < 1e-4 for r in rows[1:])
    # Remat recomputes each layer's forward in the backward pass: more FLOPs, same step.
    assert rows[1]["step_gflop"] > 1.1 * rows[0]["step_gflop"]
    assert rows[3]["step_gflop"] == pytest.approx(rows[1]["step_gflop"])
    assert "| full | memory (the entry points' default), remat full |" in out.read_text()
    assert "--compare=remat --both_schedulers --experiment=tp_tiny" in proc.stdout
