"""The memory-efficient (blocked, online-softmax) attention equals the dense reference: causal
and prefix-LM masks, padding, grouped-query heads, lengths that are not a multiple of the
block, and inside the decoder with and without the KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_decoder_config

from user_llm import blocked_attention
from user_llm.blocked_attention import blocked_attention as blocked
from user_llm.decoder import Decoder, init_cache
from user_llm.layers import attention_weights


def _dense(q, k, v, mask):
    """The reference: full softmax weights, then the weighted values."""
    b, q_len, heads, d = q.shape
    w = attention_weights(q, k, mask)
    return jnp.einsum("bhgqk,bkhd->bqhgd", w, v).reshape(b, q_len, heads, d)


def _qkv(seed, b, q_len, k_len, heads, kv_heads, d=8):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(b, q_len, heads, d)), jnp.float32)
    k = jnp.asarray(r.normal(size=(b, k_len, kv_heads, d)), jnp.float32)
    v = jnp.asarray(r.normal(size=(b, k_len, kv_heads, d)), jnp.float32)
    return q, k, v


@pytest.mark.parametrize("kind", ["causal_padded", "prefix", "no_mask", "cache_offset"])
@pytest.mark.parametrize("blocks", [(8, 8), (16, 4), (64, 64)])
def test_blocked_equals_dense(kind, blocks):
    b, q_len, k_len = 3, 37, 37
    lengths = np.array([37, 20, 9])
    qi, ki = np.arange(q_len)[:, None], np.arange(k_len)[None]
    if kind == "causal_padded":
        mask = (ki <= qi)[None] & (ki < lengths[:, None, None]) & (qi < lengths[:, None, None])
    elif kind == "prefix":  # the first 12 positions see each other bidirectionally
        mask = np.broadcast_to((ki <= qi) | ((ki < 12) & (qi < 12)), (b, q_len, k_len))
    elif kind == "no_mask":
        mask = None
    else:  # 5 new queries appended after 30 cached keys (a cached decode step)
        q_len, k_len = 5, 35
        qi, ki = 30 + np.arange(q_len)[:, None], np.arange(k_len)[None]
        mask = np.broadcast_to(ki <= qi, (b, q_len, k_len))
    q, k, v = _qkv(0, b, q_len, k_len, heads=6, kv_heads=2)
    mask = None if mask is None else jnp.asarray(mask)
    got = blocked(q, k, v, mask, jnp.float32, *blocks)
    want = _dense(q, k, v, mask)
    rows = np.ones((b, q_len), bool) if mask is None else np.asarray(mask).any(-1)
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=2e-5)
    # A query with nothing to attend (padding) gives zeros, never NaN.
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_array_equal(np.asarray(got)[~rows], 0.0)


def test_gradients_match_dense():
    q, k, v = _qkv(1, 2, 19, 19, heads=4, kv_heads=4)
    mask = jnp.asarray(np.tril(np.ones((19, 19), bool))[None].repeat(2, 0))

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v)))

    g_blocked = jax.grad(lambda *a: loss(lambda *x: blocked(*x, mask, jnp.float32, 8, 8), *a),
                         argnums=(0, 1, 2))(q, k, v)  # fmt: skip
    g_dense = jax.grad(lambda *a: loss(lambda *x: _dense(*x, mask), *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_blocked, g_dense, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_decoder_with_blocked_attention_equals_dense_with_and_without_cache(monkeypatch):
    """The whole decoder, every attention call blocked (threshold 0, 8-wide tiles): full
    forward, prefix-LM prefill of padded prompts and cached steps equal the dense decoder."""
    cfg = tiny_decoder_config()
    module = Decoder(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 30), 1, 64)
    variables = module.init(jax.random.PRNGKey(0), tokens)
    lengths = np.array([21, 13])
    input_mask = jnp.asarray(np.arange(24)[None] < lengths[:, None])
    prefix = jnp.asarray(np.arange(24)[None] < np.array([[10], [6]]))

    def run():
        full = module.apply(variables, tokens)
        cache = init_cache(cfg, 2, 30)
        pre, mutated = module.apply(
            {**variables, "cache": cache}, jnp.where(input_mask, tokens[:, :24], 0),
            input_mask=input_mask, prefix_mask=prefix & input_mask, decode=True,
            mutable=["cache"],
        )  # fmt: skip
        step, _ = module.apply(
            {**variables, "cache": mutated["cache"]}, tokens[:, 24:25],
            positions=jnp.asarray(lengths)[:, None], decode=True, mutable=["cache"],
        )  # fmt: skip
        return full, np.asarray(pre)[np.asarray(input_mask)], step

    dense = run()
    monkeypatch.setattr(blocked_attention, "MIN_BLOCKED_PAIRS", 0)
    monkeypatch.setattr(blocked_attention, "BLOCK", 8)
    tiled = run()
    for a, b in zip(tiled, dense, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
