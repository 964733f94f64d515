r"""Can XLA:CPU run bfloat16 faster than float32 on this CPU? Matmul rates under each option.

  . .venv/bin/activate
  python benchmarks/bf16_matmul.py [--sizes=1024,2048] [--runs=5] \
      [--ref_python=/tmp/refvenv/bin/python] [--output=results/bf16_cpu.md]

Why: a frozen LLM in bfloat16 would halve its weight traffic, and CPUs with AMX (Intel
Sapphire Rapids and later) or AVX512-BF16 multiply bfloat16 several times faster than float32.
Whether that helps here depends on XLA:CPU reaching those units. This script answers it for the
machine it runs on, in one run:

- the CPU's model and its bfloat16-relevant flags (``amx_bf16``, ``amx_tile``,
  ``avx512_bf16``, ``avx512f``, ``avx2``), read from ``/proc/cpuinfo``;
- for each XLA:CPU option below, in a fresh subprocess (``XLA_FLAGS`` is read once, when jax
  starts): a jitted ``n x n @ n x n`` in float32, in bfloat16, and in bfloat16 with a float32
  accumulator (``preferred_element_type``), warmed up once, then the median of ``--runs``;
  each result is checked against the exact product of its own inputs (relative error), so a
  fast wrong kernel cannot pass as a gain;
- with ``--ref_python`` (a venv with torch, as ``benchmarks/llm_inference.py`` sets up), the
  same products in torch (oneDNN), the rate the hardware gives a library that does reach it.

An option XLA does not know aborts its subprocess; the table says so instead of a rate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from machine import CPU_FLAGS, cpu_info
from results_file import publish

# Each: (name, XLA_FLAGS added). All exist in jaxlib 0.10.2's flag table.
VARIANTS = (
    ("default", ""),
    ("oneDNN", "--xla_cpu_use_onednn=true"),
    ("oneDNN custom call", "--xla_cpu_experimental_onednn_custom_call=true"),
    ("XNNPACK", "--xla_cpu_use_xnnpack=true"),
    ("fast math", "--xla_cpu_enable_fast_math=true"),
    ("legacy runtime", "--xla_cpu_use_thunk_runtime=false"),
)


def measure_jax(sizes: list[int], runs: int) -> dict:
    """GFLOP/s of jitted matmuls in float32 / bfloat16 / bfloat16 with float32 accumulation."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    out = {"jax": jax.__version__}
    for n in sizes:
        rng = np.random.default_rng(0)
        a32 = jnp.asarray(rng.normal(size=(n, n)), jnp.float32)
        b32 = jnp.asarray(rng.normal(size=(n, n)), jnp.float32)
        a16, b16 = a32.astype(jnp.bfloat16), b32.astype(jnp.bfloat16)
        cases = {
            "float32": (jax.jit(jnp.dot), a32, b32),
            "bfloat16": (jax.jit(jnp.dot), a16, b16),
            "bfloat16, float32 acc.": (
                jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)),
                a16,
                b16,
            ),
        }
        for name, (fn, a, b) in cases.items():
            # The exact product of the inputs as given (bf16 inputs already rounded): the error
            # is the kernel's own (accumulation, output rounding), not the inputs' rounding.
            reference = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
            result = fn(a, b).block_until_ready()  # compile + warm up
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                fn(a, b).block_until_ready()
                times.append(time.perf_counter() - t)
            err = np.abs(np.asarray(result, np.float32) - reference).max() / np.abs(reference).max()
            out[f"{name} @ {n}"] = {
                "gflops": 2 * n**3 / float(np.median(times)) / 1e9,
                "max_rel_err": float(err),
            }
    return out


def measure_torch(sizes: list[int], runs: int) -> dict:
    """The same products in torch (its oneDNN / MKL kernels), all cores."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    out = {"torch": torch.__version__}
    for n in sizes:
        g = torch.Generator().manual_seed(0)
        a32, b32 = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        for name, (a, b) in {
            "float32": (a32, b32),
            "bfloat16": (a32.bfloat16(), b32.bfloat16()),
        }.items():
            with torch.inference_mode():
                torch.mm(a, b)
                times = []
                for _ in range(runs):
                    t = time.perf_counter()
                    torch.mm(a, b)
                    times.append(time.perf_counter() - t)
            times.sort()
            out[f"{name} @ {n}"] = {"gflops": 2 * n**3 / times[len(times) // 2] / 1e9}
    return out


def _child(role: str, flags: str, sizes: list[int], runs: int, python: str) -> dict:
    env = dict(os.environ)
    if role == "jax":
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    cmd = [python, __file__, f"--role={role}", f"--sizes={','.join(map(str, sizes))}"]
    proc = subprocess.run([*cmd, f"--runs={runs}"], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        return {"error": (lines[-1] if lines else f"exit {proc.returncode}")[:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table_row(name: str, row: dict, head: list[str], n: int) -> str:
    if "error" in row:
        return f"| {name} | " + " | ".join("-" for _ in head) + f" | {row['error']} |"
    cells = [f"{row[h]['gflops']:.1f}" if h in row else "-" for h in head]
    ratio = row[f"bfloat16 @ {n}"]["gflops"] / row[f"float32 @ {n}"]["gflops"]
    return f"| {name} | " + " | ".join(cells) + f" | {ratio:.2f}x at {n} |"


def report(cpu: dict, rows: dict, torch_row: dict | None, sizes: list[int], cmd: str) -> str:
    """The markdown table: one row per option, GFLOP/s per dtype and size, bf16/fp32 ratios."""
    cases = ("float32", "bfloat16", "bfloat16, float32 acc.")
    head = [f"{c} @ {n}" for n in sizes for c in cases]
    has = ", ".join(f"{f} {'yes' if cpu[f] else 'no'}" for f in CPU_FLAGS)
    lines = [
        f"CPU: {cpu['model']}, {cpu['cores']} cores; {has}.",
        f"Command: `{cmd}`",
        "",
        "| XLA:CPU option | " + " | ".join(f"{h} (GFLOP/s)" for h in head) + " | bf16 / fp32 |",
        "|---" * (len(head) + 2) + "|",
    ]
    lines += [_table_row(name, row, head, sizes[-1]) for name, row in rows.items()]
    if torch_row is not None:
        name = f"torch {torch_row.get('torch', '')}".strip()
        lines.append(_table_row(name, torch_row, head, sizes[-1]))
    errs = [
        row[h]["max_rel_err"]
        for row in rows.values()
        if "error" not in row
        for h in head
        if h.startswith("bfloat16")
    ]
    if errs:
        lines += [
            "",
            f"Largest bfloat16 error relative to the exact product of its inputs: {max(errs):.1e}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1024,2048")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ref_python", default="", help="A python with torch, for its rates.")
    parser.add_argument("--output", default="")
    parser.add_argument("--role", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.role:
        measure = measure_jax if args.role == "jax" else measure_torch
        print(json.dumps(measure(sizes, args.runs)))
        return
    cpu = cpu_info()
    rows = {}
    for name, flags in VARIANTS:
        rows[name] = _child("jax", flags, sizes, args.runs, sys.executable)
        print(name, json.dumps(rows[name]), flush=True)
    torch_row = _child("torch", "", sizes, args.runs, args.ref_python) if args.ref_python else None
    cmd = "python benchmarks/bf16_matmul.py " + " ".join(sys.argv[1:])
    text = report(cpu, rows, torch_row, sizes, cmd.strip())
    publish(text, args.output)


if __name__ == "__main__":
    main()
