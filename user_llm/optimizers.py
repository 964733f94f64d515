"""Optimizers and learning-rate schedules, built from gin-friendly keyword arguments."""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import optax

from user_llm import strategies


def warmup_cosine_schedule(
    peak_learning_rate: float = 1e-3,
    warmup_steps: int = 100,
    total_steps: int = 10_000,
    end_fraction: float = 0.1,
) -> optax.Schedule:
    """Linear warmup to ``peak_learning_rate``, cosine decay to ``end_fraction`` of it."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_learning_rate,
        warmup_steps=max(warmup_steps, 1),
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=peak_learning_rate * end_fraction,
    )


def constant_schedule(learning_rate: float = 1e-3) -> optax.Schedule:
    return optax.constant_schedule(learning_rate)


def adamw(
    learning_rate: optax.Schedule | float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """AdamW with optional global-norm clipping (clipping first, as is usual for LMs)."""
    parts = []
    if grad_clip_norm:
        parts.append(optax.clip_by_global_norm(grad_clip_norm))
    parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)


def scale_by_path(multipliers: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
    """Multiplies the update of each parameter whose '/'-joined path fully matches a regex by
    its factor (first match wins; others unchanged). Chained after AdamW, a factor m is a
    learning rate m times higher for those parameters (weight decay included)."""
    compiled = [(re.compile(pattern), float(m)) for pattern, m in multipliers]

    def factor(path, _) -> float:
        name = strategies.path_name(path)
        return next((m for pattern, m in compiled if pattern.fullmatch(name)), 1.0)

    def update_fn(updates, state, params=None):
        del params
        factors = jax.tree_util.tree_map_with_path(factor, updates)
        return jax.tree_util.tree_map(
            lambda u, f: u if f == 1.0 else u * f, updates, factors
        ), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def user_llm_multipliers(integration: float = 1.0, encoder: float = 1.0) -> list[tuple[str, float]]:
    """Learning-rate factors for User-LLM's parts: the integration (projector, Perceiver,
    cross-attention blocks) and the user encoder, relative to the base learning rate."""
    return [(strategies.INTEGRATION, integration), (r"user_encoder/.*", encoder)]
