"""GGUF (llama.cpp) checkpoints -> our decoder: a validating reader, dequantization, mapping.

Why our own header parser rather than ``gguf.GGUFReader``: a user's file may be truncated or
corrupt, and the stock reader then fails deep inside numpy (or loops over an absurd array
count). Here every count, length, shape and offset is checked against the file's size before
it is used, so a bad file gives a ``ConversionError`` that says what is wrong, in time
proportional to the file's size. Tensor data stay memory-mapped until dequantized (through
``gguf.quants.dequantize``).

Supported architectures: ``llama`` (SmolLM2, Llama 2/3 without rope scaling, Mistral) and
``qwen2``. llama.cpp's converter reorders the rows of the Llama query/key projections for its
interleaved rotary layout; ``load_gguf`` undoes that (``common.unpermute_rows``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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
    unpermute_rows,
)
from user_llm.decoder import DecoderConfig

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# GGUF metadata value types.
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL = range(8)
_STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = 8, 9, 10, 11, 12
_SCALAR_DTYPES = {
    _UINT8: np.dtype("<u1"),
    _INT8: np.dtype("<i1"),
    _UINT16: np.dtype("<u2"),
    _INT16: np.dtype("<i2"),
    _UINT32: np.dtype("<u4"),
    _INT32: np.dtype("<i4"),
    _FLOAT32: np.dtype("<f4"),
    _BOOL: np.dtype("<u1"),
    _UINT64: np.dtype("<u8"),
    _INT64: np.dtype("<i8"),
    _FLOAT64: np.dtype("<f8"),
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry. ``shape`` is numpy order (GGUF's dims reversed)."""

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    offset: int  # absolute, in the file
    nbytes: int


class _Cursor:
    """Bounds-checked little-endian reads over the file's bytes."""

    def __init__(self, data: np.ndarray, path: str) -> None:
        self.data = data
        self.size = int(data.shape[0])
        self.pos = 0
        self.path = path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise CorruptFileError(
                f"{self.path}: truncated or corrupt GGUF: {what} needs {n} bytes at offset "
                f"{self.pos}, file has {self.size}"
            )

    def scalar(self, dtype: np.dtype, what: str) -> Any:
        self.need(dtype.itemsize, what)
        v = self.data[self.pos : self.pos + dtype.itemsize].view(dtype)[0]
        self.pos += dtype.itemsize
        return v.item()

    def u32(self, what: str) -> int:
        return int(self.scalar(np.dtype("<u4"), what))

    def u64(self, what: str) -> int:
        return int(self.scalar(np.dtype("<u8"), what))

    def string(self, what: str, strict: bool = False) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = self.data[self.pos : self.pos + n].tobytes()
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if strict:
                raise CorruptFileError(f"{self.path}: {what} is not valid UTF-8") from e
            return raw.decode("utf-8", "replace")

    def remaining(self) -> int:
        return self.size - self.pos


class GGUFFile:
    """A parsed GGUF file: ``metadata`` (dict), ``tensors`` (name -> TensorInfo), ``load``.

    Use as a context manager or just let it go; the data are a read-only memory map.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConversionError(f"{self.path}: no such GGUF file")
        if p.stat().st_size < 24:
            raise CorruptFileError(
                f"{self.path}: {p.stat().st_size} bytes is too small for a GGUF header"
            )
        self._data = np.memmap(p, dtype=np.uint8, mode="r")
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.version = 0
        self.alignment = DEFAULT_ALIGNMENT
        self._parse()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._data = None  # the memmap closes when no tensor view refers to it any more

    # -- header --------------------------------------------------------------------------
    def _parse(self) -> None:
        c = _Cursor(self._data, self.path)
        c.need(4, "magic")
        magic = self._data[:4].tobytes()
        c.pos = 4
        if magic != GGUF_MAGIC:
            raise CorruptFileError(f"{self.path}: not a GGUF file (magic {magic!r})")
        version = c.u32("version")
        if version not in SUPPORTED_VERSIONS:
            if version & 0xFFFF == 0 and (version >> 16) in SUPPORTED_VERSIONS:
                raise UnsupportedModelError(f"{self.path}: big-endian GGUF is not supported")
            raise UnsupportedModelError(
                f"{self.path}: GGUF version {version} not supported ({SUPPORTED_VERSIONS})"
            )
        self.version = version
        n_tensors = c.u64("tensor count")
        n_kv = c.u64("metadata count")
        # Each entry takes at least this many bytes, which bounds the counts by the file size.
        if n_kv * 13 > c.remaining():
            raise CorruptFileError(f"{self.path}: metadata count {n_kv} exceeds the file size")
        if n_tensors * 24 > c.remaining():
            raise CorruptFileError(f"{self.path}: tensor count {n_tensors} exceeds the file size")
        for i in range(n_kv):
            key = c.string(f"metadata key #{i}", strict=True)
            if key in self.metadata:
                raise CorruptFileError(f"{self.path}: duplicate metadata key {key!r}")
            vtype = c.u32(f"type of {key}")
            self.metadata[key] = self._value(c, vtype, key)
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (
            not isinstance(alignment, int)
            or isinstance(alignment, bool)
            or alignment <= 0
            or alignment & (alignment - 1)
        ):
            raise CorruptFileError(f"{self.path}: general.alignment {alignment!r} is invalid")
        self.alignment = alignment
        infos = []
        for i in range(n_tensors):
            infos.append(self._tensor_info(c, i))
        data_start = -(-c.pos // alignment) * alignment
        for name, dims, qtype, rel in infos:
            self.tensors[name] = self._check_tensor(name, dims, qtype, rel, data_start)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
            if start < end:
                raise CorruptFileError(f"{self.path}: tensors {first} and {second} overlap")

    def _value(self, c: _Cursor, vtype: int, key: str, depth: int = 0) -> Any:
        if vtype in _SCALAR_DTYPES:
            v = c.scalar(_SCALAR_DTYPES[vtype], key)
            return bool(v) if vtype == _BOOL else v
        if vtype == _STRING:
            return c.string(key)
        if vtype == _ARRAY:
            if depth > 2:
                raise CorruptFileError(f"{self.path}: metadata {key} nests arrays too deeply")
            etype = c.u32(f"element type of {key}")
            n = c.u64(f"length of {key}")
            if etype in _SCALAR_DTYPES:
                dtype = _SCALAR_DTYPES[etype]
                c.need(n * dtype.itemsize, f"{n} elements of {key}")
                arr = c.data[c.pos : c.pos + n * dtype.itemsize].view(dtype)
                c.pos += n * dtype.itemsize
                values = arr.tolist()
                return [bool(v) for v in values] if etype == _BOOL else values
            if etype == _STRING:
                if n * 8 > c.remaining():
                    raise CorruptFileError(
                        f"{self.path}: metadata {key} claims {n} strings, more than the file "
                        "holds (truncated or corrupt)"
                    )
                return [c.string(f"{key}[{j}]") for j in range(n)]
            if etype == _ARRAY:
                if n * 12 > c.remaining():
                    raise CorruptFileError(f"{self.path}: metadata {key} claims {n} arrays")
                return [self._value(c, _ARRAY, f"{key}[{j}]", depth + 1) for j in range(n)]
            raise CorruptFileError(f"{self.path}: metadata {key} has unknown element type {etype}")
        raise CorruptFileError(f"{self.path}: metadata {key} has unknown value type {vtype}")

    def _tensor_info(self, c: _Cursor, i: int) -> tuple[str, list[int], int, int]:
        name = c.string(f"name of tensor #{i}", strict=True)
        n_dims = c.u32(f"rank of tensor {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise CorruptFileError(f"{self.path}: tensor {name} has rank {n_dims}")
        dims = [c.u64(f"dims of tensor {name}") for _ in range(n_dims)]
        qtype = c.u32(f"type of tensor {name}")
        rel = c.u64(f"offset of tensor {name}")
        return name, dims, qtype, rel

    def _check_tensor(
        self, name: str, dims: list[int], qtype: int, rel: int, data_start: int
    ) -> TensorInfo:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        if name in self.tensors:
            raise CorruptFileError(f"{self.path}: duplicate tensor {name!r}")
        try:
            qt = GGMLQuantizationType(qtype)
        except ValueError:
            raise UnsupportedModelError(
                f"{self.path}: tensor {name} has unknown GGML type {qtype}"
            ) from None
        if qt not in GGML_QUANT_SIZES:
            raise UnsupportedModelError(f"{self.path}: tensor {name} has type {qt.name}")
        block, type_size = GGML_QUANT_SIZES[qt]
        if any(d == 0 for d in dims) or dims[0] % block:
            raise CorruptFileError(
                f"{self.path}: tensor {name} dims {dims} do not fit {qt.name} blocks of {block}"
            )
        n = 1
        for d in dims:
            n *= d
        nbytes = n // block * type_size
        start = data_start + rel
        if rel % self.alignment or start + nbytes > self._data.shape[0]:
            raise CorruptFileError(
                f"{self.path}: tensor {name} ({qt.name}, dims {dims}) at offset {rel} "
                f"(+{nbytes} bytes) lies outside the file or is misaligned"
            )
        return TensorInfo(name, tuple(reversed(dims)), qt, start, nbytes)

    # -- data ----------------------------------------------------------------------------
    def load(self, name: str) -> np.ndarray:
        """The tensor ``name`` as float32 in numpy order (e.g. ``[out, in]`` for matrices)."""
        from gguf import GGML_QUANT_SIZES
        from gguf.quants import dequantize

        if self._data is None:
            raise ConversionError(f"{self.path}: file is closed")
        info = self.tensors[name]
        raw = np.asarray(self._data[info.offset : info.offset + info.nbytes])
        block, type_size = GGML_QUANT_SIZES[info.qtype]
        row_bytes = info.shape[-1] // block * type_size
        raw = raw.reshape(*info.shape[:-1], row_bytes)
        try:
            with np.errstate(all="ignore"):  # corrupt scales give NaN; build_params reports it
                out = dequantize(raw, info.qtype)
        except NotImplementedError as e:
            raise UnsupportedModelError(
                f"{self.path}: cannot dequantize {name} of type {info.qtype.name}: {e}"
            ) from None
        return np.asarray(out, dtype=np.float32).reshape(info.shape)


# -- config and name mapping ----------------------------------------------------------------

_GGUF_TO_HF = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (None if unknown)."""
    if gguf_name in _GLOBAL_TO_HF:
        return _GLOBAL_TO_HF[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_TO_HF:
        return f"model.layers.{int(parts[1])}.{_GGUF_TO_HF[parts[2]]}"
    return None


def _int(meta: Mapping[str, Any], key: str, path: str, default: int | None = None) -> int:
    v = meta.get(key, default)
    if v is None:
        raise ConversionError(f"{path}: GGUF metadata lacks {key}")
    if isinstance(v, list):
        raise UnsupportedModelError(f"{path}: per-layer {key} ({v[:4]}...) is not supported")
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v > 1 << 24:
        raise ConversionError(f"{path}: GGUF metadata {key}={v!r} is not a sensible size")
    return v


def _float(meta: Mapping[str, Any], key: str, path: str, default: float) -> float:
    v = meta.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v) or v <= 0:
        raise ConversionError(f"{path}: GGUF metadata {key}={v!r} is invalid")
    # GGUF stores float32: 1e-5 reads back as 9.99999974e-06; keep the intended decimal.
    return float(f"{float(v):.7g}")


def config_from_gguf(f: GGUFFile, **overrides: Any) -> DecoderConfig:
    """A ``DecoderConfig`` from GGUF metadata (and the embedding's shape)."""
    meta, path = f.metadata, f.path
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ConversionError(f"{path}: GGUF metadata lacks general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: unsupported architecture {arch!r} (supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}; Gemma 3 needs sliding-window attention and "
            "per-layer rope, which the decoder does not have)"
        )
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none", "linear") or (
        scaling == "linear" and meta.get(f"{arch}.rope.scaling.factor", 1.0) != 1.0
    ):
        raise UnsupportedModelError(f"{path}: rope scaling {scaling!r} is not supported")
    if "rope_freqs.weight" in f.tensors:
        raise UnsupportedModelError(f"{path}: rope frequency factors (Llama 3.1+) not supported")
    if meta.get(f"{arch}.expert_count", 0):
        raise UnsupportedModelError(f"{path}: mixture-of-experts models are not supported")
    embed = _int(meta, f"{arch}.embedding_length", path)
    heads = _int(meta, f"{arch}.attention.head_count", path)
    kv_heads = _int(meta, f"{arch}.attention.head_count_kv", path, heads)
    head_dim = _int(meta, f"{arch}.attention.key_length", path, embed // heads)
    value_dim = _int(meta, f"{arch}.attention.value_length", path, head_dim)
    rope_dim = _int(meta, f"{arch}.rope.dimension_count", path, head_dim)
    if value_dim != head_dim or rope_dim != head_dim:
        raise UnsupportedModelError(
            f"{path}: key/value/rotary dims {head_dim}/{value_dim}/{rope_dim} must be equal"
        )
    if "token_embd.weight" not in f.tensors:
        raise ConversionError(f"{path}: no token_embd.weight tensor")
    vocab = f.tensors["token_embd.weight"].shape[0]
    meta_vocab = meta.get(f"{arch}.vocab_size")
    if isinstance(meta_vocab, int) and meta_vocab != vocab:
        raise ConversionError(f"{path}: vocab_size {meta_vocab} but token_embd has {vocab} rows")
    if heads % kv_heads:
        raise ConversionError(f"{path}: {heads} heads is not a multiple of {kv_heads} KV heads")
    kw = dict(
        vocab_size=vocab,
        embed_dim=embed,
        num_layers=_int(meta, f"{arch}.block_count", path),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        mlp_dim=_int(meta, f"{arch}.feed_forward_length", path),
        mlp_activation="silu",
        rope_theta=_float(meta, f"{arch}.rope.freq_base", path, 10000.0),
        norm_eps=_float(meta, f"{arch}.attention.layer_norm_rms_epsilon", path, 1e-5),
        tie_embeddings="output.weight" not in f.tensors,
        use_qkv_bias=arch == "qwen2",
    )
    return decoder_config(kw, overrides, path)


def load_gguf(
    path: str | Path, *, dtype: Any = np.float32, **config_overrides: Any
) -> tuple[DecoderConfig, dict[str, Any], dict[str, Any]]:
    """Reads a GGUF file: (DecoderConfig, nested params, metadata).

    ``config_overrides`` set non-architectural fields (e.g. ``dtype='bfloat16'``).
    """
    with GGUFFile(path) as f:
        cfg = config_from_gguf(f, **config_overrides)
        arch = f.metadata["general.architecture"]
        names = {}
        unknown = []
        for name in f.tensors:
            hf = hf_name(name)
            if hf is None:
                unknown.append(name)
            else:
                names[hf] = name
        if unknown:
            raise UnsupportedModelError(
                f"{f.path}: tensors this importer does not understand: {unknown[:8]}"
            )

        def get(hf: str) -> np.ndarray:
            w = f.load(names[hf])
            if arch == "llama":
                if hf.endswith(("q_proj.weight", "q_proj.bias")):
                    w = unpermute_rows(w, cfg.num_heads)
                elif hf.endswith(("k_proj.weight", "k_proj.bias")):
                    w = unpermute_rows(w, cfg.num_kv_heads)
            return w

        params = build_params(cfg, get, set(names), source=f.path, dtype=dtype)
        metadata = dict(f.metadata)
    logging.info("Read %s: %s, %d tensors", path, arch, len(names))
    return cfg, params, metadata


__all__ = [
    "ConversionError",
    "CorruptFileError",
    "GGUFFile",
    "TensorInfo",
    "UnsupportedModelError",
    "config_from_gguf",
    "hf_name",
    "load_gguf",
]
