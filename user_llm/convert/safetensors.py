"""Hugging Face model folders (``config.json`` + ``*.safetensors``) -> our decoder.

Supports the Llama and Qwen2 families (``LlamaForCausalLM``, ``MistralForCausalLM`` without
sliding windows, ``Qwen2ForCausalLM``), single-file or sharded (``model.safetensors.index.json``).

The safetensors header is parsed here (a little-endian u64 length, then JSON) rather than with
``safetensors.numpy``: numpy has no bfloat16, which is how most checkpoints are stored, and a
truncated download should give a clear ``ConversionError`` rather than a low-level failure.
Weights are memory-mapped and converted to float32 one tensor at a time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from user_llm.convert.common import (
    ConversionError,
    CorruptFileError,
    UnsupportedModelError,
    build_params,
    decoder_config,
)
from user_llm.decoder import DecoderConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_MAX_HEADER = 100 << 20


def _dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    return {
        "F64": np.dtype("<f8"),
        "F32": np.dtype("<f4"),
        "F16": np.dtype("<f2"),
        "BF16": np.dtype(ml_dtypes.bfloat16),
        "I64": np.dtype("<i8"),
        "I32": np.dtype("<i4"),
        "I16": np.dtype("<i2"),
        "I8": np.dtype("i1"),
        "U8": np.dtype("u1"),
        "BOOL": np.dtype("?"),
    }


class SafetensorsFile:
    """One ``.safetensors`` file: ``names`` and ``load(name)`` (float32), validated header."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        p = Path(path)
        size = p.stat().st_size if p.is_file() else -1
        if size < 8:
            raise CorruptFileError(f"{self.path}: missing or too small for a safetensors file")
        self._data = np.memmap(p, dtype=np.uint8, mode="r")
        n = int(self._data[:8].view("<u8")[0])
        if n > min(size - 8, _MAX_HEADER):
            raise CorruptFileError(f"{self.path}: header length {n} exceeds the file")
        try:
            header = json.loads(self._data[8 : 8 + n].tobytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptFileError(f"{self.path}: unreadable safetensors header: {e}") from e
        if not isinstance(header, dict):
            raise CorruptFileError(f"{self.path}: safetensors header is not a JSON object")
        header.pop("__metadata__", None)
        dtypes = _dtypes()
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        base = 8 + n
        for name, e in header.items():
            try:
                dtype = dtypes[e["dtype"]]
                shape = tuple(int(d) for d in e["shape"])
                begin, end = (int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise CorruptFileError(f"{self.path}: bad header entry for {name}: {e!r}") from err
            count = math.prod(shape)  # exact: a crafted shape cannot wrap around int64
            if any(d < 0 for d in shape) or end - begin != count * dtype.itemsize or begin < 0:
                raise CorruptFileError(f"{self.path}: {name} offsets do not match its shape")
            if base + end > size:
                raise CorruptFileError(f"{self.path}: {name} lies beyond the end of the file")
            self._entries[name] = (dtype, shape, base + begin, base + end)
        spans = sorted((b, e, n) for n, (_, _, b, e) in self._entries.items() if e > b)
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:], strict=False):
            if begin < end:
                raise CorruptFileError(f"{self.path}: tensors {first} and {second} overlap")

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def load(self, name: str) -> np.ndarray:
        """A weight as float32; a weight stored as integers or booleans is refused, not cast."""
        dtype, shape, begin, end = self._entries[name]
        if dtype.kind != "f" and dtype.name != "bfloat16":
            raise CorruptFileError(f"{self.path}: weight {name} is stored as {dtype}, not floats")
        return self._data[begin:end].view(dtype).reshape(shape).astype(np.float32)


def _tensor_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorruptFileError(f"{index}: not a valid safetensors index: {e}") from e
        files = sorted(set(weight_map.values()))
        inside = directory.resolve()
        for f in files:
            if not isinstance(f, str) or inside not in (directory / f).resolve().parents:
                raise CorruptFileError(f"{index}: shard {f!r} is not a file inside {directory}")
        missing = [f for f in files if not (directory / f).exists()]
        if missing:
            raise ConversionError(f"{directory}: shards named in the index are missing: {missing}")
        return [directory / f for f in files]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{directory}: no *.safetensors files")
    return files


def config_from_hf(hf: Mapping[str, Any], source: str, **overrides: Any) -> DecoderConfig:
    """A ``DecoderConfig`` from a Hugging Face ``config.json`` dict."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{source}: unsupported architecture {model_type!r} "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    rope_scaling = hf.get("rope_scaling")
    if rope_scaling is not None and not isinstance(rope_scaling, Mapping):
        raise CorruptFileError(f"{source}: rope_scaling must be an object, got {rope_scaling!r}")
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) != "default":
        raise UnsupportedModelError(f"{source}: rope_scaling {rope_scaling} is not supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UnsupportedModelError(f"{source}: attention_bias/mlp_bias are not supported")
    if hf.get("use_sliding_window") or (model_type == "mistral" and hf.get("sliding_window")):
        raise UnsupportedModelError(f"{source}: sliding-window attention is not supported")
    act = hf.get("hidden_act", "silu")
    acts = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}
    if act not in acts:
        raise UnsupportedModelError(f"{source}: activation {act!r} is not supported")
    try:
        embed = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        kw = dict(
            vocab_size=int(hf["vocab_size"]),
            embed_dim=embed,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or embed // heads),
            mlp_dim=int(hf["intermediate_size"]),
            mlp_activation=acts[act],
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            use_qkv_bias=model_type == "qwen2",
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{source}: config.json lacks or mangles {e}") from e
    return decoder_config(kw, overrides, source)


def load_hf_dir(
    directory: str | Path, *, dtype: Any = np.float32, **config_overrides: Any
) -> tuple[DecoderConfig, dict[str, Any], dict[str, Any]]:
    """Reads a HF model folder: (DecoderConfig, nested params, the HF config dict)."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise ConversionError(f"{directory}: no config.json (not a Hugging Face model folder?)")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{cfg_path}: invalid JSON: {e}") from e
    where: dict[str, SafetensorsFile] = {}
    for path in _tensor_files(directory):
        f = SafetensorsFile(path)
        for name in f.names:
            if name in where:
                raise CorruptFileError(f"{directory}: tensor {name} appears in two files")
            where[name] = f
    if not isinstance(hf, dict):
        raise CorruptFileError(f"{cfg_path}: config.json is not a JSON object")
    if "lm_head.weight" not in where and not hf.get("tie_word_embeddings", False):
        logging.warning("%s: no lm_head.weight; tying the output to the embeddings", directory)
        config_overrides.setdefault("tie_embeddings", True)
    cfg = config_from_hf(hf, str(directory), **config_overrides)
    params = build_params(
        cfg, lambda n: where[n].load(n), set(where), source=str(directory), dtype=dtype
    )
    return cfg, params, hf
