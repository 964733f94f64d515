"""SeqIO feature converters that carry a user's history arrays next to (or instead of) tokens.

- ``UserPrefixLMFeatureConverter``: SeqIO's prefix-LM decoder features (``decoder_input_tokens``,
  ``decoder_target_tokens``, ``decoder_loss_weights``, ``decoder_causal_attention``) plus every
  ``user_*`` array unchanged, for ``UserLLMModel``.
- ``UserFeaturesConverter``: only the ``user_*`` arrays, for encoder pretraining
  (``UserEncoderModel``).

User arrays have fixed shapes: their length comes from ``task_feature_lengths[key]`` when given
(arrays are then trimmed / padded on their first axis), else from the dataset's static shape, so
a caller only has to name ``inputs`` and ``targets`` lengths. Packing is refused: a packed row
would hold several examples but only one user history.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf

from user_llm.feature_names import USER_PREFIX

_FeatureSpec = seqio.FeatureConverter.FeatureSpec


def _user_passthrough(
    ds: tf.data.Dataset,
    task_feature_lengths: Mapping[str, int],
    extra: Sequence[str],
    allowed: Sequence[str],
) -> tuple[dict[str, _FeatureSpec], dict[str, int], list[str]]:
    """Specs and lengths of the pass-through features; also the rank-0 ones (lifted to [1])."""
    spec = ds.element_spec
    keys = [k for k in spec if k.startswith(USER_PREFIX) and not k.endswith("_pretokenized")]
    missing = [k for k in extra if k not in spec]
    if missing:
        raise ValueError(f"passthrough features {missing} are not in the dataset: {sorted(spec)}")
    keys += [k for k in extra if k not in keys]
    unknown = sorted(set(task_feature_lengths) - set(keys) - set(allowed))
    if unknown:
        raise ValueError(
            f"task_feature_lengths names {unknown}, which are neither {list(allowed)} nor "
            f"user_* / passthrough features of the dataset ({sorted(keys)})"
        )
    specs, lengths, scalars = {}, {}, []
    for k in keys:
        shape = spec[k].shape
        if shape.rank == 0:
            scalars.append(k)
            specs[k], lengths[k] = _FeatureSpec(dtype=spec[k].dtype, rank=1), 1
            continue
        length = task_feature_lengths.get(k, shape[0])
        if length is None:
            raise ValueError(f"{k} has no static length; give it in task_feature_lengths")
        specs[k] = _FeatureSpec(dtype=spec[k].dtype, rank=shape.rank)
        lengths[k] = int(length)
    return specs, lengths, scalars


def _lift(ds: tf.data.Dataset, scalars: Sequence[str]) -> tf.data.Dataset:
    if not scalars:
        return ds
    return ds.map(lambda ex: {k: (v[None] if k in scalars else v) for k, v in ex.items()})


def _lower(ds: tf.data.Dataset, scalars: Sequence[str]) -> tf.data.Dataset:
    if not scalars:
        return ds
    return ds.map(lambda ex: {k: (v[0] if k in scalars else v) for k, v in ex.items()})


class UserPrefixLMFeatureConverter(seqio.PrefixLMFeatureConverter):
    """Prefix-LM decoder features plus the ``user_*`` arrays (unpacked only).

    ``passthrough`` names further features to keep (e.g. ``candidate_item_index``,
    ``candidate_label`` for ranking evaluation); scalars come back as scalars.
    """

    def __init__(self, pack: bool = False, passthrough: Sequence[str] = (), **kwargs) -> None:
        if pack:
            raise ValueError(
                "UserPrefixLMFeatureConverter does not pack: each row carries one user's history, "
                "so examples of different users cannot share a row. Use pack=False."
            )
        self._extra = tuple(passthrough)
        super().__init__(pack=False, **kwargs)

    def __call__(
        self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
    ) -> tf.data.Dataset:
        specs, lengths, scalars = _user_passthrough(
            ds, task_feature_lengths, self._extra, allowed=("inputs", "targets")
        )
        self._passthrough_features = specs
        text_lengths = {k: task_feature_lengths[k] for k in ("inputs", "targets")}
        out = super().__call__(_lift(ds, scalars), {**text_lengths, **lengths})
        return _lower(out, scalars)


class UserFeaturesConverter(seqio.FeatureConverter):
    """Only the ``user_*`` arrays (plus ``passthrough`` features), for encoder pretraining."""

    TASK_FEATURES: Mapping[str, _FeatureSpec] = {}
    MODEL_FEATURES: Mapping[str, _FeatureSpec] = {}
    PACKING_FEATURE_DTYPES: Mapping[str, tf.dtypes.DType] = {}

    def __init__(self, pack: bool = False, passthrough: Sequence[str] = (), **kwargs) -> None:
        if pack:
            raise ValueError("UserFeaturesConverter does not pack (one user history per row)")
        self._extra = tuple(passthrough)
        super().__init__(pack=False, **kwargs)

    def __call__(
        self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
    ) -> tf.data.Dataset:
        specs, lengths, scalars = _user_passthrough(ds, task_feature_lengths, self._extra, ())
        if not specs:
            raise ValueError(f"no user_* features in the dataset: {sorted(ds.element_spec)}")
        self._passthrough_features = specs
        return _lower(super().__call__(_lift(ds, scalars), lengths), scalars)

    def _convert_features(
        self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
    ) -> tf.data.Dataset:
        keys = list(self._passthrough_features)
        ds = ds.map(lambda ex: {k: ex[k] for k in keys})
        return self._pack_or_pad(ds, task_feature_lengths)

    def get_model_feature_lengths(
        self, task_feature_lengths: Mapping[str, int]
    ) -> Mapping[str, int]:
        return dict(task_feature_lengths)
