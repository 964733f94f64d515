r"""The train loop: ``python -m user_llm.train --gin_file=... --gin.MODEL_DIR=\"...\"``.

Read top to bottom, in sections: mesh, model and optimizer, sharded state, checkpoint resume,
input pipeline, update step, eval, loop. ``train()`` is a plain keyword-only function; the
entry point makes it gin-configurable (see ``gin/runs/*.gin`` for the bindings a run sets).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from user_llm import checkpoints, distributed, errors, optimizers, partitioning, strategies
from user_llm.data import pipeline
from user_llm.models import TrainableModel, check_input_features
from user_llm.train_step import make_eval_step, make_train_step

Array = jax.Array


class NonFiniteError(errors.UserLLMError, FloatingPointError):
    """Training produced a NaN or Inf; the message names the step and the last good checkpoint."""


@dataclasses.dataclass(frozen=True)
class InitCheckpoint:
    """Warm start from another checkpoint (used only when MODEL_DIR has none of its own)."""

    path: str
    assignment_map: Sequence[tuple[str, str | None]] = ()
    fallback_to_scratch: bool = False


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    mesh_shape: Sequence[int] = (-1, 1)
    axis_names: Sequence[str] = ("data", "model")
    shard_params_over_data: bool = False


def _global_batch(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict:
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def _agreed_length(length: int) -> int:
    """The longest of every process's batch length: the global batch has one shape."""
    if jax.process_count() == 1:
        return length
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(length))))


def _abstract_init(model, optimizer, input_shapes, input_types, rng):
    """Boxed (logical-axis) abstract train state, for shapes and shardings without compute."""

    def init(rng):
        variables = model.get_initial_variables(rng, input_shapes, input_types)
        params = variables["params"]
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": optimizer.init(params),
        }

    return init, jax.eval_shape(init, rng)


def _write_config(model_dir: Path) -> None:
    """``config.gin`` is this start's config; an earlier start's different one is kept as
    ``config.N.gin`` (N = 1, 2, ...), never overwritten."""
    if jax.process_index() != 0:
        return
    path, text = model_dir / "config.gin", gin.config_str()
    if path.exists() and path.read_text() != text:
        n = 1
        while (model_dir / f"config.{n}.gin").exists():
            n += 1
        path.replace(model_dir / f"config.{n}.gin")
    path.write_text(text)


def _write_data_report(model_dir: Path) -> None:
    """``data_report.json``: what each dataset read of this run read and dropped (duplicates,
    bad rows in lenient mode), so no loss of data is silent."""
    from user_llm.data import readers

    if jax.process_index() == 0 and readers.LOADED:
        (model_dir / "data_report.json").write_text(json.dumps(readers.LOADED, indent=1))


def _log(writer, step: int, metrics: Mapping[str, float], prefix: str) -> None:
    scalars = {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
    writer.write_scalars(step, scalars)
    if distributed.is_main_process():
        text = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
        print(f"step {step}: {text}", flush=True)


def train(
    *,
    model: TrainableModel,
    train_dataset_cfg: pipeline.DatasetConfig,
    model_dir: str,
    num_train_steps: int,
    optimizer: Callable[..., optax.GradientTransformation] = optax.adamw,
    learning_rate: optax.Schedule | float = 1e-3,
    eval_dataset_cfg: pipeline.DatasetConfig | None = None,
    eval_every_steps: int = 0,
    eval_max_batches: int | None = None,
    log_every_steps: int = 10,
    save_every_steps: int = 100,
    keep_checkpoints: int | None = 3,
    async_checkpointing: bool = True,
    accumulation_steps: int = 1,
    strategy: str = "full",
    learning_rate_multipliers: Sequence[tuple[str, float]] = (),
    mesh: MeshConfig = MeshConfig(),
    init_checkpoint: InitCheckpoint | Sequence[InitCheckpoint] | None = None,
    seed: int = 0,
    allow_fresh_start: bool = False,
) -> dict[str, Any]:
    """Trains ``model`` and returns the final train state (params on device).

    Resumes automatically from the latest good checkpoint in ``model_dir``; an
    ``init_checkpoint`` is used only when there is none. ``strategy`` (``full``, ``lora``,
    ``enc``, ``proj``; see ``strategies.py``) picks which parameters train;
    ``learning_rate_multipliers`` ((path regex, factor) pairs) scale some parts' updates.

    Every step is checked for NaN/Inf (inside the compiled step; read one step late so
    dispatch stays asynchronous, and always before a save): the run stops at the first
    non-finite step, never saves it, and names the last good checkpoint. A checkpoint of
    another configuration stops the run and moves nothing; ``allow_fresh_start`` permits
    starting from scratch in a ``model_dir`` that holds quarantined (corrupt) steps.
    """
    from clu import metric_writers  # TensorFlow summaries: kept out of model imports.

    if not isinstance(num_train_steps, int) or num_train_steps < 0:
        raise errors.ConfigError(
            f"TRAIN_STEPS must be a whole number >= 0, got {num_train_steps!r}"
        )
    batch_size = train_dataset_cfg.batch_size
    if not isinstance(batch_size, int) or batch_size < 1:
        raise errors.ConfigError(f"BATCH_SIZE must be a whole number >= 1, got {batch_size!r}")

    model_dir_path = Path(model_dir).expanduser().resolve()  # Orbax needs absolute paths
    model_dir_path.mkdir(parents=True, exist_ok=True)
    _write_config(model_dir_path)
    schedule = learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)
    tx = strategies.masked_optimizer(optimizer(learning_rate=schedule), strategy)
    if any(m != 1.0 for _, m in learning_rate_multipliers):  # e.g. a faster integration
        tx = optax.chain(tx, optimizers.scale_by_path(learning_rate_multipliers))

    # -- Mesh -----------------------------------------------------------------------------
    device_mesh = partitioning.create_mesh(mesh.mesh_shape, mesh.axis_names)
    rules = partitioning.standard_logical_axis_rules(
        mesh.axis_names[0], mesh.axis_names[-1], mesh.shard_params_over_data
    )
    batch_sharding = partitioning.data_sharding(device_mesh, rules)
    data_parallel = device_mesh.shape[mesh.axis_names[0]]
    if batch_size % (data_parallel * accumulation_steps):
        raise errors.ConfigError(
            f"BATCH_SIZE {batch_size} is not divisible by the {data_parallel} data-parallel "
            f"devices x {accumulation_steps} accumulation steps of mesh "
            f"{dict(device_mesh.shape)}; choose a multiple of {data_parallel * accumulation_steps}"
        )

    # -- Input pipeline (its element spec gives the model's input shapes) ----------------------
    train_ds = pipeline.get_dataset(
        train_dataset_cfg, shard_id=jax.process_index(), num_shards=jax.process_count()
    )
    spec = train_ds.element_spec
    check_input_features(
        model, spec, f"the training data {train_dataset_cfg.mixture_or_task_name!r}"
    )
    _write_data_report(model_dir_path)
    micro = train_dataset_cfg.batch_size // accumulation_steps
    input_shapes = {k: (micro,) + tuple(v.shape[1:]) for k, v in spec.items()}
    input_types = {k: v.dtype.as_numpy_dtype for k, v in spec.items()}
    # Throughput: examples for every model, plus (padded) tokens for LMs.
    counts_tokens = "decoder_input_tokens" in input_shapes

    # -- Model, optimizer and sharded state ---------------------------------------------------
    rng = jax.random.PRNGKey(seed)
    init_rng, step_rng = jax.random.split(rng)
    init_fn, abstract_boxed = _abstract_init(model, tx, input_shapes, input_types, init_rng)
    with nn.logical_axis_rules(rules):
        state_shardings = partitioning.logical_shardings(abstract_boxed, device_mesh, rules)
    abstract_state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.unbox(abstract_boxed),
        state_shardings,
    )

    # -- Checkpoint resume (or warm start, or fresh) ------------------------------------------
    ckpt = checkpoints.Checkpointer(
        model_dir_path,
        keep=keep_checkpoints,
        async_save=async_checkpointing,
        allow_fresh_start=allow_fresh_start,
    )
    restored = ckpt.restore_latest(abstract_state)
    if restored is not None:
        state, start_step = restored
        print(f"Resumed from checkpoint step {start_step} in {ckpt.directory}", flush=True)
    else:
        start_step = 0
        state = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=state_shardings)(init_rng)
        if init_checkpoint:
            single = isinstance(init_checkpoint, InitCheckpoint)
            inits = [init_checkpoint] if single else list(init_checkpoint)
            state = _warm_start(state, inits, tx, state_shardings)
    if distributed.is_main_process():
        print(partitioning.describe_state(state, device_mesh), flush=True)
    if int(state["step"]) != start_step:
        raise checkpoints.CheckpointError(
            f"Checkpoint step directory {start_step} holds a state at step {int(state['step'])}"
        )

    # Resuming skips the batches earlier steps consumed: same data as an uninterrupted run.
    train_iter = pipeline.numpy_batches(train_ds.skip(start_step))

    # -- Update step ------------------------------------------------------------------------
    step_fn = make_train_step(
        model,
        tx,
        schedule,
        accumulation_steps,
        use_dropout=getattr(getattr(model.module, "config", None), "dropout_rate", 0.0) > 0,
        strategy=strategy,
    )
    with nn.logical_axis_rules(rules):
        jit_step = jax.jit(
            step_fn,
            in_shardings=(state_shardings, batch_sharding, None),
            out_shardings=(state_shardings, None),
            donate_argnums=(0,),
        )
        jit_eval = jax.jit(
            make_eval_step(model),
            in_shardings=(state_shardings["params"], batch_sharding),
        )
        # Gates, update/residual norms, Perceiver entropy (User-LLM), on each logged batch.
        jit_diagnostics = jax.jit(
            model.diagnostics, in_shardings=(state_shardings["params"], batch_sharding)
        )

    # TensorBoard summaries from process 0; the console line comes from ``_log``.
    if jax.process_index() == 0:
        writer = metric_writers.SummaryWriter(str(model_dir_path / "summaries"))
    else:
        writer = metric_writers.MultiWriter([])

    def run_eval(step: int) -> dict[str, float]:
        ds = pipeline.get_dataset(
            eval_dataset_cfg,
            shard_id=jax.process_index(),
            num_shards=jax.process_count(),
            num_epochs=1,
            drop_remainder=False,
        )
        totals = {"loss_sum": 0.0, "weight": 0.0, "correct_sum": 0.0}
        local_bs = eval_dataset_cfg.batch_size // jax.process_count()
        # Hosts' shards can differ by a batch: all run the same steps, the short ones on
        # zero-weight filler, so every example counts once and no collective waits forever.
        filler = {
            k: np.zeros((local_bs, *v.shape[1:]), v.dtype.as_numpy_dtype)
            for k, v in ds.element_spec.items()
        }
        padded = (pipeline.pad_batch(b, local_bs)[0] for b in pipeline.numpy_batches(ds))
        for i, batch in enumerate(distributed.lockstep(padded, filler)):
            if eval_max_batches is not None and i >= eval_max_batches:
                break
            with nn.logical_axis_rules(rules):
                out = jit_eval(state["params"], _global_batch(batch, batch_sharding))
            for k in totals:
                totals[k] += float(out[k])
        denom = max(totals["weight"], 1.0)
        metrics = {"loss": totals["loss_sum"] / denom, "accuracy": totals["correct_sum"] / denom}
        metrics["num_tokens"] = totals["weight"]  # every target token once, on any topology
        if distributed.is_main_process():
            print(f"eval at step {step}: {int(totals['weight'])} target tokens", flush=True)
        _log(writer, step, metrics, "eval")
        return metrics

    # -- Loop -------------------------------------------------------------------------------
    def ensure_finite(done: int, step_metrics: Mapping[str, Any]) -> None:
        """Stops at the first non-finite step, before anything of it is saved."""
        if bool(step_metrics["finite"]):
            return
        ckpt.wait()  # a finite save still in flight is finished, not lost
        good = ckpt.steps()
        kept = (
            f"the last good checkpoint is step {good[-1]} in {ckpt.directory} (kept; a rerun "
            "resumes from it)"
            if good
            else "no checkpoint had been saved yet"
        )
        dropped = int(step_metrics.get("dropped_loss_tokens", 0))
        cause = (
            f"{dropped} loss-bearing tokens did not fit the model's loss_positions="
            f"{getattr(model, 'loss_positions', None)}: raise it to the targets length"
            if dropped
            else "Lower the learning rate or check the data"
        )
        raise NonFiniteError(
            f"Non-finite training state at step {done} (loss {float(step_metrics['loss']):.4g}, "
            f"gradient norm {float(step_metrics['grad_norm']):.4g}); nothing of this step was "
            f"saved and {kept}. {cause}."
        )

    last_time, last_step = time.time(), start_step
    metrics = None
    # Each step is checked once: at once when it is logged, saved or last, else one step late
    # (while the next step runs), so dispatch stays asynchronous.
    unchecked: tuple[int, Any] | None = None
    tokens_since_log = 0
    for step in range(start_step, num_train_steps):
        batch = next(train_iter)
        if train_dataset_cfg.length_bucket:
            length = pipeline.bucketed_length(batch, train_dataset_cfg.length_bucket)
            batch = pipeline.cut_length(batch, _agreed_length(length))
        if counts_tokens:
            tokens_since_log += batch["decoder_input_tokens"].size * jax.process_count()
        batch = _global_batch(batch, batch_sharding)
        with nn.logical_axis_rules(rules):
            state, metrics = jit_step(state, batch, step_rng)
        done = step + 1
        if unchecked is not None:
            ensure_finite(*unchecked)
        last = done == num_train_steps
        log_now = log_every_steps and (done % log_every_steps == 0 or last)
        save_now = save_every_steps and (done % save_every_steps == 0 or last)
        if log_now or save_now or last:
            ensure_finite(done, metrics)
            unchecked = None
        else:
            unchecked = (done, metrics)
        if log_now:
            with nn.logical_axis_rules(rules):
                diagnostics = jit_diagnostics(state["params"], batch)
            metrics = {**jax.device_get(metrics), **jax.device_get(diagnostics)}
            metrics.pop("finite")
            elapsed = max(time.time() - last_time, 1e-9)
            rate = (done - last_step) / elapsed
            metrics["steps_per_sec"] = rate
            metrics["examples_per_sec"] = rate * train_dataset_cfg.batch_size
            if counts_tokens:  # padded tokens, at each batch's (bucketed) length
                metrics["tokens_per_sec"] = tokens_since_log / elapsed
                tokens_since_log = 0
            remaining = (num_train_steps - done) / max(rate, 1e-9)
            _log(writer, done, metrics, "train")
            if distributed.is_main_process():
                print(f"  {done}/{num_train_steps} steps, ~{remaining:.0f}s left", flush=True)
            last_time, last_step = time.time(), done
        if save_now:
            ckpt.save(done, state)
        if eval_dataset_cfg is not None and eval_every_steps and done % eval_every_steps == 0:
            run_eval(done)
    if eval_dataset_cfg is not None and eval_every_steps and num_train_steps % eval_every_steps:
        run_eval(num_train_steps)
    ckpt.close()
    writer.flush()
    return state


def _warm_start(state, inits: Sequence[InitCheckpoint], tx, state_shardings) -> dict:
    """Loads params from each ``InitCheckpoint`` in turn through its assignment map (a later
    source overrides an earlier one); optimizer state starts fresh.

    User-LLM's phase 2 uses two sources: the LLM (``decoder/...``) and the phase-1 encoder
    (``user_encoder/...``); the integration parameters start from scratch.
    """
    flat = checkpoints.flatten(jax.device_get(state["params"]))
    restored: set[str] = set()
    for init in inits:
        source = checkpoints.read_params(init.path)
        flat, report = checkpoints.apply_assignment_map(
            flat, source, init.assignment_map, init.fallback_to_scratch
        )
        restored.update(report["restored"])
        print(
            f"Warm start from {init.path}: {len(report['restored'])} restored, "
            f"{len(report['from_scratch'])} not from this source, "
            f"{len(report['unused_source'])} unused source parameters",
            flush=True,
        )
    print(f"Warm start: {len(flat) - len(restored)} parameters from scratch", flush=True)
    params = jax.device_put(checkpoints.unflatten(flat), state_shardings["params"])
    opt_state = jax.jit(tx.init, out_shardings=state_shardings["opt_state"])(params)
    return {"step": state["step"], "params": params, "opt_state": opt_state}


# -- Entry point ----------------------------------------------------------------------------


def main(argv: Sequence[str]) -> None:
    # Run as ``python -m user_llm.train`` this file is ``__main__``; gin knows the function
    # by its importable name, so configure the one in ``user_llm.train``.
    from user_llm import gin_utils
    from user_llm import train as train_lib

    # Before anything touches a JAX backend: joins the multi-process job, if there is one.
    distributed.initialize_from_flags()
    if distributed.is_main_process():
        print(f"Processes: {distributed.process_summary()}", flush=True)
    gin_utils.parse_and_run(argv, train_lib.train)


if __name__ == "__main__":
    from user_llm import gin_utils

    gin_utils.run_main(main)
