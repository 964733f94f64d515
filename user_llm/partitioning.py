"""Device mesh and logical-axis rules (T5X's ``standard_logical_axis_rules``).

Parameters and activations name logical axes; one rules table maps them to mesh axes. Changing
how a model is sharded is a change of this table (or its gin binding), never of model code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalRules = tuple[tuple[str, str | None], ...]


def standard_logical_axis_rules(
    data_axis: str = "data", model_axis: str = "model", shard_params_over_data: bool = False
) -> LogicalRules:
    """Batch over ``data``; vocab, mlp and heads over ``model``; the rest replicated.

    ``shard_params_over_data`` (FSDP / ZeRO-3 style) also splits the ``embed`` dimension of the
    weights over the data axis; activations keep their batch sharding because flax resolves
    each logical axis to the first rule whose mesh axis is still free.
    """
    rules: list[tuple[str, str | None]] = [
        ("batch", data_axis),
        ("vocab", model_axis),
        ("mlp", model_axis),
        ("heads", model_axis),
        ("kv_heads", model_axis),
    ]
    if shard_params_over_data:
        rules.append(("embed", data_axis))
    rules += [
        ("embed", None),
        ("kv", None),
        ("length", None),
        ("latents", None),
        ("lora_rank", None),
    ]
    return tuple(rules)


def create_mesh(
    mesh_shape: Sequence[int] = (-1, 1),
    axis_names: Sequence[str] = ("data", "model"),
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh over ``devices`` (default: all); one ``-1`` entry takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(mesh_shape)
    if len(shape) != len(axis_names):
        raise ValueError(
            f"mesh_shape {tuple(shape)} and axis_names {tuple(axis_names)} differ in rank"
        )
    if shape.count(-1) > 1:
        raise ValueError(f"At most one -1 in mesh_shape, got {tuple(shape)}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh_shape {tuple(shape)}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh_shape {tuple(shape)} needs {int(np.prod(shape))} devices, {len(devices)} present"
        )
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), tuple(axis_names))


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, name: str) -> PartitionSpec:
    """Replicates any dimension the mesh cannot split evenly (e.g. 3 KV heads on 4 devices)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        if size > 1 and dim % size:
            logging.warning("%s: dim %d not divisible by mesh %s; replicated", name, dim, names)
            fitted.append(None)
        else:
            fitted.append(axes)
    return PartitionSpec(*fitted)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """NamedShardings for a tree whose leaves are boxed with logical axes (or plain, replicated).

    Leaves may be arrays or ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``). The result has
    the structure of the unboxed tree (empty nodes such as optax's ``MaskedNode`` included).
    """
    is_box = lambda x: isinstance(x, nn.Partitioned)

    def one(path, leaf):
        names, value = (leaf.names, leaf.value) if is_box(leaf) else ((), leaf)
        if not jax.tree_util.tree_leaves(value):
            return value  # a box around an empty node (e.g. optax's MaskedNode): no array
        spec = nn.logical_to_mesh_axes(names, rules) if names else PartitionSpec()
        shape = tuple(getattr(value, "shape", ()))
        return NamedSharding(mesh, _fit_spec(spec, shape, mesh, jax.tree_util.keystr(path)))

    return jax.tree_util.tree_map_with_path(one, boxed_tree, is_leaf=is_box)


def data_sharding(mesh: Mesh, rules: LogicalRules) -> NamedSharding:
    """Sharding of a batch array: leading dimension by the ``batch`` rule."""
    spec = nn.logical_to_mesh_axes(("batch",), rules)
    return NamedSharding(mesh, PartitionSpec(*spec))


def _bytes_per_device(leaf: Any) -> int:
    sharding = getattr(leaf, "sharding", None)
    shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def describe_state(state: Any, mesh: Mesh, top: int = 5) -> str:
    """Start-up report: mesh, per-device parameter and optimizer memory, largest arrays.

    Read it before a long job: a parameter that should be sharded but shows ``PartitionSpec()``
    (replicated) costs its full size on every device, which is how pod jobs run out of memory.
    Takes a state of arrays or of ``jax.ShapeDtypeStruct`` with shardings; computes nothing.
    """
    lines = [
        f"Mesh {dict(mesh.shape)} over {mesh.size} devices "
        f"({jax.process_count()} process(es), {jax.local_device_count()} local devices each)"
    ]
    for part in ("params", "opt_state"):
        leaves = [x for x in jax.tree_util.tree_leaves(state.get(part, {})) if hasattr(x, "shape")]
        total = sum(
            int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in leaves
        )
        per_device = sum(_bytes_per_device(x) for x in leaves)
        lines.append(
            f"  {part}: {len(leaves)} arrays, {_format_bytes(total)} in all, "
            f"{_format_bytes(per_device)} per device"
        )
    named = [
        (jax.tree_util.keystr(path), leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.get("params", {}))
        if hasattr(leaf, "shape")
    ]
    named.sort(key=lambda kv: -int(np.prod(kv[1].shape, dtype=np.int64)))
    lines.append(f"  largest {min(top, len(named))} parameters (shape -> per-device shape, spec):")
    for name, leaf in named[:top]:
        sharding = getattr(leaf, "sharding", None)
        spec = getattr(sharding, "spec", sharding)
        local = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        lines.append(f"    {name}: {tuple(leaf.shape)} -> {tuple(local)}, {spec}")
    return "\n".join(lines)
