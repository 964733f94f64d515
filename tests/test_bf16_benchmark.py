"""benchmarks/bf16_matmul.py: its measurement checks bfloat16 against float32, and its table
says which options failed instead of inventing a rate."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bf16_matmul.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))  # its ``from machine import``
    spec = importlib.util.spec_from_file_location("bf16_matmul", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measure_reports_rates_and_the_bf16_error_against_float32(bench):
    row = bench.measure_jax([64], runs=2)
    for case in ("float32", "bfloat16", "bfloat16, float32 acc."):
        assert row[f"{case} @ 64"]["gflops"] > 0
    assert row["float32 @ 64"]["max_rel_err"] < 1e-5  # the same product, in float32
    assert 0 < row["bfloat16 @ 64"]["max_rel_err"] < 2e-2  # bf16 rounding, not garbage


def test_report_gives_ratios_and_names_a_failed_option(bench):
    cpu = {"model": "x", "cores": 2, **{f: f == "avx2" for f in bench.CPU_FLAGS}}
    ok = {
        f"{c} @ 8": {"gflops": g, "max_rel_err": 1e-3}
        for c, g in (("float32", 100.0), ("bfloat16", 50.0), ("bfloat16, float32 acc.", 40.0))
    }
    text = bench.report(cpu, {"default": ok, "bad": {"error": "Unknown flag"}}, None, [8], "cmd")
    assert "| default | 100.0 | 50.0 | 40.0 | 0.50x at 8 |" in text
    assert "| bad | - | - | - | Unknown flag |" in text
    assert "amx_bf16 no" in text and "avx2 yes" in text
    assert set(bench.cpu_info()) == {"model", "cores", *bench.CPU_FLAGS}
