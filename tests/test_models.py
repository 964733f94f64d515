"""Model wrapper (loss, scoring, prediction) and the compiled decoding loop."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_decoder_config

from user_llm import decoding
from user_llm.decoder import Decoder
from user_llm.models import DecoderOnlyModel, cross_entropy_terms


@pytest.fixture(scope="module")
def model_and_params():
    model = DecoderOnlyModel(Decoder(tiny_decoder_config()), eos_id=1, max_decode_length=6)
    variables = model.get_initial_variables(jax.random.PRNGKey(0), {"decoder_input_tokens": (2, 8)})
    return model, nn.unbox(variables)["params"]


def _lm_batch(tokens, weights=None):
    tokens = jnp.asarray(tokens)
    inputs = jnp.concatenate([jnp.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
    return {
        "decoder_input_tokens": inputs,
        "decoder_target_tokens": tokens,
        "decoder_loss_weights": jnp.ones_like(tokens) if weights is None else jnp.asarray(weights),
    }


def _greedy_without_cache(model, params, prompt, n):
    """Reference: full forward passes, prompt as a bidirectional prefix (prefix LM)."""
    seq = list(prompt)
    out = []
    for _ in range(n):
        prefix = jnp.asarray([[1] * len(prompt) + [0] * len(out)])
        logits = model.module.apply({"params": params}, jnp.asarray([seq]), prefix_mask=prefix)
        tok = int(jnp.argmax(logits[0, -1]))
        out.append(tok)
        seq.append(tok)
        if tok == model.eos_id:
            break
    return out


def test_cross_entropy_terms_match_a_direct_computation():
    logits = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 5))
    targets = jnp.array([[1, 2, 3], [4, 0, 1]])
    weights = jnp.array([[1, 1, 0], [1, 1, 1]])
    loss, weight, metrics = cross_entropy_terms(logits, targets, weights)
    logp = jax.nn.log_softmax(logits)
    expected = -sum(
        float(logp[b, t, targets[b, t]]) * float(weights[b, t]) for b in range(2) for t in range(3)
    )
    assert float(weight) == 5
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(metrics["correct_sum"]) <= 5


def test_score_batch_is_sum_of_target_log_probs(model_and_params):
    model, params = model_and_params
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 2, 64)
    weights = jnp.array([[0, 0, 1, 1, 1, 1, 0, 0], [1] * 8])
    batch = _lm_batch(tokens, weights)
    scores = model.score_batch(params, batch)
    logits = model.module.apply({"params": params}, batch["decoder_input_tokens"])
    logp = jax.nn.log_softmax(logits)
    for b in range(2):
        expected = sum(float(logp[b, t, tokens[b, t]]) for t in range(8) if int(weights[b, t]))
        np.testing.assert_allclose(float(scores[b]), expected, rtol=1e-5)


def test_loss_fn_is_mean_over_weighted_tokens(model_and_params):
    model, params = model_and_params
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 8), 2, 64)
    batch = _lm_batch(tokens)
    loss, metrics = model.loss_fn(params, batch, None)
    scores = model.score_batch(params, batch)
    np.testing.assert_allclose(float(loss), -float(jnp.sum(scores)) / 16, rtol=1e-5)
    assert float(metrics["num_tokens"]) == 16


def test_predict_batch_greedy_matches_uncached_argmax_loop(model_and_params):
    """Prefix-LM batch with prompts of different lengths, as SeqIO's converter lays them out."""
    model, params = model_and_params
    prompts = [[0, 5, 9, 11], [0, 7]]
    tokens = np.zeros((2, 8), np.int32)
    causal = np.zeros((2, 8), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
        causal[b, : len(p)] = 1
    batch = {
        "decoder_input_tokens": jnp.asarray(tokens),
        "decoder_causal_attention": jnp.asarray(causal),
    }
    out, aux = jax.jit(model.predict_batch_with_aux)(params, batch)
    for b, p in enumerate(prompts):
        expected = _greedy_without_cache(model, params, p, 6)
        assert [int(t) for t in out[b][: len(expected)]] == expected
    assert aux["scores"].shape == (2,)
    assert np.all(np.asarray(aux["scores"]) <= 0)


def test_eos_stops_an_example_and_pads_after_it():
    vocab = 8

    def step_fn(tokens, input_mask, positions, cache):
        # Emits token (position + 1) % vocab, so EOS=3 is reached at different times per row.
        logits = jax.nn.one_hot((positions + 1) % vocab, vocab) * 10.0
        return logits, cache

    prompts = jnp.array([[4, 4, 0], [4, 0, 0]])
    out, logprobs = decoding.decode(
        step_fn, prompts, jnp.array([3, 1]), None, max_decode_length=6, eos_id=3
    )
    # Row 0: last prompt position 2 -> next 3 (EOS) immediately, then pads.
    assert out[0].tolist() == [3, 0, 0, 0, 0, 0]
    # Row 1: positions 0 -> 1, 1 -> 2, 2 -> 3 (EOS).
    assert out[1].tolist() == [1, 2, 3, 0, 0, 0]
    assert float(logprobs[0, 1]) == 0.0


def test_top_k_sampling_only_draws_from_the_top_k():
    logits = jnp.log(jnp.array([[0.05, 0.4, 0.3, 0.2, 0.05]]))
    draws = {
        int(decoding.sample_logits(logits, jax.random.PRNGKey(i), 1.0, 2)[0]) for i in range(200)
    }
    assert draws == {1, 2}
    greedy = decoding.sample_logits(logits, jax.random.PRNGKey(0), 0.0, 0)
    assert int(greedy[0]) == 1


def test_sampling_needs_an_rng_and_a_valid_temperature():
    with pytest.raises(ValueError, match="temperature"):
        decoding.decode(
            lambda *a: None,
            jnp.zeros((1, 1), jnp.int32),
            jnp.ones(1),
            None,
            max_decode_length=1,
            eos_id=None,
            temperature=-1.0,
        )
