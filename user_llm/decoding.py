"""Compiled decoding loops over a KV cache: greedy and temperature / top-k sampling.

The loop is a ``jax.lax.while_loop``: one prefill call over the (right-padded) prompts, then one
cached step per new token with no Python in between. Prompts of different lengths share the
cache; each example continues at its own position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
# step_fn(tokens [b, n], input_mask [b, n], positions [b, n], cache) -> (logits [b, n, V], cache)
StepFn = Callable[[Array, Array, Array, Any], tuple[Array, Any]]


def sample_logits(logits: Array, rng: Array, temperature: float, top_k: int) -> Array:
    """Picks one token per row. temperature 0 is greedy (argmax); top_k 0 keeps all tokens."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, jnp.finfo(logits.dtype).min, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def decode(
    step_fn: StepFn,
    prompts: Array,
    prompt_lengths: Array,
    cache: Any,
    *,
    max_decode_length: int,
    eos_id: int | None,
    rng: Array | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    pad_id: int = 0,
    prefill_fn: StepFn | None = None,
    suppress_ids: Sequence[int] = (),
) -> tuple[Array, Array]:
    """Generates up to ``max_decode_length`` tokens after each prompt.

    prompts: [b, P] right-padded; prompt_lengths: [b] (each >= 1). The cache must have at least
    P + max_decode_length slots. Returns (tokens [b, max_decode_length], log-probabilities of the
    chosen tokens [b, max_decode_length]); after an example emits ``eos_id`` its later tokens are
    ``pad_id`` with log-probability 0. The loop stops early once every example is done.
    ``prefill_fn`` (default ``step_fn``) reads the prompts; a model whose first call differs
    (a soft prompt is prepended once) passes its own. It returns logits for every prompt
    position, or [b, 1, V] for each prompt's last one only. ``suppress_ids`` are never
    generated (their logits are -inf before sampling and in the log-probabilities), e.g. EOS
    to force a fixed length, as Hugging Face's ``min_new_tokens`` does.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and rng is None:
        raise ValueError("Sampling (temperature > 0) needs an rng")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    suppress = jnp.asarray(list(suppress_ids), jnp.int32)

    def allowed(logits: Array) -> Array:
        return logits.at[..., suppress].set(-jnp.inf) if len(suppress_ids) else logits

    batch, prompt_len = prompts.shape
    prompt_lengths = prompt_lengths.astype(jnp.int32)
    prompt_mask = jnp.arange(prompt_len)[None, :] < prompt_lengths[:, None]
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
    logits, cache = (prefill_fn or step_fn)(prompts, prompt_mask, positions, cache)
    if logits.shape[1] == 1:  # the prefill gave the last prompt position's logits only
        last = logits[:, 0]
    else:
        last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    last = allowed(last)

    def cond(state):
        t, _, _, _, done, _, _ = state
        return (t < max_decode_length) & ~jnp.all(done)

    def body(state):
        t, out, logprobs, last_logits, done, cache, rng = state
        rng, step_rng = jax.random.split(rng)
        token = sample_logits(last_logits, step_rng, temperature, top_k)
        logp = jnp.take_along_axis(jax.nn.log_softmax(last_logits), token[:, None], axis=-1)[:, 0]
        token = jnp.where(done, pad_id, token)
        logp = jnp.where(done, 0.0, logp)
        out = out.at[:, t].set(token)
        logprobs = logprobs.at[:, t].set(logp)
        if eos_id is not None:
            done = done | (token == eos_id)
        pos = (prompt_lengths + t)[:, None]
        step_logits, cache = step_fn(token[:, None], jnp.ones((batch, 1), bool), pos, cache)
        return t + 1, out, logprobs, allowed(step_logits[:, 0]), done, cache, rng

    state = (
        jnp.zeros((), jnp.int32),
        jnp.full((batch, max_decode_length), pad_id, jnp.int32),
        jnp.zeros((batch, max_decode_length), jnp.float32),
        last,
        jnp.zeros((batch,), bool),
        cache,
        rng,
    )
    _, out, logprobs, _, _, _, _ = jax.lax.while_loop(cond, body, state)
    return out, logprobs
