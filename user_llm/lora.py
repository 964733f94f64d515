"""LoRA: fold the adapters back into the base kernels for export.

The adapters themselves live in ``layers.DenseGeneral`` (``lora_rank > 0``): every projection
that has ``lora_a`` / ``lora_b`` beside its ``kernel`` computes
``x @ kernel + (x @ lora_a) @ lora_b * alpha / rank``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np


def merge(params: dict[str, Any], lora_alpha: float) -> dict[str, Any]:
    """Returns params with each ``kernel += lora_a @ lora_b * alpha / rank`` and no adapters.

    The result loads into the same config with ``lora_rank=0`` and gives the same outputs.
    """

    def visit(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        out = {k: visit(v) for k, v in node.items() if k not in ("lora_a", "lora_b")}
        if "lora_a" in node and "lora_b" in node:
            a, b = node["lora_a"], node["lora_b"]
            rank = a.shape[-1]
            n_in = a.ndim - 1
            a2 = jnp.reshape(a, (int(np.prod(a.shape[:n_in])), rank))
            b2 = jnp.reshape(b, (rank, int(np.prod(b.shape[1:]))))
            delta = (a2 @ b2).reshape(node["kernel"].shape) * (lora_alpha / rank)
            out["kernel"] = node["kernel"] + delta.astype(node["kernel"].dtype)
        return out

    return visit(params)
