"""Decoder-only language model, the analogue of T5X's ``examples/decoder_only/network.py``.

The options cover the Llama family that real checkpoints use (RMSNorm, rotary embeddings with a
configurable theta, grouped-query attention, gated MLPs, tied or untied embeddings, embedding
scaling) plus the cheap extras of Qwen2 (qkv bias) and Gemma (qk-norm, sandwich norms).

Each ``DecoderLayer`` has a slot for a user context: layers listed in
``DecoderConfig.cross_attention_layers`` get a gated cross-attention block between
self-attention and the MLP (the T5X encoder-decoder layer order). With no context the block is
skipped, and its zero-initialized gate makes it an exact identity at initialization anyway.

Decoding keeps a KV cache of ``cache_length`` slots per example plus a ``key_valid`` mask:
a right-padded batch of prompts of different lengths is prefilled in one call, pad slots are
masked out, and per-example positions keep rotary phases exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from user_llm.attention import Attention
from user_llm.layers import (
    ATTENTION_IMPLEMENTATIONS,
    BATCH_LENGTH_EMBED,
    Array,
    DenseGeneral,
    Embed,
    GatedMLP,
    RMSNorm,
    constrain,
    distance_from_last,
)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
CUDNN_DTYPES = ("bfloat16", "float16")


def as_dtype(name_or_dtype: Any) -> Any:
    """Accepts 'float32' / 'bfloat16' (gin-friendly) or a dtype."""
    if isinstance(name_or_dtype, str):
        if name_or_dtype not in _DTYPES:
            raise ValueError(f"Unknown dtype {name_or_dtype!r}; use one of {list(_DTYPES)}")
        return _DTYPES[name_or_dtype]
    return name_or_dtype


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Global hyperparameters of the decoder (T5X's ``TransformerConfig``)."""

    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    mlp_activation: str = "silu"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    scale_embeddings: bool = False
    # Std of the token-embedding init; None: 1/sqrt(embed_dim), which keeps tied output logits at
    # unit scale (a std of 1 gives logits of std sqrt(embed_dim) and a first loss far above ln V).
    embedding_init_stddev: float | None = None
    use_qkv_bias: bool = False
    use_qk_norm: bool = False
    use_post_norms: bool = False
    dropout_rate: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    # Self-attention (layers.ATTENTION_IMPLEMENTATIONS): "ours" (the CPU default: dense, blocked
    # for long prompts), "xla" or "cudnn" (jax.nn.dot_product_attention; cuDNN's fused flash
    # attention on an NVIDIA GPU, bfloat16/float16). Cross-attention over the user context
    # (a few dozen keys) stays "ours".
    attention_implementation: str = "ours"
    # Indices of layers that get a gated cross-attention block for the user context.
    cross_attention_layers: tuple[int, ...] = ()
    # Initial value of each cross-attention gate (tanh(gate) scales the block's update). 0 makes
    # User-LLM an exact identity of the LLM at step 0 (Flamingo); a small value lets the block's
    # own weights get gradient from the first step.
    cross_attention_gate_init: float = 0.0
    # True: the block's output is RMS-normalized and rescaled to the RMS of the residual stream
    # it is added to (no gradient through that scale), so tanh(gate) *is* the update-to-residual
    # ratio. A pretrained LLM's residual stream is far larger than a fresh block's output
    # (SmolLM2-135M: 10-100x in its upper layers), which otherwise leaves the block unheard.
    cross_attention_residual_scale: bool = False
    # True: a fixed recency prior in every cross-attention block. The context is read as a
    # history, oldest first and right-padded (its mask's valid slots first); head h adds
    # -slope_h * (distance of each slot from the last valid one) to its logits, with slopes
    # geometric from 4 (head 0: ~98% of its weight on the last state) to 1/64 (the last head:
    # near uniform over 50). Why: the keys carry no position, so without it a block can tell the
    # last state, the one that predicts the next item, from the others only by content
    # (results/phase2_recipe.md, row 16). Parameter-free: it needs no training to be used.
    cross_attention_recency_bias: bool = False
    # LoRA adapters on every attention and MLP projection of the decoder (0: none).
    lora_rank: int = 0
    lora_alpha: float = 16.0

    def __post_init__(self) -> None:
        problems = []
        if self.num_heads % self.num_kv_heads:
            problems.append(
                f"num_heads={self.num_heads} not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
            problems.append(
                f"attention_implementation={self.attention_implementation!r} not in "
                f"{list(ATTENTION_IMPLEMENTATIONS)}"
            )
        dtype_name = jnp.dtype(as_dtype(self.dtype)).name  # a name or a dtype, as gin gives it
        if self.attention_implementation == "cudnn" and dtype_name not in CUDNN_DTYPES:
            problems.append(
                f"attention_implementation='cudnn' needs dtype in {list(CUDNN_DTYPES)}, "
                f"not {dtype_name!r} (cuDNN's flash attention has no float32 kernel)"
            )
        if self.remat_policy not in REMAT_POLICIES:
            problems.append(f"remat_policy={self.remat_policy!r} not in {list(REMAT_POLICIES)}")
        bad_layers = [i for i in self.cross_attention_layers if not 0 <= i < self.num_layers]
        if bad_layers:
            problems.append(f"cross_attention_layers {bad_layers} outside [0, {self.num_layers})")
        as_dtype(self.dtype), as_dtype(self.param_dtype)
        if problems:
            raise ValueError("Invalid DecoderConfig: " + "; ".join(problems))


class GatedCrossAttention(nn.Module):
    """Flamingo-style block: ``x + tanh(gate) * attn(norm(x), context)``, gate initialized at 0.

    Lives in the decoder layer's user-context slot. ``integration.py`` builds what feeds it.
    """

    config: DecoderConfig

    @nn.compact
    def __call__(self, x: Array, context: Array, context_mask: Array | None) -> Array:
        cfg = self.config
        dtype, param_dtype = as_dtype(cfg.dtype), as_dtype(cfg.param_dtype)
        h = RMSNorm(cfg.norm_eps, dtype, param_dtype, name="pre_cross_attention_norm")(x)
        mask = None if context_mask is None else context_mask[:, None, :].astype(bool)
        key_bias = None
        if cfg.cross_attention_recency_bias:
            if context_mask is None:
                raise ValueError("cross_attention_recency_bias needs the context mask")
            key_bias = recency_bias(context_mask, cfg.num_heads)
        h = Attention(
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            rope_theta=None,
            dtype=dtype,
            param_dtype=param_dtype,
            name="cross_attention",
        )(h, mask, kv_input=context.astype(dtype), key_bias=key_bias)
        gate = self.param(
            "gate",
            nn.with_logical_partitioning(
                nn.initializers.constant(cfg.cross_attention_gate_init), ()
            ),
            (),
            param_dtype,
        )
        if context_mask is not None:
            # A user without any history contributes nothing.
            h = h * jnp.any(context_mask, axis=-1).astype(h.dtype)[:, None, None]
        if cfg.cross_attention_residual_scale:
            h = _rms_normalized(h) * jax.lax.stop_gradient(_rms(x))
        update = jnp.tanh(gate).astype(h.dtype) * h
        # Diagnostic (only kept when "intermediates" is mutable): how much the gated update moves
        # the residual stream, ||update|| / ||x|| per token, averaged.
        self.sow("intermediates", "update_to_residual", _mean_norm_ratio(update, x))
        return x + update


def recency_slopes(num_heads: int) -> np.ndarray:
    """[heads] geometric slopes from 4 down to 1/64 (``cross_attention_recency_bias``)."""
    return np.geomspace(4.0, 1 / 64, num_heads).astype(np.float32)


def recency_bias(context_mask: Array, num_heads: int) -> Array:
    """[b, heads, n]: -slope_h times each context slot's distance from its row's last valid
    slot (slots after it, padding, read distance 0 and are masked anyway)."""
    distance = distance_from_last(context_mask)
    slopes = jnp.asarray(recency_slopes(num_heads))
    return -slopes[None, :, None] * distance[:, None, :].astype(jnp.float32)


def _rms(x: Array) -> Array:
    return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)).astype(
        x.dtype
    )


def _rms_normalized(x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + 1e-6)).astype(
        x.dtype
    )


def _mean_norm_ratio(update: Array, x: Array) -> Array:
    norms = jnp.linalg.norm(update.astype(jnp.float32), axis=-1)
    return jnp.mean(norms / jnp.maximum(jnp.linalg.norm(x.astype(jnp.float32), axis=-1), 1e-6))


class DecoderLayer(nn.Module):
    """Pre-norm layer: self-attention, [user-context block], gated MLP."""

    config: DecoderConfig
    has_context_block: bool = False

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array,
        positions: Array,
        user_context: Array | None,
        user_context_mask: Array | None,
        decode: bool,
        deterministic: bool,
        cache_index: Array | None,
        is_causal: bool = False,
    ) -> Array:
        """``is_causal``: ``mask`` holds only the padding; the causal part is the attention
        implementation's (``Decoder.__call__`` decides)."""
        cfg = self.config
        dtype, param_dtype = as_dtype(cfg.dtype), as_dtype(cfg.param_dtype)
        norm = lambda name: RMSNorm(cfg.norm_eps, dtype, param_dtype, name=name)
        dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))

        h = norm("pre_self_attention_norm")(x)
        h = Attention(
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            rope_theta=cfg.rope_theta,
            use_bias=cfg.use_qkv_bias,
            use_qk_norm=cfg.use_qk_norm,
            norm_eps=cfg.norm_eps,
            dtype=dtype,
            param_dtype=param_dtype,
            lora_rank=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            implementation=cfg.attention_implementation,
            name="self_attention",
        )(h, mask, positions, decode=decode, cache_index=cache_index, is_causal=is_causal)
        if cfg.use_post_norms:
            h = norm("post_self_attention_norm")(h)
        x = x + dropout(h, deterministic=deterministic)
        x = constrain(x, BATCH_LENGTH_EMBED)

        if self.has_context_block and user_context is not None:
            x = GatedCrossAttention(cfg, name="context_block")(x, user_context, user_context_mask)

        h = norm("pre_mlp_norm")(x)
        h = GatedMLP(
            cfg.mlp_dim,
            cfg.mlp_activation,
            dtype,
            param_dtype,
            lora_rank=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            name="mlp",
        )(h)
        if cfg.use_post_norms:
            h = norm("post_mlp_norm")(h)
        x = x + dropout(h, deterministic=deterministic)
        return constrain(x, BATCH_LENGTH_EMBED)


def attention_mask(
    segment_ids: Array | None,
    prefix_mask: Array | None,
    input_mask: Array | None,
    length: int,
) -> Array:
    """[batch, q, k] boolean mask for a full (non-cached) pass.

    Causal; restricted to the same segment when packed (segment 0 is padding); prefix positions
    (T5X ``decoder_causal_attention``) also see each other bidirectionally.
    """
    idx = jnp.arange(length)
    allowed = (idx[None, :] <= idx[:, None])[None]
    if prefix_mask is not None:
        p = prefix_mask.astype(bool)
        bidir = p[:, :, None] & p[:, None, :]
        allowed = allowed | bidir
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        allowed = allowed & same & (segment_ids[:, None, :] > 0)
    if input_mask is not None:
        allowed = allowed & input_mask.astype(bool)[:, None, :]
    return allowed


class Decoder(nn.Module):
    """Token ids -> logits, with optional packed segments, prefix-LM mask and user context."""

    config: DecoderConfig

    def setup(self) -> None:
        cfg = self.config
        dtype, param_dtype = as_dtype(cfg.dtype), as_dtype(cfg.param_dtype)
        init_stddev = cfg.embedding_init_stddev or cfg.embed_dim**-0.5
        self.token_embedder = Embed(
            cfg.vocab_size, cfg.embed_dim, dtype, param_dtype, init_stddev=init_stddev
        )
        layer_cls = DecoderLayer
        policy = REMAT_POLICIES[cfg.remat_policy]
        if cfg.remat_policy != "none":
            # Arguments 6-7 and 9 (decode, deterministic, is_causal; self is 0) are Python bools.
            layer_cls = nn.remat(DecoderLayer, policy=policy, static_argnums=(6, 7, 9))
        self.layers = [
            layer_cls(cfg, has_context_block=i in cfg.cross_attention_layers)
            for i in range(cfg.num_layers)
        ]
        self.final_norm = RMSNorm(cfg.norm_eps, dtype, param_dtype)
        self.embedding_dropout = nn.Dropout(cfg.dropout_rate)
        self.cache_bookkeeping = CacheBookkeeping()
        if not cfg.tie_embeddings:
            self.logits_dense = DenseGeneral(
                (cfg.vocab_size,), ("embed", "vocab"), dtype=dtype, param_dtype=param_dtype
            )

    def embed(self, tokens: Array) -> Array:
        """Token embeddings (scaled by sqrt(embed_dim) where the family does so)."""
        x = self.token_embedder(tokens)
        if self.config.scale_embeddings:
            x = x * jnp.sqrt(jnp.asarray(self.config.embed_dim, x.dtype))
        return x

    def __call__(
        self,
        tokens: Array,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        prefix_mask: Array | None = None,
        input_mask: Array | None = None,
        user_context: Array | None = None,
        user_context_mask: Array | None = None,
        input_embeddings: Array | None = None,
        decode: bool = False,
        deterministic: bool = True,
        return_hidden: bool = False,
        logits_index: Array | None = None,
    ) -> Array:
        """Returns float32 logits [batch, length, vocab] (or final hidden states).

        tokens: [batch, length] int. ``input_embeddings`` (same shape as the token embeddings)
        replaces the token lookup, for soft prompts. In ``decode`` mode the call appends
        ``length`` tokens to the cache (prefill with length > 1, then steps of 1);
        ``input_mask`` marks which of them are real (default: all) and ``positions`` defaults
        to the slot index. ``logits_index`` [batch, n] returns the logits of those positions
        only ([batch, n, vocab]): a prefill that needs the last prompt position's logits skips
        the vocabulary projection everywhere else. In decode mode, ``segment_ids`` (>= 1)
        make the appended tokens independent continuations of what is already cached: each
        sees the cache and its own segment's earlier tokens, not the other segments (all
        candidates scored on one shared prompt cache, without a copy per candidate).
        """
        batch, length = tokens.shape
        x = self.embed(tokens) if input_embeddings is None else input_embeddings
        x = constrain(x, BATCH_LENGTH_EMBED)
        cache_index = None
        if decode:
            mask, positions, cache_index = self.cache_bookkeeping(
                batch, length, input_mask, positions, prefix_mask, segment_ids
            )
        else:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
            mask = attention_mask(segment_ids, prefix_mask, input_mask, length)
        # A plain causal pass lets jax.nn.dot_product_attention apply causality itself (cuDNN
        # then skips the masked half): only the padded keys are left in the mask.
        is_causal = (
            self.config.attention_implementation != "ours"
            and not decode
            and segment_ids is None
            and prefix_mask is None
        )
        if is_causal:
            mask = None if input_mask is None else input_mask.astype(bool)[:, None, :]

        x = self.embedding_dropout(x, deterministic=deterministic)
        for layer in self.layers:
            x = layer(
                x,
                mask,
                positions,
                user_context,
                user_context_mask,
                decode,
                deterministic,
                cache_index,
                is_causal,
            )
        x = self.final_norm(x)
        if logits_index is not None:
            x = jnp.take_along_axis(x, logits_index[:, :, None], axis=1)
        if return_hidden:
            return x
        return self.output_logits(x)

    def output_logits(self, x: Array) -> Array:
        """float32 vocabulary logits [batch, n, vocab] of final (normed) hidden states."""
        if self.config.tie_embeddings:
            logits = self.token_embedder.attend(x)
        else:
            logits = self.logits_dense(x)
        logits = constrain(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32)


class CacheBookkeeping(nn.Module):
    """Owns the decoder-level cache state: the next slot ``index`` and ``key_valid`` [b, slots].

    Returns the attention mask over all slots for the tokens being appended, their positions,
    and the slot where they are written.
    """

    @nn.compact
    def __call__(
        self,
        batch: int,
        length: int,
        input_mask: Array | None,
        positions: Array | None,
        prefix_mask: Array | None,
        segment_ids: Array | None = None,
    ) -> tuple[Array, Array, Array]:
        if not self.has_variable("cache", "key_valid") and not self.is_initializing():
            raise ValueError("decode=True needs an initialized cache: call decoder.init_cache")
        index = self.variable("cache", "index", jnp.zeros, (), jnp.int32)
        key_valid = self.variable("cache", "key_valid", jnp.zeros, (batch, length), jnp.bool_)
        slots = key_valid.value.shape[1]
        start = index.value
        new_valid = (
            jnp.ones((batch, length), bool) if input_mask is None else input_mask.astype(bool)
        )
        key_valid.value = jax.lax.dynamic_update_slice(key_valid.value, new_valid, (0, start))
        slot = jnp.arange(slots)
        query_slot = start + jnp.arange(length)
        causal = slot[None, :] <= query_slot[:, None]
        mask = key_valid.value[:, None, :] & causal[None]
        if prefix_mask is not None:
            # Prompt tokens marked as prefix see each other bidirectionally (prefix LM).
            slot_prefix = jax.lax.dynamic_update_slice(
                jnp.zeros((batch, slots), bool), prefix_mask.astype(bool), (0, start)
            )
            bidir = prefix_mask.astype(bool)[:, :, None] & slot_prefix[:, None, :]
            mask = mask | (bidir & key_valid.value[:, None, :])
        if segment_ids is not None:  # slots before this call: segment 0, shared by all
            slot_segment = jax.lax.dynamic_update_slice(
                jnp.zeros((batch, slots), jnp.int32), segment_ids.astype(jnp.int32), (0, start)
            )
            same = slot_segment[:, None, :] == segment_ids.astype(jnp.int32)[:, :, None]
            mask = mask & (same | (slot_segment == 0)[:, None, :])
        if positions is None:
            positions = jnp.broadcast_to(query_slot, (batch, length))
        index.value = start + length
        return mask, positions, start


def module_cache(
    module: nn.Module, batch_size: int, cache_length: int, method: Any = None
) -> dict[str, Any]:
    """An empty KV cache for ``module``, derived from the module itself: the ``cache``
    collection that an init with ``decode=True`` over ``cache_length`` tokens creates, traced
    abstractly (no parameter is computed) and filled with zeros. ``method`` (a function of the
    module and the tokens) reaches the decoder inside a wrapper module. A renamed layer
    renames its cache entry with it, so nothing here spells a variable path."""
    tokens = jnp.zeros((batch_size, cache_length), jnp.int32)
    call = method or (lambda m, t: m(t, decode=True))
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tokens, method=call))
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), dict(shapes["cache"]))


def init_cache(config: DecoderConfig, batch_size: int, cache_length: int) -> dict[str, Any]:
    """An empty KV cache of a ``Decoder(config)`` for ``batch_size`` sequences of up to
    ``cache_length`` tokens."""
    return module_cache(Decoder(config), batch_size, cache_length)


def prefill(
    module: Decoder, params: Any, tokens: Array, logits_index: Array | None = None
) -> tuple[Array, dict[str, Any]]:
    """(logits, the KV cache written) of one causal pass of ``tokens`` [b, L] into a fresh
    cache of L positions: the decoder alone, as the inference benchmarks time it (models'
    ``CachedDecoding`` adds prompts, user context and decoding steps around this)."""
    cache = init_cache(module.config, tokens.shape[0], tokens.shape[1])
    logits, mutated = module.apply(
        {"params": params, "cache": cache},
        tokens,
        decode=True,
        logits_index=logits_index,
        mutable=["cache"],
    )
    return logits, mutated["cache"]
