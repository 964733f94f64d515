"""benchmarks/train_throughput.py's ``--attention`` sets the decoder's attention implementation,
and the step it times computes the same loss as our attention (here through
``implementation="xla"``, which runs on a CPU; "cudnn" is the same call on a GPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"
# The 100M gin decoder shrunk to compile in seconds.
TINY = dict(vocab_size=256, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # its ``import timing``
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(module.CONFIGS, "tiny", ("models/llm/decoder_100m.gin", TINY, 2, 32))
    return module


def test_attention_option_reaches_the_model_and_gives_the_same_loss(bench):
    ours = bench.measure("tiny", steps=1)
    rows = [bench.measure("tiny", steps=1, attention=name) for name in ("xla", "jax_xla")]
    assert ours["attention_implementation"] == "ours"
    for row in rows:
        assert row["attention_implementation"] == "xla"
        assert row["initial_loss"] == pytest.approx(ours["initial_loss"], abs=1e-5)
        assert row["step_s_median"] > 0
