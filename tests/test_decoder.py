"""Decoder network: parameter tree golden, KV-cache equivalence, causality, packing, masks."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT, tiny_decoder_config

from user_llm.decoder import Decoder, DecoderConfig, init_cache
from user_llm.models import param_shapes_and_axes

GOLDEN = REPO_ROOT / "tests" / "testdata" / "decoder_tiny_params.json"


def _init(cfg, length=8, **kw):
    module = Decoder(cfg)
    tokens = jnp.zeros((2, length), jnp.int32)
    return module, module.init(jax.random.PRNGKey(0), tokens, **kw)


def _random_tokens(seed, shape, vocab=64):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 1, vocab)


def test_param_tree_golden():
    """Names, shapes and logical axes of a tiny config; a change to the tree shows as a diff.

    Regenerate after an intended change: UPDATE_GOLDENS=1 pytest tests/test_decoder.py
    """
    cfg = tiny_decoder_config(cross_attention_layers=(1,), tie_embeddings=False)
    _, variables = _init(cfg, user_context=jnp.zeros((2, 3, 32)))
    actual = param_shapes_and_axes(variables["params"])
    import os

    if os.environ.get("UPDATE_GOLDENS"):
        GOLDEN.write_text(json.dumps(actual, indent=1, sort_keys=True) + "\n")
    expected = json.loads(GOLDEN.read_text())
    assert actual == expected
    # Spot checks that the golden itself encodes the intended layout.
    assert actual["layers_0/self_attention/query/kernel"] == {
        "shape": [32, 4, 8],
        "axes": ["embed", "heads", "kv"],
    }
    assert actual["layers_0/self_attention/key/kernel"]["shape"] == [32, 2, 8]
    assert "layers_1/context_block/gate" in actual and "layers_0/context_block/gate" not in actual
    assert actual["logits_dense/kernel"]["axes"] == ["embed", "vocab"]


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="num_kv_heads"):
        tiny_decoder_config(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="cross_attention_layers"):
        tiny_decoder_config(cross_attention_layers=(5,))
    with pytest.raises(ValueError, match="remat_policy"):
        tiny_decoder_config(remat_policy="sometimes")
    with pytest.raises(ValueError, match="dtype"):
        tiny_decoder_config(dtype="float8")


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"use_qkv_bias": True, "tie_embeddings": False},
        {
            "use_qk_norm": True,
            "use_post_norms": True,
            "scale_embeddings": True,
            "mlp_activation": "gelu_tanh",
        },
    ],
)
def test_kv_cache_matches_full_forward(overrides):
    cfg = tiny_decoder_config(**overrides)
    module, variables = _init(cfg, length=12)
    tokens = _random_tokens(1, (2, 12))
    full = module.apply(variables, tokens)
    cache = init_cache(cfg, 2, 16)
    prefill, mutated = module.apply(
        {**variables, "cache": cache}, tokens[:, :7], decode=True, mutable=["cache"]
    )
    np.testing.assert_allclose(prefill, full[:, :7], atol=1e-5)
    cache = mutated["cache"]
    for t in range(7, 12):
        step, mutated = module.apply(
            {**variables, "cache": cache}, tokens[:, t : t + 1], decode=True, mutable=["cache"]
        )
        cache = mutated["cache"]
        np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)


def test_kv_cache_with_prompts_of_different_lengths():
    """Right-padded prompts in one cache: each row equals its own unpadded forward pass."""
    cfg = tiny_decoder_config()
    module, variables = _init(cfg)
    tokens = _random_tokens(2, (2, 9))
    lengths = np.array([4, 7])
    mask = np.arange(7)[None] < lengths[:, None]
    prompts = jnp.where(mask, tokens[:, :7], 0)
    cache = init_cache(cfg, 2, 12)
    _, mutated = module.apply(
        {**variables, "cache": cache}, prompts, input_mask=mask, decode=True, mutable=["cache"]
    )
    # Next token for each row continues at its own position.
    nxt = tokens[:, 8:9]
    step, _ = module.apply(
        {**variables, "cache": mutated["cache"]},
        nxt,
        positions=jnp.asarray(lengths)[:, None],
        decode=True,
        mutable=["cache"],
    )
    for b, n in enumerate(lengths):
        seq = jnp.concatenate([tokens[b : b + 1, :n], nxt[b : b + 1]], axis=1)
        ref = module.apply(variables, seq)
        np.testing.assert_allclose(step[b, 0], ref[0, -1], atol=1e-5)


def test_causality_later_tokens_never_change_earlier_logits():
    cfg = tiny_decoder_config()
    module, variables = _init(cfg, length=10)
    tokens = _random_tokens(3, (2, 10))
    changed = tokens.at[:, 6:].set((tokens[:, 6:] + 5) % 64)
    a = module.apply(variables, tokens)
    b = module.apply(variables, changed)
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert not np.allclose(a[:, 6:], b[:, 6:])


def test_packing_does_not_leak_across_segments():
    cfg = tiny_decoder_config()
    module, variables = _init(cfg, length=10)
    seq_a = _random_tokens(4, (1, 4))
    seq_b = _random_tokens(5, (1, 5))
    packed = jnp.concatenate([seq_a, seq_b, jnp.zeros((1, 1), jnp.int32)], axis=1)
    segment_ids = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0]])
    positions = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0]])
    out = module.apply(variables, packed, positions=positions, segment_ids=segment_ids)
    np.testing.assert_allclose(out[:, :4], module.apply(variables, seq_a), atol=1e-5)
    np.testing.assert_allclose(out[:, 4:9], module.apply(variables, seq_b), atol=1e-5)
    # Changing segment A never changes segment B.
    other_a = packed.at[:, :4].set((packed[:, :4] + 1) % 64)
    out2 = module.apply(variables, other_a, positions=positions, segment_ids=segment_ids)
    np.testing.assert_array_equal(out[:, 4:9], out2[:, 4:9])


def test_padding_does_not_change_real_positions():
    cfg = tiny_decoder_config()
    module, variables = _init(cfg, length=8)
    tokens = _random_tokens(6, (1, 5))
    padded = jnp.concatenate([tokens, jnp.full((1, 3), 7, jnp.int32)], axis=1)
    mask = jnp.array([[1, 1, 1, 1, 1, 0, 0, 0]])
    out = module.apply(variables, padded, input_mask=mask)
    np.testing.assert_allclose(out[:, :5], module.apply(variables, tokens), atol=1e-5)


def test_prefix_lm_mask_is_bidirectional_in_prefix_only():
    cfg = tiny_decoder_config()
    module, variables = _init(cfg, length=8)
    tokens = _random_tokens(7, (1, 8))
    prefix = jnp.array([[1, 1, 1, 0, 0, 0, 0, 0]])
    out = module.apply(variables, tokens, prefix_mask=prefix)
    changed = tokens.at[:, 2].set((tokens[:, 2] + 3) % 64)
    out2 = module.apply(variables, changed, prefix_mask=prefix)
    # Position 0 sees position 2 (both in the prefix): it changes.
    assert not np.allclose(out[:, 0], out2[:, 0])
    # Changing a target token never affects the prefix.
    changed_t = tokens.at[:, 5].set((tokens[:, 5] + 3) % 64)
    out3 = module.apply(variables, changed_t, prefix_mask=prefix)
    np.testing.assert_array_equal(out[:, :5], out3[:, :5])


def test_prefix_lm_prefill_matches_full_forward():
    cfg = tiny_decoder_config()
    module, variables = _init(cfg, length=8)
    tokens = _random_tokens(8, (2, 8))
    prefix = jnp.array([[1, 1, 1, 1, 0, 0, 0, 0]] * 2)
    full = module.apply(variables, tokens, prefix_mask=prefix)
    cache = init_cache(cfg, 2, 8)
    out, mutated = module.apply(
        {**variables, "cache": cache},
        tokens[:, :4],
        prefix_mask=prefix[:, :4],
        decode=True,
        mutable=["cache"],
    )
    np.testing.assert_allclose(out, full[:, :4], atol=1e-5)
    step, _ = module.apply(
        {**variables, "cache": mutated["cache"]}, tokens[:, 4:5], decode=True, mutable=["cache"]
    )
    np.testing.assert_allclose(step[:, 0], full[:, 4], atol=1e-5)


def test_context_block_is_identity_at_init_and_used_after_gate_opens():
    cfg = tiny_decoder_config(cross_attention_layers=(0, 1))
    ctx = jax.random.normal(jax.random.PRNGKey(9), (2, 3, 32))
    module, variables = _init(cfg, user_context=ctx)
    tokens = _random_tokens(10, (2, 8))
    bare = module.apply(variables, tokens)
    with_ctx = module.apply(variables, tokens, user_context=ctx)
    np.testing.assert_array_equal(bare, with_ctx)
    params = jax.tree_util.tree_map(lambda x: x, nn.unbox(variables["params"]))
    params["layers_1"]["context_block"]["gate"] = jnp.asarray(0.5)
    opened = module.apply({"params": params}, tokens, user_context=ctx)
    assert not np.allclose(opened, bare)


def test_decode_without_cache_is_a_clear_error(tiny_config):
    module, variables = _init(tiny_config)
    with pytest.raises(ValueError, match="init_cache"):
        module.apply(variables, jnp.zeros((2, 1), jnp.int32), decode=True, mutable=["cache"])


@pytest.mark.parametrize("remat", ["none", "full"])
def test_cache_is_derived_from_the_module_and_empty(remat):
    """``init_cache`` is what a decode call writes: the same tree, shapes and dtypes (a renamed
    layer renames its entry), one slot per token of the cache length, and all zeros."""
    cfg = tiny_decoder_config(remat_policy=remat, dtype="bfloat16")
    module, variables = _init(cfg)
    cache = init_cache(cfg, 2, 12)
    _, mutated = module.apply(
        {**variables, "cache": cache}, _random_tokens(3, (2, 5)), decode=True, mutable=["cache"]
    )
    spec = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)
    assert spec(dict(mutated["cache"])) == spec(cache)
    key = cache["layers_1"]["self_attention"]["cached_key"]
    assert key.shape == (2, 12, cfg.num_kv_heads, cfg.head_dim) and key.dtype == jnp.bfloat16
    assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(cache))
    assert int(mutated["cache"]["cache_bookkeeping"]["index"]) == 5


@pytest.mark.parametrize("policy", ["full", "minimal"])
def test_remat_gives_same_values_and_gradients(policy):
    base = tiny_decoder_config()
    module, variables = _init(base)
    remat = Decoder(DecoderConfig(**{**base.__dict__, "remat_policy": policy}))
    tokens = _random_tokens(11, (2, 8))
    loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, tokens) ** 2)
    g1 = jax.grad(loss(module))(variables["params"])
    g2 = jax.grad(loss(remat))(variables["params"])
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_activations_stay_close_to_float32():
    cfg32 = tiny_decoder_config()
    module32, variables = _init(cfg32)
    module16 = Decoder(DecoderConfig(**{**cfg32.__dict__, "dtype": "bfloat16"}))
    tokens = _random_tokens(12, (2, 8))
    a = module32.apply(variables, tokens)
    b = module16.apply(variables, tokens)
    assert b.dtype == jnp.float32  # logits are returned in float32
    assert np.max(np.abs(a - b)) < 0.1 * np.max(np.abs(a))
