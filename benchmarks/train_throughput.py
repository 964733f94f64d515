r"""Train-step throughput and achieved FLOP/s against this machine's measured matmul peak.

  python benchmarks/train_throughput.py [--configs=small,100m] [--steps=5] \
      [--dtype=bfloat16] [--batch_scale=8] [--attention=ours|xla|cudnn] \
      [--remat=none|full|minimal] [--output=results/train_throughput.md]

For each config: compile the real train step (``user_llm.train.make_train_step``: forward,
backward, AdamW update) on a synthetic batch, read its FLOPs from XLA's cost analysis, time
``--steps`` steps, and report tokens/s and achieved FLOP/s as a fraction of the dense-matmul
peak measured in the same run (the best of several float32 ``jnp.dot`` timings). The goal for
the dense train step is at least 40% of that peak.

Two FLOP counts are reported: XLA's cost analysis of the compiled step, and the usual model
estimate 6 * parameters * tokens (forward + backward, attention excluded). They differ: XLA
counts what it compiles (on GPU it misses work inside library calls such as cuBLAS GEMMs),
6ND counts the matmul work the model needs. Read the fraction of peak with that in mind.

``--attention`` sets ``DecoderConfig.attention_implementation``: ``cudnn`` (or ``xla``) runs the
decoder's self-attention through ``jax.nn.dot_product_attention`` with that implementation
(cuDNN's fused flash attention on an NVIDIA GPU). The names ``jax_xla`` / ``jax_cudnn`` of the
commands in ``results/train_throughput.md`` mean the same (there they swapped the function in
the benchmark's process, before the model had the option). The initial loss column shows each
computes the same function.
``--remat`` sets ``DecoderConfig.remat_policy``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import timing
from results_file import publish

from user_llm import optimizers, testing
from user_llm.decoder import Decoder
from user_llm.models import DecoderOnlyModel
from user_llm.train_step import make_train_step

# name: (the decoder, batch, length). "100m" is the model gin/models/llm/decoder_100m.gin trains;
# "small" shrinks it to run in seconds.
CONFIGS = {
    "small": (
        "models/llm/decoder_100m.gin",
        dict(
            vocab_size=8192, embed_dim=256, num_layers=4, num_heads=4, num_kv_heads=4, mlp_dim=1024
        ),
        8,
        256,
    ),
    "100m": ("models/llm/decoder_100m.gin", {}, 4, 512),
}


def matmul_peak(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """Best dense matmul FLOP/s over ``repeats`` timings of an n x n x n product."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def measure(
    name: str,
    steps: int,
    dtype: str = "float32",
    batch_scale: int = 1,
    check_finite: bool = True,
    remat: str = "none",
    attention: str = "ours",
) -> dict:
    gin_file, overrides, batch, length = CONFIGS[name]
    batch *= batch_scale
    cfg = testing.gin_decoder_config(
        gin_file,
        **overrides,
        dtype=dtype,
        remat_policy=remat,
        attention_implementation=attention.removeprefix("jax_"),
    )
    model = DecoderOnlyModel(Decoder(cfg))
    rng = jax.random.PRNGKey(0)
    params = nn.unbox(model.get_initial_variables(rng, {"decoder_input_tokens": (batch, length)}))[
        "params"
    ]
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    schedule = optimizers.constant_schedule(1e-4)
    tx = optimizers.adamw(schedule)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    tokens = jax.random.randint(rng, (batch, length), 1, cfg.vocab_size)
    data = {
        "decoder_input_tokens": tokens,
        "decoder_target_tokens": jnp.roll(tokens, -1, axis=1),
        "decoder_loss_weights": jnp.ones_like(tokens),
    }
    initial_loss = float(jax.jit(model.loss_fn)(params, data, None)[0])
    step = jax.jit(
        make_train_step(model, tx, schedule, 1, False, check_finite=check_finite),
        donate_argnums=(0,),
    )
    t0 = time.perf_counter()
    compiled = step.lower(state, data, rng).compile()
    compile_s = time.perf_counter() - t0
    flops = _flops(compiled)
    _, state, step_s = timing.timed_steps(compiled, state, data, rng, steps)
    return {
        "config": name if check_finite else f"{name}, no NaN check",
        "params_millions": n_params / 1e6,
        "batch": batch,
        "length": length,
        "compile_s": compile_s,
        "step_s_median": step_s,
        "tokens_per_s": batch * length / step_s,
        "step_gflop": flops / 1e9,
        "achieved_gflops": flops / step_s / 1e9,
        "model_gflop_6nd": 6 * n_params * batch * length / 1e9,
        "initial_loss": initial_loss,
        "attention_implementation": cfg.attention_implementation,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="small,100m")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--output", default="")
    parser.add_argument("--dtype", default="float32", help="activation dtype (params stay f32)")
    parser.add_argument("--peak_n", type=int, default=2048, help="matmul size for the peak")
    parser.add_argument("--batch_scale", type=int, default=1, help="multiplies the batch sizes")
    parser.add_argument(
        "--attention",
        default="ours",
        choices=("ours", "xla", "cudnn", "jax_xla", "jax_cudnn"),
        help="DecoderConfig.attention_implementation (jax_*: the same, older names)",
    )
    parser.add_argument("--remat", default="none", help="DecoderConfig.remat_policy")
    parser.add_argument(
        "--compare_nan_check",
        action="store_true",
        help="also time each config without the per-step finiteness check (its cost)",
    )
    args = parser.parse_args()

    peak = matmul_peak(args.peak_n, dtype=args.dtype)
    rows = []
    checks = (True, False) if args.compare_nan_check else (True,)
    for name in args.configs.split(","):
        for check in checks:
            row = measure(
                name, args.steps, args.dtype, args.batch_scale, check, args.remat, args.attention
            )
            row.update(attention=args.attention, remat=args.remat)
            row["fraction_of_peak"] = row["achieved_gflops"] * 1e9 / peak
            row["fraction_of_peak_6nd"] = row["model_gflop_6nd"] * 1e9 / row["step_s_median"] / peak
            rows.append(row)
            print(json.dumps(row), flush=True)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}"
    )
    lines = [
        "# Train-step throughput",
        "",
        f"Command: `python benchmarks/train_throughput.py --configs={args.configs} "
        f"--steps={args.steps} --dtype={args.dtype} --peak_n={args.peak_n} "
        f"--batch_scale={args.batch_scale} --attention={args.attention} --remat={args.remat}"
        + (" --compare_nan_check`" if args.compare_nan_check else "`"),
        f"Machine: {machine}. Measured {args.dtype} matmul peak ({args.peak_n}^3, best of 10): "
        f"{peak / 1e9:.1f} GFLOP/s.",
        "",
        "| config | params (M) | batch x length | step (s, median) | tokens/s | GFLOP/step (XLA) "
        "| achieved GFLOP/s (XLA) | fraction of peak (XLA) | fraction of peak (6ND) "
        "| initial loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['params_millions']:.1f} | {r['batch']} x {r['length']} | "
            f"{r['step_s_median']:.3f} | {r['tokens_per_s']:.0f} | {r['step_gflop']:.1f} | "
            f"{r['achieved_gflops']:.1f} | {r['fraction_of_peak']:.0%} | "
            f"{r['fraction_of_peak_6nd']:.0%} | {r['initial_loss']:.4f} |"
        )
    text = "\n".join(lines) + "\n"
    publish(text, args.output, rows)


if __name__ == "__main__":
    main()
