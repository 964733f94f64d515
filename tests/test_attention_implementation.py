"""``DecoderConfig.attention_implementation``: the decoder through ``jax.nn.dot_product_attention``
computes what our attention computes.

"cudnn" needs an NVIDIA GPU; these tests run "xla", the same call with XLA's implementation, on
the CPU: the masks (causal with padding, prefix-LM, packed segments, the KV cache) are built and
passed the same way for both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from user_llm import blocked_attention
from user_llm.decoder import Decoder, init_cache
from user_llm.layers import dot_product_attention
from user_llm.testing import tiny_decoder_config

LENGTHS = np.array([21, 13])  # two right-padded rows of 24 slots


def _decoders(**overrides):
    ours, xla = (
        Decoder(tiny_decoder_config(attention_implementation=impl, **overrides))
        for impl in ("ours", "xla")
    )
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 30), 1, 64)
    variables = ours.init(jax.random.PRNGKey(0), tokens)
    return ours, xla, variables, tokens


def _valid(x, mask):
    return np.asarray(x)[np.asarray(mask)]


def test_causal_prefix_and_packed_forwards_equal_ours():
    ours, xla, variables, tokens = _decoders()
    tokens = tokens[:, :24]
    input_mask = jnp.asarray(np.arange(24)[None] < LENGTHS[:, None])
    prefix = jnp.asarray(np.arange(24)[None] < np.array([[10], [6]])) & input_mask
    segments = jnp.asarray(np.where(np.arange(24) < 9, 1, 2)[None].repeat(2, 0)) * input_mask
    for kwargs in (
        {},
        {"input_mask": input_mask},  # causal: the implementation's is_causal + a key mask
        {"input_mask": input_mask, "prefix_mask": prefix},
        {"input_mask": input_mask, "segment_ids": segments},
    ):
        want = ours.apply(variables, tokens, **kwargs)
        got = xla.apply(variables, tokens, **kwargs)
        valid = kwargs.get("input_mask", jnp.ones((2, 24), bool))
        np.testing.assert_allclose(_valid(got, valid), _valid(want, valid), atol=2e-5)


@pytest.mark.parametrize("remat_policy", ["none", "full"])
def test_gradients_equal_ours(remat_policy):
    ours, xla, variables, tokens = _decoders(remat_policy=remat_policy)
    input_mask = jnp.asarray(np.arange(30)[None] < np.array([[30], [17]]))

    def loss(module, params):
        logits = module.apply({"params": params}, tokens, input_mask=input_mask)
        logp = jax.nn.log_softmax(logits)[:, :-1]
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(nll * input_mask[:, 1:])

    want = jax.grad(loss, argnums=1)(ours, variables["params"])
    got = jax.grad(loss, argnums=1)(xla, variables["params"])
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        np.testing.assert_allclose(g, flat_want[path], atol=5e-5, err_msg=str(path))


def test_cached_prefill_and_steps_equal_ours():
    """A prefix-LM prefill of padded prompts into the cache, then two cached steps."""
    ours, xla, variables, tokens = _decoders()
    input_mask = jnp.asarray(np.arange(24)[None] < LENGTHS[:, None])
    prefix = jnp.asarray(np.arange(24)[None] < np.array([[10], [6]])) & input_mask
    cfg = tiny_decoder_config()

    def run(module):
        cache = init_cache(cfg, 2, 30)
        pre, mutated = module.apply(
            {**variables, "cache": cache},
            jnp.where(input_mask, tokens[:, :24], 0),
            input_mask=input_mask,
            prefix_mask=prefix,
            decode=True,
            mutable=["cache"],
        )
        steps = []
        for i in range(2):
            step, mutated = module.apply(
                {**variables, "cache": mutated["cache"]},
                tokens[:, 24 + i : 25 + i],
                positions=jnp.asarray(LENGTHS + i)[:, None],
                decode=True,
                mutable=["cache"],
            )
            steps.append(step)
        return _valid(pre, input_mask), *steps

    for got, want in zip(run(xla), run(ours), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_long_sequences_equal_ours_blocked_attention(monkeypatch):
    """Above the threshold ours is blocked; the jax call attends densely: same logits."""
    monkeypatch.setattr(blocked_attention, "MIN_BLOCKED_PAIRS", 0)
    monkeypatch.setattr(blocked_attention, "BLOCK", 8)
    ours, xla, variables, tokens = _decoders()
    input_mask = jnp.asarray(np.arange(30)[None] < np.array([[30], [19]]))
    want = ours.apply(variables, tokens, input_mask=input_mask)
    got = xla.apply(variables, tokens, input_mask=input_mask)
    np.testing.assert_allclose(_valid(got, input_mask), _valid(want, input_mask), atol=2e-5)


def test_function_level_key_bias_and_is_causal():
    """``key_bias`` (cross-attention's recency prior) and ``is_causal`` mean the same to every
    implementation; ``is_causal`` in ours equals an explicit lower-triangular mask."""
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    q = jax.random.normal(keys[0], (2, 7, 4, 8))
    k = jax.random.normal(keys[1], (2, 7, 2, 8))
    v = jax.random.normal(keys[2], (2, 7, 2, 8))
    bias = jax.random.normal(keys[3], (2, 4, 7))
    pad = jnp.asarray(np.arange(7)[None, None] < np.array([[[7]], [[5]]]))  # [b, 1, k]
    tril = jnp.tril(jnp.ones((7, 7), bool))[None]
    explicit = dot_product_attention(q, k, v, tril & pad, jnp.float32, bias)
    for impl in ("ours", "xla"):
        got = dot_product_attention(q, k, v, pad, jnp.float32, bias, impl, is_causal=True)
        np.testing.assert_allclose(got, explicit, atol=1e-5, err_msg=impl)
    with pytest.raises(ValueError, match="'flash' not in"):
        dot_product_attention(q, k, v, pad, jnp.float32, implementation="flash")


def test_config_names_a_wrong_implementation_or_dtype():
    with pytest.raises(ValueError, match="attention_implementation='flash' not in"):
        tiny_decoder_config(attention_implementation="flash")
    with pytest.raises(ValueError, match="cudnn.*needs dtype.*not 'float32'"):
        tiny_decoder_config(attention_implementation="cudnn")
    for dtype in ("bfloat16", jnp.bfloat16, "float16"):  # accepted: no error
        tiny_decoder_config(attention_implementation="cudnn", dtype=dtype)
    with pytest.raises(ValueError, match="cudnn.*not 'float32'"):
        tiny_decoder_config(attention_implementation="cudnn", dtype=jnp.float32)


def test_the_kernel_check_benchmark_finds_xla_equal_to_ours():
    """``benchmarks/attention_check.py`` (the check a GPU runs with "cudnn"), on the tiny gin
    decoder through "xla": every masked pass and the gradient agree."""
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_check.py"
    sys.path.insert(0, str(script.parent))  # its ``from results_file import``
    spec = importlib.util.spec_from_file_location("attention_check", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows, timing = bench.measure("xla", "float32", 1, "models/llm/decoder_tiny.gin")
    assert [r["case"] for r in rows] == [
        "causal",
        "causal, padded",
        "prefix-LM, padded",
        "packed (2 segments), padded",
    ]
    for r in rows:
        assert r["logits_rel_diff"] < 1e-5 and r["argmax_agree"] == 1.0, r
    assert timing["grad_rel_diff_max"] < 1e-4
    assert abs(timing["ours"]["loss"] - timing["xla"]["loss"]) < 1e-5
    assert timing["ours"]["step_ms"] > 0 and timing["xla"]["step_ms"] > 0
