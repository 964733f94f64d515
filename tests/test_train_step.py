"""The update step in-process: overfitting, gradient accumulation, frozen shapes of the state."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import tiny_decoder_config

from user_llm.decoder import Decoder
from user_llm.models import DecoderOnlyModel
from user_llm.train_step import make_train_step


def _setup(accumulation_steps=1, lr=3e-3):
    model = DecoderOnlyModel(Decoder(tiny_decoder_config()))
    params = nn.unbox(
        model.get_initial_variables(jax.random.PRNGKey(0), {"decoder_input_tokens": (4, 12)})
    )["params"]
    tx = optax.adam(lr)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    step = jax.jit(
        make_train_step(model, tx, optax.constant_schedule(lr), accumulation_steps, False)
    )
    return state, step


def _batch(seed=0, batch=4, length=12):
    targets = jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 2, 64)
    weights = np.ones((batch, length), np.int32)
    weights[1, 8:] = 0  # Uneven weights make accumulation's normalization matter.
    return {
        "decoder_input_tokens": jnp.concatenate(
            [jnp.zeros((batch, 1), jnp.int32), targets[:, :-1]], 1
        ),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": jnp.asarray(weights),
    }


def test_tiny_model_overfits_a_small_batch():
    """Memorizing 4 random sequences: loss must fall at least 20x in 150 steps."""
    state, step = _setup(lr=1e-2)
    batch = _batch()
    first = None
    for _ in range(150):
        state, metrics = step(state, batch, jax.random.PRNGKey(1))
        first = float(metrics["loss"]) if first is None else first
    last = float(metrics["loss"])
    assert first > 3.5  # ~ln(64): an untrained model
    assert last < first / 20, (first, last)
    assert int(state["step"]) == 150


def test_gradient_accumulation_equals_one_big_batch():
    batch = _batch(seed=3)
    state1, step1 = _setup(accumulation_steps=1)
    state2, step2 = _setup(accumulation_steps=2)
    for _ in range(3):
        state1, m1 = step1(state1, batch, jax.random.PRNGKey(0))
        state2, m2 = step2(state2, batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    for a, b in zip(
        jax.tree_util.tree_leaves(state1["params"]),
        jax.tree_util.tree_leaves(state2["params"]),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)
