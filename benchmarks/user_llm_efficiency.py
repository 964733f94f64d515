r"""Inference cost of User-LLM versus a text prompt (TP), per example, in one run.

  python benchmarks/user_llm_efficiency.py [--llm=100m|smollm2_135m] \
      [--history_lengths=50,100,200,500] [--tokens_per_item=20] [--repeats=3] \
      [--output=results/user_llm_efficiency.md] [--plot=results/user_llm_efficiency.png]

For each history length L it compiles three forward passes over one example and reads their
FLOPs from XLA's cost analysis, then times them:
- TP: the decoder reads an instruction plus the history serialized as text
  (``L * tokens_per_item`` tokens; 20 is about what a MovieLens item line costs in BPE tokens:
  title, year, rating and genres);
- User-LLM (cross-attention): encoder over L interactions, projection, decoder over the
  instruction with gated cross-attention every 4th layer reading L embeddings;
- User-LLM + Perceiver: the same with a 16-latent Perceiver between encoder and decoder.
Weights are random: cost depends on shapes only. The paper reports up to 78.1x less compute.
``--plot`` draws the cost and the ratios against history length; ``--output`` embeds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from results_file import publish

from user_llm import testing
from user_llm.decoder import Decoder
from user_llm.integration import IntegrationConfig, UserLLM
from user_llm.perceiver import PerceiverConfig
from user_llm.user_encoder import UserEncoderConfig

LLMS = {"100m": "models/llm/decoder_100m.gin", "smollm2_135m": "models/llm/smollm2_135m.gin"}
ENCODER = UserEncoderConfig(
    categorical_features={"user_item_ids": 10000, "user_ratings": 12, "user_time_buckets": 40},
    multivalued_features={"user_genres": 24},
    embed_dim=256,
    feature_embed_dim=64,
    num_layers=4,
    num_heads=4,
    head_dim=64,
    mlp_dim=1024,
)
INSTRUCTION_TOKENS = 32
PAPER_RATIO = 78.1


def _cost_and_time(fn, args, repeats: int) -> tuple[float, float]:
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return float(cost.get("flops", 0.0)), float(np.median(times))


def user_features(length: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    return {
        "user_item_ids": jnp.asarray(rng.integers(2, 10000, (1, length)), jnp.int32),
        "user_ratings": jnp.asarray(rng.integers(2, 12, (1, length)), jnp.int32),
        "user_time_buckets": jnp.asarray(rng.integers(2, 40, (1, length)), jnp.int32),
        "user_genres": jnp.asarray(rng.integers(0, 24, (1, length, 4)), jnp.int32),
        "user_mask": jnp.ones((1, length), bool),
    }


def measure(llm: str, length: int, tokens_per_item: int, repeats: int) -> dict:
    base = testing.gin_decoder_config(LLMS[llm])
    rng = jax.random.PRNGKey(0)
    instruction = jnp.ones((1, INSTRUCTION_TOKENS), jnp.int32)

    # Text prompt: the decoder reads the whole history as tokens.
    tp_tokens = jnp.ones((1, INSTRUCTION_TOKENS + length * tokens_per_item), jnp.int32)
    decoder = Decoder(base)
    dec_params = nn.unbox(decoder.init(rng, instruction))["params"]
    tp_flops, tp_s = _cost_and_time(
        lambda p, t: decoder.apply({"params": p}, t)[:, -1], (dec_params, tp_tokens), repeats
    )

    row = {
        "history_length": length,
        "tp_tokens": int(tp_tokens.shape[1]),
        "tp_gflop": tp_flops / 1e9,
        "tp_ms": tp_s * 1e3,
    }
    every = 4
    xattn = tuple(i for i in range(base.num_layers) if (i + 1) % every == 0)
    for name, integ in (
        ("userllm", IntegrationConfig()),
        (
            "userllm_perceiver",
            IntegrationConfig(
                use_perceiver=True,
                perceiver=PerceiverConfig(
                    num_latents=16, num_layers=2, num_heads=4, head_dim=64, mlp_dim=1024
                ),
            ),
        ),
    ):
        module = UserLLM(dataclasses.replace(base, cross_attention_layers=xattn), ENCODER, integ)
        feats = user_features(length)
        params = nn.unbox(module.init(rng, instruction, user_features=feats))["params"]
        flops, secs = _cost_and_time(
            lambda p, t, f, m=module: m.apply({"params": p}, t, user_features=f)[:, -1],
            (params, instruction, feats),
            repeats,
        )
        row[f"{name}_gflop"] = flops / 1e9
        row[f"{name}_ms"] = secs * 1e3
        row[f"{name}_flop_ratio"] = tp_flops / flops
        row[f"{name}_latency_ratio"] = tp_s / secs
    return row


def plot(rows: list[dict], path: str, title: str) -> None:
    """Draw cost and TP/User-LLM ratios vs history length, so the trend is seen at a glance.

    Left: GFLOPs per example (log scale: TP grows quadratically, User-LLM barely moves).
    Right: FLOP and latency ratios next to the paper's 78.1x, to see where we cross it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["history_length"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label in (
        ("tp", "TP"),
        ("userllm", "User-LLM"),
        ("userllm_perceiver", "User-LLM + Perceiver"),
    ):
        left.plot(x, [r[f"{key}_gflop"] for r in rows], "o-", label=label)
    left.set(
        yscale="log",
        xlabel="history length (items)",
        ylabel="GFLOPs per example",
        title="(a) compute per example",
    )
    for key, label, color in (
        ("userllm", "User-LLM", "C1"),
        ("userllm_perceiver", "User-LLM + Perceiver", "C2"),
    ):
        right.plot(
            x, [r[f"{key}_flop_ratio"] for r in rows], "o-", color=color, label=f"FLOPs, {label}"
        )
        right.plot(
            x,
            [r[f"{key}_latency_ratio"] for r in rows],
            "s:",
            color=color,
            label=f"latency, {label}",
        )
    right.axhline(PAPER_RATIO, color="gray", linestyle="--", label=f"paper: {PAPER_RATIO}x")
    right.set(
        yscale="log",
        xlabel="history length (items)",
        ylabel="TP / User-LLM",
        title="(b) TP / User-LLM ratio",
    )
    for ax in (left, right):
        ax.set_xticks(x)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llm", default="100m", choices=sorted(LLMS))
    parser.add_argument("--history_lengths", default="50,100,200,500")
    parser.add_argument("--tokens_per_item", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="")
    parser.add_argument("--plot", default="", help="PNG path for the cost/ratio figure")
    args = parser.parse_args()

    rows = []
    for length in [int(x) for x in args.history_lengths.split(",")]:
        row = measure(args.llm, length, args.tokens_per_item, args.repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} on "
        f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})"
    )
    command = (
        f"python benchmarks/user_llm_efficiency.py --llm={args.llm} "
        f"--history_lengths={args.history_lengths} --tokens_per_item={args.tokens_per_item} "
        f"--repeats={args.repeats}"
    )
    command += f" --output={args.output}" if args.output else ""
    command += f" --plot={args.plot}" if args.plot else ""
    lines = [
        f"# User-LLM vs text prompt: inference cost per example ({args.llm} decoder)",
        "",
        f"Command: `{command}`",
        f"Machine: {machine}. One example, forward pass over the prompt (no generation), "
        f"float32, median of {args.repeats} timings after one warm-up. FLOPs: XLA cost analysis.",
        "",
        "| history | TP tokens | TP GFLOP | TP ms | User-LLM GFLOP | ms | FLOP ratio | latency "
        "ratio | +Perceiver GFLOP | ms | FLOP ratio | latency ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['history_length']} | {r['tp_tokens']} | {r['tp_gflop']:.1f} | {r['tp_ms']:.0f} "
            f"| {r['userllm_gflop']:.2f} | {r['userllm_ms']:.0f} | {r['userllm_flop_ratio']:.1f}x "
            f"| {r['userllm_latency_ratio']:.1f}x | {r['userllm_perceiver_gflop']:.2f} "
            f"| {r['userllm_perceiver_ms']:.0f} | {r['userllm_perceiver_flop_ratio']:.1f}x "
            f"| {r['userllm_perceiver_latency_ratio']:.1f}x |"
        )
    best = max(max(r["userllm_flop_ratio"], r["userllm_perceiver_flop_ratio"]) for r in rows)
    summary = f"Largest FLOP ratio measured: {best:.1f}x (the paper reports up to {PAPER_RATIO}x)."
    lines += ["", summary]
    if args.plot:
        plot(rows, args.plot, f"User-LLM vs text prompt, {args.llm} decoder; {machine}")
        md_dir = Path(args.output).resolve().parent if args.output else Path.cwd()
        image = os.path.relpath(Path(args.plot).resolve(), md_dir)
        lines += ["", f"![GFLOPs and TP/User-LLM ratios vs history length]({image})"]
    text = "\n".join(lines) + "\n"
    publish(text, args.output)


if __name__ == "__main__":
    main()
