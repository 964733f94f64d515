"""Building blocks shared by the decoder, the user encoder and the integration layers.

Every parameter declares T5X logical axes (``embed, mlp, heads, kv_heads, kv, vocab``) through
``nn.with_logical_partitioning``; the rules table in ``partitioning.py`` maps them to mesh axes.
Activations carry ``nn.with_logical_constraint`` so that XLA keeps the intended layout.

No TensorFlow, SeqIO or data code here: modules take arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from user_llm import blocked_attention

Array = jax.Array
DType = Any
Initializer = Callable[..., Array]

# Logical axis names of activations, T5X style.
BATCH_LENGTH_EMBED = ("batch", "length", "embed")
BATCH_LENGTH_HEADS_KV = ("batch", "length", "heads", "kv")

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
    """Sharding constraint by logical names; a no-op outside a mesh / rules context."""
    return nn.with_logical_constraint(x, tuple(axes))


def kernel_init(scale: float = 1.0) -> Initializer:
    """Fan-in scaled truncated normal, the usual choice for Transformer kernels."""
    return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Llama): ``x / rms(x) * scale``, computed in float32."""

    epsilon: float = 1e-6
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = x.shape[-1]
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (features,),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


class Embed(nn.Module):
    """Token embedding table; ``attend`` gives tied output logits."""

    num_embeddings: int
    features: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    axes: tuple[str, str] = ("vocab", "embed")
    init_stddev: float = 1.0

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_stddev), self.axes),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))


class DenseGeneral(nn.Module):
    """A dense layer whose kernel is ``in_shape + out_shape`` with explicit logical axes.

    Attention projections keep heads as their own kernel dimension (``embed, heads, kv``), as
    T5X does, so that sharding over heads is a rules-table change, not a reshape.

    ``lora_rank > 0`` adds a low-rank update ``(x @ lora_a) @ lora_b * lora_alpha / lora_rank``
    with ``lora_b`` initialized at zero, so the layer starts equal to the frozen base
    (``lora.merge`` folds it back into ``kernel`` for export).
    """

    features: tuple[int, ...]
    axes: tuple[str, ...]
    contract_dims: int = 1
    use_bias: bool = False
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    init: Initializer | None = None
    lora_rank: int = 0
    lora_alpha: float = 16.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_shape = tuple(x.shape[-self.contract_dims :])
        n_in, n_out = self.contract_dims, len(self.features)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.init or kernel_init(), self.axes),
            in_shape + tuple(self.features),
            self.param_dtype,
        )
        lhs = "abcdefgh"[: x.ndim]
        contract = lhs[-n_in:]
        out = "pqrstu"[:n_out]
        x = x.astype(self.dtype)
        y = jnp.einsum(f"{lhs},{contract}{out}->{lhs[:-n_in]}{out}", x, kernel.astype(self.dtype))
        if self.lora_rank:
            lora_a = self.param(
                "lora_a",
                nn.with_logical_partitioning(kernel_init(), self.axes[:n_in] + ("lora_rank",)),
                in_shape + (self.lora_rank,),
                self.param_dtype,
            )
            lora_b = self.param(
                "lora_b",
                nn.with_logical_partitioning(
                    nn.initializers.zeros, ("lora_rank",) + self.axes[n_in:]
                ),
                (self.lora_rank,) + tuple(self.features),
                self.param_dtype,
            )
            h = jnp.einsum(f"{lhs},{contract}r->{lhs[:-n_in]}r", x, lora_a.astype(self.dtype))
            h = jnp.einsum(f"...r,r{out}->...{out}", h, lora_b.astype(self.dtype))
            y = y + h * (self.lora_alpha / self.lora_rank)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.axes[n_in:]),
                tuple(self.features),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


def rotary_embedding(x: Array, positions: Array, theta: float) -> Array:
    """Rotary position embedding in the "rotate half" layout (Hugging Face Llama convention).

    x: [batch, length, heads, head_dim]; positions: [batch, length] (int). Computed in float32.
    """
    head_dim = x.shape[-1]
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(0, half, dtype=np.float32) * 2.0 / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, l, half]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def distance_from_last(mask: Array) -> Array:
    """[b, L] int32: each position's distance from its row's last valid one (valid positions
    first, then padding, which reads 0)."""
    valid = jnp.sum(mask.astype(jnp.int32), axis=1)
    last = jnp.maximum(valid - 1, 0)
    return jnp.maximum(last[:, None] - jnp.arange(mask.shape[1], dtype=jnp.int32)[None, :], 0)


# How attention is computed (``DecoderConfig.attention_implementation``):
# - "ours": the einsum below, and ``blocked_attention`` for long sequences (the CPU default);
# - "xla" / "cudnn": ``jax.nn.dot_product_attention`` with that implementation; "cudnn" is
#   cuDNN's fused flash attention on NVIDIA GPUs (bfloat16 or float16 only).
ATTENTION_IMPLEMENTATIONS = ("ours", "xla", "cudnn")


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    mask: Array | None,
    dtype: DType,
    key_bias: Array | None = None,
    implementation: str = "ours",
    is_causal: bool = False,
) -> Array:
    """Grouped-query attention; softmax in float32. Long sequences go to the memory-efficient
    ``blocked_attention`` (same result; rows with no key to attend give zeros there).

    query: [b, q, heads, d]; key/value: [b, k, kv_heads, d]; mask: broadcastable to [b, q, k]
    (True = attend). heads must be a multiple of kv_heads. key_bias: [b, heads, k], added to
    every query's logits (cross-attention's recency prior; not for blocked attention).
    ``is_causal`` (query i at key slot i) adds the causal mask to ``mask``: an implementation
    that knows it (cuDNN) skips the masked half instead of reading a mask.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {implementation!r} not in {ATTENTION_IMPLEMENTATIONS}"
        )
    if implementation != "ours":
        bias = None if key_bias is None else key_bias[:, :, None, :].astype(dtype)
        out = jax.nn.dot_product_attention(
            query.astype(dtype),
            key.astype(dtype),
            value.astype(dtype),
            bias=bias,
            mask=None if mask is None else jnp.expand_dims(mask, 1),  # [b, 1, q, k]
            is_causal=is_causal,
            implementation=implementation,
        )
        return out.astype(dtype)
    if is_causal:
        causal = jnp.tril(jnp.ones((query.shape[1], key.shape[1]), bool))[None]
        mask = causal if mask is None else causal & mask
    b, q_len, num_heads, head_dim = query.shape
    if q_len * key.shape[1] >= blocked_attention.MIN_BLOCKED_PAIRS:  # long prompts
        if key_bias is not None:
            raise ValueError(
                f"key_bias is not supported by blocked attention ({q_len} x {key.shape[1]} "
                "query-key pairs)"
            )
        return blocked_attention.blocked_attention(query, key, value, mask, dtype)
    weights = attention_weights(query, key, mask, key_bias).astype(dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, value)
    return out.reshape(b, q_len, num_heads, head_dim)


def attention_weights(
    query: Array, key: Array, mask: Array | None, key_bias: Array | None = None
) -> Array:
    """Softmax weights [b, kv_heads, groups, q, k] in float32 (shapes as in
    ``dot_product_attention``)."""
    b, q_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    groups = num_heads // num_kv_heads
    query = query.reshape(b, q_len, num_kv_heads, groups, head_dim)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", query, key).astype(jnp.float32)
    logits = logits / np.sqrt(head_dim).astype(np.float32)
    if key_bias is not None:  # [b, heads, k], heads in (kv_head, group) order as the query's
        bias = key_bias.astype(jnp.float32).reshape(b, num_kv_heads, groups, 1, key.shape[1])
        logits = logits + bias
    if mask is not None:
        big_neg = jnp.finfo(jnp.float32).min
        logits = jnp.where(mask[:, None, None, :, :], logits, big_neg)
    return jax.nn.softmax(logits, axis=-1)


class GatedMLP(nn.Module):
    """``wo(act(wi_0 x) * wi_1 x)``: SwiGLU with ``silu``, GeGLU with ``gelu``/``gelu_tanh``."""

    hidden_dim: int
    activation: str = "silu"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    lora_rank: int = 0
    lora_alpha: float = 16.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"Unknown MLP activation {self.activation!r}; use one of {list(ACTIVATIONS)}"
            )
        kw = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
        )
        gate = DenseGeneral((self.hidden_dim,), ("embed", "mlp"), name="wi_0", **kw)(x)
        up = DenseGeneral((self.hidden_dim,), ("embed", "mlp"), name="wi_1", **kw)(x)
        h = ACTIVATIONS[self.activation](gate) * up
        h = constrain(h, ("batch", "length", "mlp"))
        return DenseGeneral((x.shape[-1],), ("mlp", "embed"), name="wo", **kw)(h)
