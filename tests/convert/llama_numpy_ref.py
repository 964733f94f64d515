"""An independent numpy forward pass with Hugging Face Llama/Qwen2 semantics, and writers of
tiny random models in HF (safetensors) and llama.cpp (GGUF) formats, for importer tests.

Deliberately written from the HF modeling code's definitions, not from our Flax modules:
weights are ``[out, in]``, rotary uses ``rotate_half``, GQA repeats KV heads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TINY_HF_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 264,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 96,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
}


def random_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named float32 weights of a random Llama/Qwen2 model."""
    rng = np.random.default_rng(seed)
    d, v, m = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // h
    qwen = cfg["model_type"] == "qwen2"

    def w(*shape, scale=None):
        scale = scale if scale is not None else 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    out = {
        "model.embed_tokens.weight": w(v, d, scale=1.0),
        "model.norm.weight": 1 + w(d, scale=0.1),
    }
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = w(v, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = 1 + w(d, scale=0.1)
        out[p + "post_attention_layernorm.weight"] = 1 + w(d, scale=0.1)
        out[p + "self_attn.q_proj.weight"] = w(h * hd, d)
        out[p + "self_attn.k_proj.weight"] = w(kv * hd, d)
        out[p + "self_attn.v_proj.weight"] = w(kv * hd, d)
        out[p + "self_attn.o_proj.weight"] = w(d, h * hd)
        if qwen:
            out[p + "self_attn.q_proj.bias"] = w(h * hd, scale=0.5)
            out[p + "self_attn.k_proj.bias"] = w(kv * hd, scale=0.5)
            out[p + "self_attn.v_proj.bias"] = w(kv * hd, scale=0.5)
        out[p + "mlp.gate_proj.weight"] = w(m, d)
        out[p + "mlp.up_proj.weight"] = w(m, d)
        out[p + "mlp.down_proj.weight"] = w(d, m)
    return out


def _rms(x, weight, eps):
    x64 = x.astype(np.float64)
    return x64 / np.sqrt(np.mean(x64**2, -1, keepdims=True) + eps) * weight


def _rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], -1)


def forward(weights: dict[str, np.ndarray], cfg: dict, ids: list[int]) -> np.ndarray:
    """Logits [len(ids), vocab] (float64) of one sequence, HF semantics, causal, no cache."""
    d = cfg["hidden_size"]
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // h
    eps = cfg["rms_norm_eps"]
    n = len(ids)
    wt = {k: v.astype(np.float64) for k, v in weights.items()}
    x = wt["model.embed_tokens.weight"][ids]
    inv_freq = 1.0 / (cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd))
    freqs = np.outer(np.arange(n), inv_freq)
    emb = np.concatenate([freqs, freqs], -1)
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
    causal = np.tril(np.ones((n, n), bool))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        hs = _rms(x, wt[p + "input_layernorm.weight"], eps)

        def proj(name, heads, hs=hs, p=p):
            y = hs @ wt[p + f"self_attn.{name}.weight"].T
            if p + f"self_attn.{name}.bias" in wt:
                y = y + wt[p + f"self_attn.{name}.bias"]
            return y.reshape(n, heads, hd)

        q, k, v = proj("q_proj", h), proj("k_proj", kv), proj("v_proj", kv)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = np.repeat(k, h // kv, axis=1)
        v = np.repeat(v, h // kv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
        scores = np.where(causal[None], scores, -np.inf)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", probs, v).reshape(n, h * hd)
        x = x + attn @ wt[p + "self_attn.o_proj.weight"].T
        hs = _rms(x, wt[p + "post_attention_layernorm.weight"], eps)
        gate = hs @ wt[p + "mlp.gate_proj.weight"].T
        up = hs @ wt[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ wt[p + "mlp.down_proj.weight"].T
    x = _rms(x, wt["model.norm.weight"], eps)
    head = wt["lm_head.weight"] if "lm_head.weight" in wt else wt["model.embed_tokens.weight"]
    return x @ head.T


# -- a tiny byte-level BPE vocabulary ------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token_types): 3 specials, 256 bytes, 5 merged tokens = 264 ids."""
    table = bytes_to_unicode()
    tokens = TINY_SPECIALS + [table[b] for b in range(256)]
    tokens += [m.replace(" ", "") for m in TINY_MERGES]
    types = [3] * len(TINY_SPECIALS) + [1] * (len(tokens) - len(TINY_SPECIALS))
    return tokens, TINY_MERGES, types


# -- writers --------------------------------------------------------------------------------


def write_hf_dir(directory: Path, cfg: dict, weights: dict[str, np.ndarray], shards: int = 1):
    """A HF model folder: config.json + (sharded) safetensors + index when sharded."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    names = sorted(weights)
    if shards == 1:
        save_file(weights, str(directory / "model.safetensors"))
        return
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[s::shards]}
        save_file(part, str(directory / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


_HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's ``LlamaModel.permute`` (written out independently)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    path: Path,
    cfg: dict,
    weights: dict[str, np.ndarray],
    arch: str | None = None,
    qtype: str = "F32",
    with_tokenizer: bool = True,
) -> None:
    """A GGUF as llama.cpp's converter writes it (Q/K rows permuted for llama)."""
    import gguf

    arch = arch or cfg["model_type"]
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(256)
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(h)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
        w.add_rope_dimension_count(cfg["head_dim"])
    if with_tokenizer:
        tokens, merges, types = tiny_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(2)
    for name, t in weights.items():
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            i, suffix = name[len("model.layers.") :].split(".", 1)
            gname = f"blk.{i}.{_HF_TO_GGUF[suffix]}"
        if arch == "llama" and suffix_is(name, "q_proj.weight"):
            t = llamacpp_permute(t, h)
        elif arch == "llama" and suffix_is(name, "k_proj.weight"):
            t = llamacpp_permute(t, kv)
        if t.ndim == 2 and qtype != "F32":
            qt = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(gname, gguf.quants.quantize(t, qt), raw_dtype=qt)
        else:
            w.add_tensor(gname, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def suffix_is(name: str, suffix: str) -> bool:
    return name.endswith(suffix)


def dequantized(weights: dict[str, np.ndarray], qtype: str) -> dict[str, np.ndarray]:
    """The weights as a quantize->dequantize round trip gives them (matrices only)."""
    import gguf

    if qtype == "F32":
        return weights
    qt = gguf.GGMLQuantizationType[qtype]
    return {
        k: gguf.quants.dequantize(gguf.quants.quantize(v, qt), qt).reshape(v.shape)
        if v.ndim == 2
        else v
        for k, v in weights.items()
    }
