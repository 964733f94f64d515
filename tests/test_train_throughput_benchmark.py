"""benchmarks/train_throughput.py's ``--attention`` swap computes the decoder's function: the
same loss as our attention (here through ``implementation="xla"``, which runs on a CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from conftest import tiny_decoder_config

from user_llm import attention
from user_llm.decoder import Decoder
from user_llm.models import DecoderOnlyModel

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # its ``import timing``
    # Restored after the test: the swap replaces this module attribute.
    monkeypatch.setattr(attention, "dot_product_attention", attention.dot_product_attention)
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_jax_attention_swap_gives_the_same_loss(bench):
    model = DecoderOnlyModel(Decoder(tiny_decoder_config()))
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 1, 64)
    batch = {
        "decoder_input_tokens": tokens,
        "decoder_target_tokens": jnp.roll(tokens, -1, axis=1),
        "decoder_loss_weights": jnp.ones_like(tokens),
    }
    shapes = {"decoder_input_tokens": (2, 16)}
    params = nn.unbox(model.get_initial_variables(jax.random.PRNGKey(0), shapes))["params"]
    ours = float(model.loss_fn(params, batch, None)[0])
    original = attention.dot_product_attention
    bench.use_jax_attention("xla")
    assert attention.dot_product_attention is not original
    swapped = float(model.loss_fn(params, batch, None)[0])
    assert swapped == pytest.approx(ours, abs=1e-5)
