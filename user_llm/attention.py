"""Multi-head attention with grouped-query heads, rotary positions and a KV cache.

The cache holds keys and values for ``cache_length`` slots; the decoder owns which slots are
valid (``decoder.py``) and passes the attention mask in, so prompts of different lengths share
one cache without re-aligning them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from user_llm.layers import (
    BATCH_LENGTH_HEADS_KV,
    Array,
    DenseGeneral,
    DType,
    RMSNorm,
    attention_weights,
    constrain,
    dot_product_attention,
    rotary_embedding,
)


class Attention(nn.Module):
    """Self- or cross-attention.

    ``num_kv_heads < num_heads`` gives grouped-query attention. ``rope_theta=None`` disables
    rotary embeddings (cross-attention over user embeddings has no shared positions).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float | None = 10000.0
    use_bias: bool = False
    use_qk_norm: bool = False
    norm_eps: float = 1e-6
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    lora_rank: int = 0
    lora_alpha: float = 16.0
    # Sow the mean attention entropy (diagnostics; kept only when "intermediates" is mutable).
    sow_entropy: bool = False
    # layers.ATTENTION_IMPLEMENTATIONS. Cached decoding runs "cudnn" through "xla": cuDNN's
    # fused kernel is for whole sequences, a cached step attends one query to a masked cache.
    implementation: str = "ours"

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array | None,
        positions: Array | None = None,
        kv_input: Array | None = None,
        decode: bool = False,
        cache_index: Array | None = None,
        key_bias: Array | None = None,
        is_causal: bool = False,
    ) -> Array:
        """``key_bias`` [b, heads, k]: added to every query's attention logits. ``is_causal``:
        query i is at key slot i and attends only to slots <= i, on top of ``mask``."""
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        kw = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            use_bias=self.use_bias,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
        )
        kv_input = x if kv_input is None else kv_input
        q = DenseGeneral(
            (self.num_heads, self.head_dim), ("embed", "heads", "kv"), name="query", **kw
        )(x)
        k = DenseGeneral(
            (self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "kv"), name="key", **kw
        )(kv_input)
        v = DenseGeneral(
            (self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "kv"), name="value", **kw
        )(kv_input)
        if self.use_qk_norm:
            norm_kw = dict(epsilon=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
            q = RMSNorm(axis_name="kv", name="query_norm", **norm_kw)(q)
            k = RMSNorm(axis_name="kv", name="key_norm", **norm_kw)(k)
        if self.rope_theta is not None:
            if positions is None:
                raise ValueError("Rotary attention needs positions")
            q = rotary_embedding(q, positions, self.rope_theta)
            k = rotary_embedding(k, positions, self.rope_theta)
        q = constrain(q, BATCH_LENGTH_HEADS_KV)
        k = constrain(k, ("batch", "length", "kv_heads", "kv"))
        v = constrain(v, ("batch", "length", "kv_heads", "kv"))

        implementation = self.implementation
        if decode:
            k, v = self._update_cache(k, v, cache_index)
            implementation = "xla" if implementation == "cudnn" else implementation

        out = dot_product_attention(q, k, v, mask, self.dtype, key_bias, implementation, is_causal)
        if self.sow_entropy and self.is_mutable_collection("intermediates"):
            entropy = normalized_entropy(q, k, mask, key_bias)
            self.sow("intermediates", "attention_entropy", entropy)
        out = constrain(out, BATCH_LENGTH_HEADS_KV)
        return DenseGeneral(
            (x.shape[-1],),
            ("heads", "kv", "embed"),
            contract_dims=2,
            name="out",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
        )(out)

    def _update_cache(self, k: Array, v: Array, cache_index: Array) -> tuple[Array, Array]:
        """Writes the new keys/values at ``cache_index`` and returns the whole cache.

        An init with ``decode=True`` creates the cache variables, one slot per input token
        (``decoder.init_cache`` derives the empty cache that way); an apply needs them.
        """
        if not self.has_variable("cache", "cached_key") and not self.is_initializing():
            raise ValueError("decode=True needs an initialized cache: call decoder.init_cache")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        start = (0, cache_index, 0, 0)
        cached_key.value = jax.lax.dynamic_update_slice(
            cached_key.value, k.astype(cached_key.value.dtype), start
        )
        cached_value.value = jax.lax.dynamic_update_slice(
            cached_value.value, v.astype(cached_value.value.dtype), start
        )
        return cached_key.value.astype(self.dtype), cached_value.value.astype(self.dtype)


def normalized_entropy(
    q: Array, k: Array, mask: Array | None, key_bias: Array | None = None
) -> Array:
    """Mean attention entropy over heads and queries, divided by log(number of attended keys):
    1 = uniform over the keys, 0 = all weight on one key."""
    w = attention_weights(q, k, mask, key_bias)
    entropy = -jnp.sum(jnp.where(w > 0, w * jnp.log(jnp.maximum(w, 1e-30)), 0.0), axis=-1)
    keys = jnp.ones(w.shape[:1] + w.shape[-2:], bool) if mask is None else mask
    num_keys = jnp.sum(jnp.broadcast_to(keys, (w.shape[0],) + w.shape[-2:]), axis=-1)
    return jnp.mean(entropy / jnp.log(jnp.maximum(num_keys, 2))[:, None, None, :])
