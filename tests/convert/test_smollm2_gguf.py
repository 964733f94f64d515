"""The packaged SmolLM2-135M-Instruct GGUF through our importer and decoder, against the golden
outputs of Hugging Face transformers in shared/reference (see its README).

The GGUF is read once per module; the forward pass is jitted once for a [8, 64] batch.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SHARED_REFERENCE, run_module

pytestmark = pytest.mark.slow

REFERENCE = SHARED_REFERENCE / "smollm2_reference.json"


@pytest.fixture(scope="module")
def smollm2():
    from user_llm.convert import gguf as gguf_lib
    from user_llm.decoder import Decoder
    from user_llm.import_checkpoint import packaged_gguf
    from user_llm.vocabularies import BPETokenizer

    try:
        path = packaged_gguf()
    except ValueError as e:
        pytest.skip(str(e))
    cfg, params, metadata = gguf_lib.load_gguf(path)
    tok = BPETokenizer.from_gguf_metadata(metadata)
    module = Decoder(cfg)

    def forward_fn(p, t):
        # Full float32 matmuls also on GPUs (whose default for float32 may be TF32).
        with jax.default_matmul_precision("highest"):
            return module.apply({"params": p}, t)

    forward = jax.jit(forward_fn)
    return {"path": path, "cfg": cfg, "params": params, "tok": tok, "forward": forward}


@pytest.fixture(scope="module")
def reference():
    return json.loads(REFERENCE.read_text())


def _batch(seqs, width=64):
    out = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def test_config_matches_smollm2(smollm2):
    cfg = smollm2["cfg"]
    assert (cfg.vocab_size, cfg.embed_dim, cfg.num_layers) == (49152, 576, 30)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim) == (9, 3, 64, 1536)
    assert cfg.rope_theta == 100000.0 and cfg.norm_eps == 1e-5 and cfg.tie_embeddings
    # gin/models/llm/smollm2_135m.gin describes the same model.
    import gin

    from user_llm import gin_utils

    gin_utils.parse_gin(["models/llm/smollm2_135m.gin"], [])
    try:
        model = gin.query_parameter("%MODEL").scoped_configurable_fn()
        assert model.module.config == cfg
        assert model.eos_id == smollm2["tok"].eos_id
    finally:
        gin.clear_config()


def test_prompt_ids_and_logits_match_reference(smollm2, reference):
    cases = reference["cases"]
    for c in cases:
        assert smollm2["tok"].encode(c["prompt"]) == c["ids"], c["prompt"]
    logits = np.asarray(smollm2["forward"](smollm2["params"], _batch([c["ids"] for c in cases])))
    golden = np.load(SHARED_REFERENCE / "smollm2_last_logits.npy")
    diffs = []
    for i, c in enumerate(cases):
        n = len(c["ids"])
        last = logits[i, n - 1]
        diffs.append(float(np.abs(last - golden[i]).max()))
        assert np.argmax(logits[i, :n], -1).tolist() == c["per_position_argmax"]
        np.testing.assert_allclose(logits[i, :n].max(-1), c["per_position_max_logit"], atol=1e-3)
        top10 = np.argsort(-last)[:10]
        assert top10.tolist() == c["last_top10_ids"]
    print(f"max abs last-position logit diff per prompt: {np.round(diffs, 6).tolist()}")
    assert max(diffs) <= 1e-3


def test_greedy_continuations_match_reference(smollm2, reference):
    """32 greedy tokens per prompt, all 8 prompts in one right-padded batch with a KV cache.

    The reference never stops at EOS (two of its continuations pass positions where EOS is the
    argmax, as with Hugging Face's ``min_new_tokens``), so EOS is suppressed here too.
    """
    from user_llm import generate

    cases = reference["cases"]
    eos = smollm2["tok"].eos_id
    with jax.default_matmul_precision("highest"):
        outs = generate.generate_ids(
            smollm2["cfg"],
            smollm2["params"],
            [c["ids"] for c in cases],
            max_decode_length=32,
            eos_id=None,
            suppress_ids=[eos],
        )
    for c, out in zip(cases, outs, strict=True):
        assert out == c["greedy_32_ids"], c["prompt"]
        assert smollm2["tok"].decode(out) == c["greedy_32_text"]


def test_perplexity_matches_reference(smollm2, reference):
    ref = reference["perplexity"]
    ids = smollm2["tok"].encode(ref["text"])
    assert len(ids) == ref["num_tokens"]
    logits = smollm2["forward"](smollm2["params"], jnp.asarray(_batch([ids], width=96)))[0]
    logp = jax.nn.log_softmax(logits[: len(ids) - 1], axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.asarray(ids[1:])[:, None], axis=-1)[:, 0]
    ppl = float(np.exp(np.mean(np.asarray(nll))))
    print(f"perplexity {ppl:.4f} (reference {ref['perplexity']:.4f})")
    assert abs(ppl / ref["perplexity"] - 1) < 0.01


def test_import_and_generate_cli(smollm2, reference, tmp_path):
    from user_llm import checkpoints
    from user_llm.import_checkpoint import import_checkpoint

    out = import_checkpoint(tmp_path / "smollm2", gguf=smollm2["path"])
    flat = checkpoints.read_params(out)
    ours = checkpoints.flatten(smollm2["params"])
    assert set(flat) == set(ours)
    for k in ("token_embedder/embedding", "layers_7/self_attention/query/kernel"):
        np.testing.assert_array_equal(flat[k], ours[k])
    case = reference["cases"][0]
    proc = run_module(
        [
            "-m",
            "user_llm.generate",
            f"--checkpoint={out}",
            f"--prompt={case['prompt']}",
            "--max_decode_length=8",
            "--show_ids",
        ]
    )
    assert f"ids: {case['greedy_32_ids'][:8]}" in proc.stdout
    assert case["greedy_32_text"].startswith(proc.stdout.split("ids:")[0].rstrip("\n"))
