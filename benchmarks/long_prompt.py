r"""Long prompts on this CPU, old vs new in one run: prefill and text-prompt (TP) candidate
scoring with dense attention and a KV-cache copy per candidate (old) against blocked attention
and the candidates packed, without padding, into one shared prompt cache (new).

  . .venv/bin/activate
  python -m user_llm.import_checkpoint --gguf=packaged --output_dir=runs/smollm2   # once
  python benchmarks/long_prompt.py --llm_checkpoint=runs/smollm2 \
      [--prefill_lens=512,2048,4096,8192] [--tp_items=50,100,200] [--dense_max_len=4096] \
      [--old_max_items=100] [--runs=2] [--output=results/long_prompt.md]

Prefill: one jitted ``CachedDecoding.prefill`` (the model wrapper's cached path) writing a
batch-1 prompt of random token ids into an empty KV cache, the last position's logits out;
median of ``--runs`` after a compile + warm-up call. TP scoring:
``DecoderOnlyModel.score_and_predict`` on the first test user of
``movielens_next_item_tpchat_h{N}_smollm2`` (its real chat-template prompt of N rated movies,
20 candidate titles, greedy answer of 24 tokens), as ``user_llm.evaluate`` runs it; the old
scorer (below) repeats the prompt's cache once per candidate, as the code did before.
Memory: XLA's own count for the compiled call (``memory_analysis``: temporaries + outputs; the
0.5 GB of weights, the same for all, left out), so configurations are compared without one
process's peak hiding another's.
Old configurations beyond ``--dense_max_len`` / ``--old_max_items`` are skipped (say why in the
table): dense attention at 8,192 tokens needs 2.4 GB of scores per layer and minutes per call.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from results_file import publish

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def _attention(mode: str) -> None:
    """Routes every attention call to the dense (old) or blocked (new) implementation."""
    from user_llm import blocked_attention

    blocked_attention.MIN_BLOCKED_PAIRS = 1 << 62 if mode == "old" else 1024 * 1024


def _timed(fn, args, runs: int) -> tuple[dict, object]:
    """Compile (timed apart), warm up, then the median wall time of ``runs`` calls; returns
    (timings, the last output)."""
    t0 = time.perf_counter()
    compiled = jax.jit(lambda *a: fn(*a)).lower(*args).compile()  # a fresh trace per mode
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    total = mem.temp_size_in_bytes + mem.output_size_in_bytes  # the weights excluded
    out = jax.block_until_ready(compiled(*args))
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        walls.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(walls), "compile_s": compile_s, "bytes": total}, out


def _old_score_and_predict(model, params, batch, candidates, max_decode_length):
    """The scorer before the shared cache: the prompt's KV cache repeated per candidate."""
    from user_llm import decoding

    b, num, cand_len = candidates.shape
    prompts, lengths = model._prompts(batch)
    run = model.cached_decoding(params, batch, prompts.shape[1], max(cand_len, max_decode_length))
    append = run.append
    mask = jnp.arange(prompts.shape[1])[None, :] < lengths[:, None]
    positions = jnp.broadcast_to(jnp.arange(prompts.shape[1]), prompts.shape)
    logits, cache = run.prefill(prompts, mask, positions, run.cache)
    first = logits  # [b, 1, V]: the prefill returns the last prompt position's logits
    flat = candidates.reshape(b * num, cand_len)
    copies = jax.tree_util.tree_map(
        lambda x: jnp.repeat(x, num, axis=0) if getattr(x, "ndim", 0) else x, cache
    )
    cand_pos = jnp.repeat(lengths, num)[:, None] + jnp.arange(cand_len)[None, :]
    cand_logits, _ = append(flat, flat != 0, cand_pos, copies)
    prev = jnp.concatenate([jnp.repeat(first, num, axis=0), cand_logits[:, :-1]], axis=1)
    logp = jax.nn.log_softmax(prev, axis=-1)
    token_logp = jnp.take_along_axis(logp, flat[..., None], axis=-1)[..., 0]
    scores = jnp.sum(token_logp * (flat != 0), axis=-1).reshape(b, num)
    tokens, _ = decoding.decode(
        append,
        prompts,
        lengths,
        cache,
        max_decode_length=max_decode_length,
        eos_id=model.eos_id,
        prefill_fn=lambda *_: (logits, cache),
    )
    return scores, tokens


def prefill_rows(cfg, params, lens, dense_max_len, runs) -> list[dict]:
    from user_llm.decoder import Decoder
    from user_llm.models import DecoderOnlyModel

    model = DecoderOnlyModel(Decoder(cfg), causal_prompt=True)

    def prefill(params, tokens):
        mask = jnp.ones(tokens.shape, bool)
        batch = {"decoder_input_tokens": tokens, "decoder_causal_attention": mask}
        run = model.cached_decoding(params, batch, tokens.shape[1], 0)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        logits, cache = run.prefill(tokens, mask, positions, run.cache)
        return logits[:, -1], cache

    rows = []
    for length in lens:
        tokens = jax.random.randint(jax.random.PRNGKey(length), (1, length), 10, cfg.vocab_size)
        row = {"tokens": length}
        for mode in ("old", "new"):
            if mode == "old" and length > dense_max_len:
                row[mode] = None
                continue
            _attention(mode)
            row[mode], _ = _timed(prefill, (params, tokens), runs)
            print(f"prefill {length} {mode}: {row[mode]}", flush=True)
        rows.append(row)
    return rows


def tp_rows(model, params, items_list, old_max_items, runs) -> list[dict]:
    import seqio

    from user_llm import evaluate
    from user_llm.models import packed_candidate_width

    rows = []
    for items in items_list:
        task = f"movielens_next_item_tpchat_h{items}_smollm2"
        lengths = {"inputs": 40 * items + 160, "targets": 24}
        examples = evaluate.load_examples(task, lengths, "test", 1)
        vocab = seqio.get_mixture_or_task(task).output_features["targets"].vocabulary
        scorer = evaluate._LLMScorer(model, params, task, 24, vocab)
        batch, _ = next(evaluate.batches(examples, 1))
        answers = jnp.asarray(scorer.answer_tokens(batch))
        model_batch = evaluate.model_batch(batch)
        prompt = int(np.sum(batch["decoder_causal_attention"]))
        row = {"items": items, "prompt_tokens": prompt, "padded": lengths["inputs"]}
        out = {}
        for mode in ("old", "new"):
            if mode == "old" and items > old_max_items:
                row[mode] = None
                continue
            _attention(mode)
            if mode == "old":
                fn = _old_score_and_predict
            else:  # as user_llm.evaluate calls it: candidates packed, padding dropped
                width = packed_candidate_width(np.asarray(answers))
                fn = functools.partial(type(model).score_and_predict, packed_width=width)
            row[mode], out[mode] = _timed(
                lambda p, b, c, f=fn: f(model, p, b, c, 24), (params, model_batch, answers), runs
            )
            print(f"tp {items} {mode}: {row[mode]}", flush=True)
        if "old" in out and "new" in out:  # the same answers both ways
            row["max_score_diff"] = float(jnp.max(jnp.abs(out["old"][0] - out["new"][0])))
            row["same_tokens"] = bool(jnp.all(out["old"][1] == out["new"][1]))
        rows.append(row)
    return rows


def _fmt(r: dict | None, what: str) -> str:
    if r is None:
        return "skipped"
    if what == "bytes":
        return f"{r['bytes'] / 2**30:.2f} GiB"
    return f"{r['seconds']:.1f} s"


def _table_head(title: str, columns: str) -> list[str]:
    """A section title and the head of its markdown table (``columns``: comma-separated)."""
    names = [c.strip() for c in columns.split(", ")]
    return ["", f"## {title}", "", f"| {' | '.join(names)} |", "|" + "---|" * len(names)]


def report(prefill: list[dict], tp: list[dict], command: str, args) -> str:
    lines = [
        "# Long prompts: blocked attention and a shared candidate cache (old vs new, one run)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {jax.local_device_count()} XLA CPU device, "
        f"{len(__import__('os').sched_getaffinity(0))} visible cores; jax {jax.__version__}; "
        f"SmolLM2-135M float32; median of {args.runs} runs after compile + warm-up; memory = "
        "XLA's count for the compiled call (temporaries + outputs, without the weights).",
        "",
        "Old: dense attention (full [heads, L, L] float32 scores), the prompt's KV cache "
        "copied once per candidate. New: blocked attention (256 x 256 tiles, online softmax, "
        "all-masked tiles skipped) above 1M query-key pairs; candidates packed end to end "
        "(padding dropped) as segments of one shared cache.",
        *_table_head(
            "Prefill (batch 1, random token ids)",
            "tokens, old s, new s, old tokens/s, new tokens/s, speed-up, old memory, new memory",
        ),
    ]
    for r in prefill:
        old, new = r["old"], r["new"]
        rate = lambda x, n=r["tokens"]: f"{n / x['seconds']:.0f}" if x else "-"  # noqa: E731
        speed = f"{old['seconds'] / new['seconds']:.2f}x" if old else "-"
        lines.append(
            f"| {r['tokens']} | {_fmt(old, 's')} | {_fmt(new, 's')} | {rate(old)} | {rate(new)}"
            f" | {speed} | {_fmt(old, 'bytes')} | {_fmt(new, 'bytes')} |"
        )
    lines += _table_head(
        "TP next-item scoring, one user (20 candidates + a 24-token greedy answer)",
        "history items, prompt tokens (padded), old s/user, new s/user, speed-up, old memory, "
        "new memory, max score diff, same greedy tokens",
    )
    for r in tp:
        old, new = r["old"], r["new"]
        speed = f"{old['seconds'] / new['seconds']:.2f}x" if old else "-"
        lines.append(
            f"| {r['items']} | {r['prompt_tokens']} ({r['padded']}) | {_fmt(old, 's')} | "
            f"{_fmt(new, 's')} | {speed} | {_fmt(old, 'bytes')} | {_fmt(new, 'bytes')} | "
            f"{r.get('max_score_diff', '-')} | {r.get('same_tokens', '-')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llm_checkpoint", default="runs/smollm2")
    parser.add_argument("--prefill_lens", default="512,2048,4096,8192")
    parser.add_argument("--tp_items", default="50,100,200")
    parser.add_argument("--dense_max_len", type=int, default=4096)
    parser.add_argument("--old_max_items", type=int, default=100)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--output", default="")
    args = parser.parse_args()

    import tasks.smollm2  # noqa: F401
    from user_llm import checkpoints, gin_utils

    bindings = [
        f'LLM_CHECKPOINT="{args.llm_checkpoint}"',
        f'MODEL_DIR="{args.llm_checkpoint}"',
        "LORA_RANK=0",
        'MIXTURE_OR_TASK_NAME="movielens_tpchat_h50_smollm2"',
    ]
    gin_utils.parse_gin(
        ["experiments/tp_smollm2.gin", "datasets/movielens.gin"],
        bindings,
        list(gin_utils.DEFAULT_SEARCH_PATHS),
    )
    model = gin_utils.query_values("train_lib.train", ("model",))["model"]
    params = checkpoints.unflatten(checkpoints.read_params(args.llm_checkpoint))
    lens = [int(x) for x in args.prefill_lens.split(",") if x]
    items = [int(x) for x in args.tp_items.split(",") if x]
    prefill = prefill_rows(model.module.config, params, lens, args.dense_max_len, args.runs)
    tp = tp_rows(model, params, items, args.old_max_items, args.runs)
    text = report(prefill, tp, "python " + " ".join(sys.argv), args)
    publish(text, args.output)


if __name__ == "__main__":
    main()
