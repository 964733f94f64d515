"""Safetensors importer on tiny random HF-format models written by the test (no torch), against
the independent numpy forward pass in ``llama_numpy_ref``."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from llama_numpy_ref import TINY_HF_CONFIG, forward, random_weights, write_hf_dir

from user_llm import checkpoints
from user_llm.convert import safetensors as st_lib
from user_llm.convert.common import ConversionError, CorruptFileError, UnsupportedModelError
from user_llm.decoder import Decoder

IDS = [5, 70, 263, 3, 100, 101, 200, 9, 1, 42, 260, 77, 12, 13]


def our_logits(cfg, params, ids):
    return np.asarray(Decoder(cfg).apply({"params": params}, np.array([ids], np.int32)))[0]


@pytest.mark.parametrize(
    "model_type,tied,shards",
    [("llama", True, 1), ("llama", False, 3), ("qwen2", False, 1), ("qwen2", True, 2)],
)
def test_tiny_hf_model_matches_numpy_reference(tmp_path, model_type, tied, shards):
    cfg = dict(TINY_HF_CONFIG, model_type=model_type, tie_word_embeddings=tied)
    weights = random_weights(cfg, seed=shards)
    write_hf_dir(tmp_path / "m", cfg, weights, shards=shards)
    config, params, _ = st_lib.load_hf_dir(tmp_path / "m")
    assert config.tie_embeddings == tied and config.use_qkv_bias == (model_type == "qwen2")
    np.testing.assert_allclose(
        our_logits(config, params, IDS), forward(weights, cfg, IDS), atol=1e-4, rtol=1e-4
    )


def _write_safetensors(path, tensors):
    """A safetensors file by hand (to store bfloat16, which safetensors.numpy cannot)."""
    header, blobs, offset = {}, [], 0
    names = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16"}
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {
            "dtype": names[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_bfloat16_checkpoint_and_import_cli(tmp_path):
    from user_llm.import_checkpoint import import_checkpoint

    cfg = dict(TINY_HF_CONFIG)
    weights = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_weights(cfg, seed=7).items()}
    d = tmp_path / "bf16"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    _write_safetensors(d / "model.safetensors", weights)
    config, params, _ = st_lib.load_hf_dir(d)
    as_f32 = {k: v.astype(np.float32) for k, v in weights.items()}
    np.testing.assert_allclose(
        our_logits(config, params, IDS), forward(as_f32, cfg, IDS), atol=1e-4, rtol=1e-4
    )
    out = import_checkpoint(tmp_path / "out", hf_dir=d)  # no tokenizer.json: weights only
    saved = json.loads((out / "config.json").read_text())
    assert saved["tokenizer"] is None and saved["architecture"] == "llama"
    flat = checkpoints.read_params(out)
    np.testing.assert_array_equal(
        flat["layers_1/mlp/wo/kernel"], params["layers_1"]["mlp"]["wo"]["kernel"]
    )


def test_bad_inputs(tmp_path):
    cfg = dict(TINY_HF_CONFIG)
    weights = random_weights(cfg)
    d = tmp_path / "m"
    write_hf_dir(d, cfg, weights)
    data = (d / "model.safetensors").read_bytes()

    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="beyond the end of the file"):
        st_lib.load_hf_dir(d)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 50) + data[8:])
    with pytest.raises(CorruptFileError, match="header length"):
        st_lib.load_hf_dir(d)
    (d / "model.safetensors").write_bytes(data[:4])
    with pytest.raises(CorruptFileError, match="too small"):
        st_lib.load_hf_dir(d)

    write_hf_dir(d, dict(cfg, model_type="gemma3"), weights)
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'gemma3'"):
        st_lib.load_hf_dir(d)
    rope = dict(cfg, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    write_hf_dir(d, rope, weights)
    with pytest.raises(UnsupportedModelError, match="rope_scaling"):
        st_lib.load_hf_dir(d)

    wrong = dict(weights)
    wrong["model.layers.0.mlp.up_proj.weight"] = wrong["model.layers.0.mlp.up_proj.weight"][:-1]
    write_hf_dir(d, cfg, wrong)
    with pytest.raises(ConversionError, match=r"up_proj.weight has shape \(95, 64\)"):
        st_lib.load_hf_dir(d)

    extra = dict(weights, **{"model.layers.0.self_attn.q_norm.weight": np.ones(32, np.float32)})
    write_hf_dir(d, cfg, extra)
    with pytest.raises(UnsupportedModelError, match="q_norm"):
        st_lib.load_hf_dir(d)

    with pytest.raises(ConversionError, match="no config.json"):
        st_lib.load_hf_dir(tmp_path)


def _raw_safetensors(path, header, payload=b""):
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + payload)


def test_crafted_safetensors_and_configs_are_refused(tmp_path):
    """Issue "Nothing good is ever lost", item 9 and its risks: each crafted input is one
    clear error naming the file, never a cast, a wrap-around or a read outside the folder."""
    f = tmp_path / "x.safetensors"
    huge = 1 << 40  # 2^40 * 2^40 elements * 4 bytes wraps int64 to 0 with np.prod
    _raw_safetensors(f, {"w": {"dtype": "F32", "shape": [huge, huge, 16], "data_offsets": [0, 0]}})
    with pytest.raises(CorruptFileError, match="offsets do not match its shape"):
        st_lib.SafetensorsFile(f)
    two = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
           "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}  # fmt: skip
    _raw_safetensors(f, two, bytes(24))
    with pytest.raises(CorruptFileError, match="tensors a and b overlap"):
        st_lib.SafetensorsFile(f)
    _raw_safetensors(f, {"w": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    with pytest.raises(CorruptFileError, match="stored as int32, not floats"):
        st_lib.SafetensorsFile(f).load("w")

    cfg, weights = dict(TINY_HF_CONFIG), random_weights(dict(TINY_HF_CONFIG))
    d = tmp_path / "m"
    write_hf_dir(d, cfg, weights)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(CorruptFileError, match="config.json is not a JSON object"):
        st_lib.load_hf_dir(d)
    (d / "config.json").write_text(json.dumps(dict(cfg, rope_scaling="linear")))
    with pytest.raises(CorruptFileError, match="rope_scaling must be an object"):
        st_lib.load_hf_dir(d)
    (d / "config.json").write_text(json.dumps(cfg))
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes((d / "model.safetensors").read_bytes())
    index = {"weight_map": {"model.embed_tokens.weight": "../secret.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptFileError, match="is not a file inside"):
        st_lib.load_hf_dir(d)
