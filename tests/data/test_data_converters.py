"""UserPrefixLMFeatureConverter and UserFeaturesConverter on small in-memory datasets."""

from __future__ import annotations

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")

from user_llm.data import pipeline  # noqa: E402
from user_llm.data.feature_converters import (  # noqa: E402
    UserFeaturesConverter,
    UserPrefixLMFeatureConverter,
)


def dataset(n=3, length=5):
    rng = np.random.default_rng(0)
    return tf.data.Dataset.from_tensor_slices(
        {
            "inputs": tf.ragged.constant([[3, 4, 5, 1], [6, 1], [7, 8, 1]][:n]),
            "targets": tf.ragged.constant([[9, 1], [10, 11, 1], [12, 1]][:n]),
            "user_item_ids": rng.integers(2, 50, (n, length)).astype(np.int32),
            "user_genres": rng.integers(0, 9, (n, length, 2)).astype(np.int32),
            "user_mask": np.ones((n, length), np.int32),
            "candidate_label": np.arange(n, dtype=np.int32),
            "other": np.zeros((n, 2), np.int32),
        }
    )


def first(ds):
    return [dict(x) for x in ds.as_numpy_iterator()]


def test_user_prefix_lm_matches_prefix_lm_and_passes_user_arrays():
    lengths = {"inputs": 6, "targets": 4}
    got = first(UserPrefixLMFeatureConverter(passthrough=("candidate_label",))(dataset(), lengths))
    text = dataset().map(lambda ex: {"inputs": ex["inputs"], "targets": ex["targets"]})
    want = first(seqio.PrefixLMFeatureConverter(pack=False)(text, lengths))
    src = first(dataset())
    for g, w, s in zip(got, want, src, strict=True):
        assert set(g) == set(w) | {"user_item_ids", "user_genres", "user_mask", "candidate_label"}
        for k in w:
            np.testing.assert_array_equal(g[k], w[k])
        for k in ("user_item_ids", "user_genres", "user_mask", "candidate_label"):
            np.testing.assert_array_equal(g[k], s[k])
        assert g["candidate_label"].shape == ()


def test_user_lengths_from_task_feature_lengths_pad_and_trim():
    out = first(UserPrefixLMFeatureConverter()(dataset(), {"inputs": 6, "targets": 4,
                                                           "user_item_ids": 8}))  # fmt: skip
    assert out[0]["user_item_ids"].shape == (8,) and (out[0]["user_item_ids"][5:] == 0).all()
    assert out[0]["user_genres"].shape == (5, 2)


def test_pack_refused_and_unknown_lengths_rejected():
    with pytest.raises(ValueError, match="does not pack"):
        UserPrefixLMFeatureConverter(pack=True)
    with pytest.raises(ValueError, match="does not pack"):
        UserFeaturesConverter(pack=True)
    with pytest.raises(ValueError, match="bogus"):
        UserPrefixLMFeatureConverter()(dataset(), {"inputs": 6, "targets": 4, "bogus": 3})
    with pytest.raises(ValueError, match="no user_"):
        UserFeaturesConverter()(dataset().map(lambda ex: {"other": ex["other"]}), {})


def test_user_features_converter_keeps_only_user_arrays():
    out = first(UserFeaturesConverter()(dataset(), {}))
    assert set(out[0]) == {"user_item_ids", "user_genres", "user_mask"}
    batched = UserFeaturesConverter()(dataset(), {}).batch(2)
    b = next(batched.as_numpy_iterator())
    assert b["user_genres"].shape == (2, 5, 2)


def test_pipeline_selects_converters():
    def cfg(**kw):
        return pipeline.DatasetConfig("x", {"targets": 4}, **kw)

    assert type(pipeline.feature_converter(cfg())) is seqio.DecoderFeatureConverter
    assert (
        type(pipeline.feature_converter(cfg(converter="prefix_lm")))
        is seqio.PrefixLMFeatureConverter
    )
    assert isinstance(
        pipeline.feature_converter(cfg(converter="user_prefix_lm")), UserPrefixLMFeatureConverter
    )
    assert isinstance(
        pipeline.feature_converter(cfg(converter="user_features")), UserFeaturesConverter
    )
    with pytest.raises(ValueError, match="unknown converter"):
        pipeline.feature_converter(cfg(converter="nope"))
