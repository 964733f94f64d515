"""Perceiver resampler (Flamingo): a fixed number of learned latents attend to the user
embeddings, so what the LLM reads has ``num_latents`` positions whatever the history length."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from user_llm.attention import Attention
from user_llm.layers import Array, GatedMLP, RMSNorm, constrain


@dataclasses.dataclass(frozen=True)
class PerceiverConfig:
    num_latents: int = 16
    num_layers: int = 2
    num_heads: int = 4
    head_dim: int = 32
    mlp_dim: int = 256


class PerceiverResampler(nn.Module):
    """[batch, length, d] (+ mask) -> [batch, num_latents, d]."""

    config: PerceiverConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> Array:
        cfg = self.config
        batch, _, width = x.shape
        latents = self.param(
            "latents",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("latents", "embed")),
            (cfg.num_latents, width),
        )
        h = jnp.broadcast_to(latents[None].astype(x.dtype), (batch, cfg.num_latents, width))
        key_mask = jnp.ones(x.shape[:2], bool) if mask is None else mask.astype(bool)
        key_mask = jnp.concatenate([key_mask, jnp.ones((batch, cfg.num_latents), bool)], axis=1)
        x = RMSNorm(name="input_norm")(x)
        for i in range(cfg.num_layers):
            q = RMSNorm(name=f"layers_{i}_latent_norm")(h)
            kv = jnp.concatenate([x, q], axis=1)  # Latents also attend to themselves.
            h = h + Attention(
                num_heads=cfg.num_heads,
                num_kv_heads=cfg.num_heads,
                head_dim=cfg.head_dim,
                rope_theta=None,
                sow_entropy=True,
                name=f"layers_{i}_attention",
            )(q, key_mask[:, None, :], kv_input=kv)
            h = h + GatedMLP(cfg.mlp_dim, name=f"layers_{i}_mlp")(
                RMSNorm(name=f"layers_{i}_mlp_norm")(h)
            )
            h = constrain(h, ("batch", "latents", "embed"))
        return RMSNorm(name="output_norm")(h)
