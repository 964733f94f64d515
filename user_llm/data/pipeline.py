"""SeqIO task -> feature converter -> numpy batches for the train loop (T5X's DatasetConfig).

This is the single input path: every run names a registered SeqIO task or mixture. Each host
reads only its shard (``seqio.ShardInfo``); the train loop assembles global arrays.
Resuming skips the batches that earlier steps consumed, so a restarted run sees exactly the
batches an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import seqio
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """What to read and how to batch it."""

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    split: str = "train"
    batch_size: int = 8
    shuffle: bool = True
    seed: int | None = 42
    pack: bool = False
    # Read the task as cached offline by SeqIO's Beam pipeline (seqio.scripts.cache_tasks_main)
    # from one of ``cache_dirs``; a task that is not cached there is an error.
    use_cached: bool = False
    cache_dirs: tuple[str, ...] = ()
    # "decoder" | "prefix_lm" (tasks with "inputs" and "targets": decoder-only prefix-LM
    # layout) | "user_prefix_lm" (User-LLM: + user_* arrays, unpacked) | "user_features"
    # (encoder pretraining: user_* arrays only).
    converter: str = "decoder"
    # Further features the user_* converters keep (e.g. ("candidate_item_index",)).
    passthrough_features: tuple[str, ...] = ()
    # > 0: the train loop cuts each batch's decoder_* arrays to the longest row's length rounded
    # up to a multiple of this (never past the task's feature length), so a batch of short
    # prompts runs at its own length instead of the longest possible one. Rows are unchanged
    # up to trailing padding, which a causal decoder's real positions never attend to; each
    # distinct length compiles the step once. 0: every batch at the full feature length.
    length_bucket: int = 0


CONVERTERS = ("decoder", "prefix_lm", "user_prefix_lm", "user_features")


def feature_converter_name(cfg: DatasetConfig) -> str:
    """The converter ``cfg`` selects."""
    return cfg.converter


def feature_converter(cfg: DatasetConfig) -> seqio.FeatureConverter:
    """The SeqIO feature converter ``cfg`` selects (see ``DatasetConfig.converter``)."""
    from user_llm.data import feature_converters as fc

    name = feature_converter_name(cfg)
    if name == "decoder":
        return seqio.DecoderFeatureConverter(pack=cfg.pack)
    if name == "prefix_lm":
        return seqio.PrefixLMFeatureConverter(pack=cfg.pack)
    if name == "user_prefix_lm":
        return fc.UserPrefixLMFeatureConverter(
            pack=cfg.pack, passthrough=tuple(cfg.passthrough_features)
        )
    if name == "user_features":
        return fc.UserFeaturesConverter(pack=cfg.pack, passthrough=tuple(cfg.passthrough_features))
    raise ValueError(f"unknown converter {name!r}; expected one of {CONVERTERS}")


def get_dataset(
    cfg: DatasetConfig,
    *,
    shard_id: int = 0,
    num_shards: int = 1,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
) -> tf.data.Dataset:
    """Batched tf.data.Dataset of this host's part of the global batch.

    ``num_epochs=None`` repeats forever (training); evaluation passes 1 and
    ``drop_remainder=False``.
    """
    if cfg.batch_size % num_shards:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {num_shards} hosts")
    if cfg.mixture_or_task_name not in seqio.MixtureRegistry.names() and (
        cfg.mixture_or_task_name not in seqio.TaskRegistry.names()
    ):
        known = sorted(seqio.TaskRegistry.names())
        raise ValueError(
            f"Unknown SeqIO task or mixture {cfg.mixture_or_task_name!r}; is its module imported "
            f"(an 'import tasks....' line in the gin file)? Registered tasks: {known[:30]}"
        )
    if cfg.use_cached and cfg.cache_dirs:
        seqio.add_global_cache_dirs(
            [d for d in cfg.cache_dirs if d not in seqio.get_global_cache_dirs()]
        )
    ds = seqio.get_dataset(
        cfg.mixture_or_task_name,
        task_feature_lengths=dict(cfg.task_feature_lengths),
        dataset_split=cfg.split,
        shuffle=cfg.shuffle,
        num_epochs=num_epochs,
        feature_converter=feature_converter(cfg),
        shard_info=seqio.ShardInfo(index=shard_id, num_shards=num_shards),
        use_cached=cfg.use_cached,
        seed=cfg.seed,
    )
    ds = ds.batch(cfg.batch_size // num_shards, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)


def batches_in_order(
    task: str,
    feature_lengths: Mapping[str, int],
    split: str,
    batch_size: int,
    converter: str,
    passthrough_features: tuple[str, ...] = (),
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over a task split, unshuffled, as numpy batches (the last one may be short):
    what evaluation, ``generate`` and reports read, so example i is the same everywhere."""
    cfg = DatasetConfig(
        mixture_or_task_name=task,
        task_feature_lengths=dict(feature_lengths),
        split=split,
        batch_size=batch_size,
        shuffle=False,
        converter=converter,
        passthrough_features=passthrough_features,
    )
    yield from numpy_batches(get_dataset(cfg, num_epochs=1, drop_remainder=False))


def numpy_batches(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    """Iterates a batched dataset as dicts of numpy arrays."""
    for batch in ds.as_numpy_iterator():
        yield dict(batch)


def bucketed_length(batch: Mapping[str, np.ndarray], multiple: int) -> int:
    """The decoder length a batch needs: one past its last non-zero column in any ``decoder_*``
    array (SeqIO's converters pad every one of them with zeros), rounded up to ``multiple``
    and capped at the arrays' length."""
    if multiple <= 0:
        raise ValueError(f"length_bucket must be a positive number of positions, not {multiple}")
    arrays = [v for k, v in batch.items() if k.startswith("decoder_") and v.ndim >= 2]
    if not arrays:
        raise ValueError(f"length_bucket needs decoder_* arrays; the batch has {sorted(batch)}")
    full = arrays[0].shape[1]
    used = np.zeros(full, bool)
    for v in arrays:
        used |= np.any(v.reshape(v.shape[0], full, -1) != 0, axis=(0, 2))
    needed = int(np.flatnonzero(used)[-1]) + 1 if used.any() else 1
    return min(full, -(-needed // multiple) * multiple)


def cut_length(batch: Mapping[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """``batch`` with every ``decoder_*`` array cut to ``length`` positions (others as they
    are: a User-LLM batch's user_* history has its own length)."""
    return {
        k: v[:, :length] if k.startswith("decoder_") and v.ndim >= 2 else v
        for k, v in batch.items()
    }


def pad_batch(batch: Mapping[str, np.ndarray], batch_size: int) -> tuple[dict[str, Any], int]:
    """Pads a short final eval batch with all-zero rows (zero loss weight); returns (batch, n)."""
    n = len(next(iter(batch.values())))
    if n == batch_size:
        return dict(batch), n
    padded = {}
    for k, v in batch.items():
        pad = np.zeros((batch_size - n,) + v.shape[1:], v.dtype)
        padded[k] = np.concatenate([v, pad], axis=0)
    return padded, n
