"""Training strategies as regex tables over parameter paths (big_vision's freezing style).

Each table is an ordered list of ``(regex, trainable)``; the first regex that fully matches a
'/'-joined parameter path decides. The paper's strategies:

- ``full``: everything trains.
- ``lora``: LoRA adapters on the LLM, plus the encoder and the integration, train; the LLM's
  base weights are frozen.
- ``enc``: the LLM is frozen; encoder and integration (projector, Perceiver, cross-attention
  blocks) train.
- ``proj``: LLM and encoder frozen; only the integration trains.

A parameter whose own name starts with ``frozen_`` (a constant table kept in the checkpoint, e.g.
the encoder's item-title vectors) never trains, whatever the table says.

Frozen parameters get no optimizer state (``optax.set_to_zero``) and the train step passes
them through untouched, so they stay bitwise identical.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import optax

Table = Sequence[tuple[str, bool]]

FROZEN_PREFIX = "frozen_"
INTEGRATION = (
    r"(recency|projector|perceiver|belief|item_head)/.*|decoder/layers_\d+/context_block/.*"
)
STRATEGIES: dict[str, Table] = {
    "full": [(r".*", True)],
    "lora": [
        (r".*/lora_(a|b)", True),
        (INTEGRATION, True),
        (r"user_encoder/.*", True),
        (r".*", False),
    ],
    "enc": [(INTEGRATION, True), (r"user_encoder/.*", True), (r".*", False)],
    "proj": [(INTEGRATION, True), (r".*", False)],
}


def path_name(path: tuple[Any, ...]) -> str:
    """'a/b/kernel' for a tree path; the ``.value`` of a logical-axis box is not a name."""
    parts = [k for k in path if not isinstance(k, jax.tree_util.GetAttrKey)]
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in parts)


def trainable_mask(params: Any, strategy: str | Table) -> Any:
    """A pytree of Python bools, True where the parameter trains."""
    if isinstance(strategy, str) and strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}; use one of {sorted(STRATEGIES)}")
    table = STRATEGIES[strategy] if isinstance(strategy, str) else strategy

    def decide(path, _):
        name = path_name(path)
        if name.rsplit("/", 1)[-1].startswith(FROZEN_PREFIX):
            return False
        for pattern, trainable in table:
            if re.fullmatch(pattern, name):
                return trainable
        raise ValueError(f"Strategy table has no rule for parameter {name}")

    mask = jax.tree_util.tree_map_with_path(decide, params)
    if not any(jax.tree_util.tree_leaves(mask)):
        raise ValueError(f"Strategy {strategy!r} leaves no trainable parameter in this model")
    return mask


def masked_optimizer(
    optimizer: optax.GradientTransformation, strategy: str | Table
) -> optax.GradientTransformation:
    """``optimizer`` on trainable parameters; frozen ones get zero updates and no state.

    Labels are computed from the params optax is given, boxed (logical axes) or not.
    """

    def labels(params):
        mask = trainable_mask(params, strategy)
        return jax.tree_util.tree_map(lambda t: "train" if t else "freeze", mask)

    return optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)


def apply_updates(params: Any, updates: Any, mask: Any) -> Any:
    """``params + updates`` on trainable leaves; frozen leaves are returned as they were."""
    return jax.tree_util.tree_map(
        lambda p, u, t: optax.apply_updates(p, u) if t else p, params, updates, mask
    )
