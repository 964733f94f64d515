r"""Is User-LLM's item head short of the encoder head for want of fitting, or of information?

  python -m user_llm.item_head_refit --gin_file=runs/user_llm/config.gin \
      --task=movielens_next_item_userllm_h50_smollm2 [--train_examples=4096] \
      [--test_examples=256] [--distill_weight=1.0] [--learning_curve] [--mlp_hidden=512] \
      [--states_cache=/tmp/states.npz] [--output=results/refit.json]

Phase 2 trains the item head (a 576 -> 64 linear map from the LLM's answer-position state into
the encoder's item space) jointly with the cross-attention blocks, for a few hundred noisy
steps. This entry point freezes everything the run trained, computes the answer-position
states of the task's train examples once, and refits the head alone to convergence on them
(full-batch Adam from the trained head; the full-catalogue cross entropy, plus the encoder
head's distribution with ``--distill_weight``; the step kept is the one with the lowest cross
entropy on the last tenth of the train examples, other users). Then, on the first test
examples and their candidates, it scores

- the trained head (what ``user_llm.evaluate`` reports as ``item_head_*``),
- the refitted head, with real and shuffled users (the control of ``evaluate``),
- the AR encoder's own head on the same examples,

and gives paired bootstrap intervals of the differences. If the refitted head reaches the
encoder head, the states hold what the encoder knows and the head was underfit; if it does
not, the blocks do not put the encoder's knowledge into the LLM's state, and no head on that
state can recover it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from user_llm import evaluate
from user_llm.models import distillation_kl, user_features
from user_llm.user_encoder import pool_states

FLAGS = flags.FLAGS
Params = Any


def _define_flags() -> None:
    """Flags of the entry point only, so importing this module defines none."""
    flags.DEFINE_string("task", "", "A registered User-LLM next-item task.")
    flags.DEFINE_string("checkpoint_dir", "", "Parameters (default: the run's MODEL_DIR).")
    flags.DEFINE_integer("train_examples", 4096, "First N train examples to refit on.")
    flags.DEFINE_integer("test_examples", 256, "First N test examples to score.")
    flags.DEFINE_integer("refit_steps", 400, "Full-batch Adam steps of the refit.")
    flags.DEFINE_float("learning_rate", 3e-3, "Adam learning rate of the refit.")
    flags.DEFINE_float("distill_weight", 0.0, "Weight of the encoder head's distribution.")
    flags.DEFINE_integer("batch_size", 16, "Examples per LLM forward pass.")
    flags.DEFINE_bool("learning_curve", False, "Also refit on 1/4 and 1/2 of the train rows.")
    flags.DEFINE_integer("mlp_hidden", 0, "Also refit a head with a residual MLP this wide.")
    flags.DEFINE_string("states_cache", "", "Optional .npz keeping the LLM states between runs.")
    flags.DEFINE_string("output", "", "Optional JSON file for the results.")


def _batched(fn, params: Params, examples: Mapping[str, np.ndarray], batch_size: int, pick):
    """Jitted ``fn(params, pick(batch))`` over the examples, concatenated (padding dropped)."""
    jitted = jax.jit(fn)
    out = []
    for batch, n in evaluate.batches(examples, batch_size):
        out.append(np.asarray(jitted(params, pick(batch)))[:n])
    return np.concatenate(out)


def answer_states(model: Any, params: Params, examples: Mapping[str, np.ndarray], batch_size: int):
    """[n, D] the LLM's final state at each example's answer position (``answer_states``)."""
    return _batched(model.answer_states, params, examples, batch_size, evaluate.model_batch)


def teacher_scores(model: Any, params: Params, examples: Mapping[str, np.ndarray], batch_size: int):
    """[n, V] the AR encoder head's next-item scores with history items at ``-inf``: the
    distillation target, as phase 2 uses it."""
    return _batched(
        lambda p, u: model.module.apply({"params": p}, u, method="encoder_item_scores"),
        params,
        examples,
        batch_size,
        user_features,
    )


def encoder_head_scores(
    model: Any, params: Params, examples: Mapping[str, np.ndarray], batch_size: int
):
    """[n, V] the AR encoder head's raw next-item scores, as ``user_llm.evaluate`` ranks with
    the encoder on its own (``score_next_items``: no item masked, as the item head's are not)."""

    def scores(module, features):
        encoder = module.user_encoder
        hidden = encoder(features, True)
        last = pool_states(hidden, features[encoder.config.mask_feature], "last")
        return encoder.feature_logits(last, module.integration.item_feature)

    return _batched(
        lambda p, u: model.module.apply({"params": p}, u, method=scores),
        params,
        examples,
        batch_size,
        user_features,
    )


def next_item_ids(examples: Mapping[str, np.ndarray]) -> np.ndarray:
    """[n] the encoder vocabulary id of each example's next item (its labelled candidate)."""
    rows = np.arange(len(examples["candidate_label"]))
    return examples["candidate_item_ids"][rows, examples["candidate_label"]].astype(np.int32)


def refit_logits(model: Any, params: Params, head: Params, states: jax.Array) -> jax.Array:
    """[n, V] item scores of ``states`` through a refit ``head``: {"item_head": the linear
    head's params, optionally "residual_mlp": a residual MLP applied to the state first}."""
    if "residual_mlp" in head:
        states = states + residual_mlp(head["residual_mlp"], states)
    variables = {"params": {**params, "item_head": head["item_head"]}}
    return model.module.apply(variables, states, method="item_logits").astype(jnp.float32)


def head_scores(model: Any, params: Params, head: Params, states: np.ndarray) -> np.ndarray:
    """[n, V] item scores of ``states`` through ``head`` (``refit_logits``) in place of the
    trained item head."""
    return np.asarray(refit_logits(model, params, head, jnp.asarray(states)))


def init_residual_mlp(states: np.ndarray, hidden: int, seed: int = 0) -> Params:
    """A residual MLP ``s + gelu(z(s) W1 + b1) W2`` on states [n, D], with ``z`` the states
    standardised by their own mean and scale (fixed) and ``W2 = 0``: it starts as the identity,
    so a refit with it starts from the linear head's scores and can only add a non-linear
    reading of the same state."""
    d = states.shape[1]
    rng = np.random.default_rng(seed)
    return {
        "mean": jnp.asarray(states.mean(0)),
        "scale": jnp.asarray(states.std(0) + 1e-6),
        "w1": jnp.asarray(rng.normal(size=(d, hidden)) / np.sqrt(d), jnp.float32),
        "b1": jnp.zeros((hidden,), jnp.float32),
        "w2": jnp.zeros((hidden, d), jnp.float32),
    }


def residual_mlp(mlp: Params, states: jax.Array) -> jax.Array:
    """The residual MLP's update to ``states`` (its standardisation is not trained)."""
    z = (states - jax.lax.stop_gradient(mlp["mean"])) / jax.lax.stop_gradient(mlp["scale"])
    return jax.nn.gelu(z @ mlp["w1"] + mlp["b1"]) @ mlp["w2"]


def fit_item_head(
    model: Any,
    params: Params,
    states: np.ndarray,
    targets: np.ndarray,
    holdout: np.ndarray,
    teacher: np.ndarray | None = None,
    distill_weight: float = 0.0,
    steps: int = 400,
    learning_rate: float = 3e-3,
    mlp_hidden: int = 0,
    train_rows: np.ndarray | None = None,
    from_scratch: bool = False,
) -> tuple[Params, dict[str, float]]:
    """The item head refitted on ``states`` (full-batch Adam from the trained head), at the
    step with the lowest mean cross entropy on the ``holdout`` rows (a boolean mask); the
    rest train, or only ``train_rows`` of them (a boolean mask: a learning curve). With
    ``mlp_hidden`` > 0, a residual MLP on the state (``init_residual_mlp``) is fitted with it.
    ``from_scratch`` starts the linear head at zero instead (uniform scores), so that what it
    ends at depends only on the rows it is fitted on. Returns the head ({"item_head"[,
    "residual_mlp"]}, as ``head_scores`` takes it) and {train / held-out cross entropy at that
    step and at step 0, the step, the curve every 100 steps}."""
    held = holdout
    fit = ~holdout if train_rows is None else train_rows & ~holdout
    if not fit.any() or not held.any():
        raise ValueError("fit_item_head needs both train and held-out rows")
    x = jnp.asarray(states)
    y = jnp.asarray(targets)
    t = None if teacher is None else jnp.asarray(teacher)

    def logits(head):
        return refit_logits(model, params, head, x)

    def nll(z):
        return jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, y[:, None], -1)[:, 0]

    def loss(head):
        z = logits(head)
        per = nll(z)
        train = jnp.sum(jnp.where(fit, per, 0.0)) / fit.sum()
        total = train
        if t is not None and distill_weight:
            total = total + distill_weight * distillation_kl(t, z, jnp.asarray(fit)) / fit.sum()
        return total, (train, jnp.sum(jnp.where(held, per, 0.0)) / held.sum())

    tx = optax.adam(learning_rate)

    @jax.jit
    def step(head, state):
        (_, aux), grads = jax.value_and_grad(loss, has_aux=True)(head)
        updates, state = tx.update(grads, state, head)
        return optax.apply_updates(head, updates), state, aux

    start_from = jnp.zeros_like if from_scratch else jnp.asarray
    head = {"item_head": jax.tree_util.tree_map(start_from, params["item_head"])}
    if mlp_hidden:
        head["residual_mlp"] = init_residual_mlp(states[fit], mlp_hidden)
    state = tx.init(head)
    best: tuple[float, Params, dict[str, float]] | None = None
    curve = []  # [step, train cross entropy, held-out cross entropy] every 100 steps
    for i in range(steps + 1):  # the last update is only taken to score the head before it
        new_head, state, (train_ce, held_ce) = step(head, state)
        if i == 0:
            start = {"train_ce_start": float(train_ce), "heldout_ce_start": float(held_ce)}
        if best is None or float(held_ce) < best[0]:
            report = {"train_ce": float(train_ce), "heldout_ce": float(held_ce), "step": i}
            best = (float(held_ce), head, report)
        if i % 100 == 0:
            curve.append([i, round(float(train_ce), 4), round(float(held_ce), 4)])
        head = new_head
    return best[1], {**best[2], **start, "curve": curve}


def params_fingerprint(params: Params) -> str:
    """A short SHA-256 of every parameter's path, shape and bytes: which weights made a cache."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        leaf = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)} {leaf.shape} {leaf.dtype}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()[:16]


def cached_states(
    path: str,
    examples: Mapping[str, Mapping[str, np.ndarray]],
    compute: Callable[[Mapping[str, np.ndarray]], np.ndarray],
    fingerprint: str,
) -> dict[str, np.ndarray]:
    """{name: compute(examples[name])}, kept in the .npz at ``path`` (none: no cache).

    The file records ``fingerprint`` (task and weights) and each set's example count; a cache
    made for other weights, another task or other example counts is refused with an error that
    names it, never read as if it were this run's states."""
    if not path:
        return {name: compute(ex) for name, ex in examples.items()}
    counts = {name: len(ex["candidate_label"]) for name, ex in examples.items()}
    meta = json.dumps({"fingerprint": fingerprint, "counts": counts}, sort_keys=True)
    file = Path(path)
    if file.exists():
        try:
            with np.load(file) as data:
                stored = {k: data[k] for k in data.files}
            found = str(stored.pop("meta"))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"states cache {file} is not readable ({e}); remove it") from e
        if found != meta:
            raise ValueError(
                f"states cache {file} was made for other weights, task or example counts "
                f"({found}, here {meta}); remove it or name another file"
            )
        return stored
    states = {name: compute(ex) for name, ex in examples.items()}
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_name(file.name + ".partial.npz")
    np.savez(partial, meta=np.asarray(meta), **states)
    partial.replace(file)  # whole or absent: an interrupted write leaves no half cache
    return states


def tail_holdout(n: int, fraction: float = 0.1) -> np.ndarray:
    """A boolean mask of the last ``fraction`` of ``n`` examples: the split lists each user's
    examples together, so these are (all but one) whole users the refit never sees."""
    return np.arange(n) >= int(round(n * (1 - fraction)))


def refit(
    model: Any,
    params: Params,
    task: str,
    feature_lengths: Mapping[str, int],
    *,
    train_examples: int = 4096,
    test_examples: int = 256,
    steps: int = 400,
    learning_rate: float = 3e-3,
    distill_weight: float = 0.0,
    batch_size: int = 16,
    learning_curve: bool = False,
    mlp_hidden: int = 0,
    states_cache: str = "",
    log=print,
) -> dict[str, Any]:
    """The comparison of the module docstring, as a JSON-able dict (percent metrics).

    ``learning_curve`` adds linear heads fitted from zero on the first quarter, half and all of
    the train rows (does a head on these states want more examples?); ``mlp_hidden`` adds a
    head with a residual MLP of that width (is there signal in the state a linear head cannot
    read?). Each extra head is compared with the AR encoder head on the same test users.
    ``states_cache`` (an .npz path) keeps the LLM states between calls (``cached_states``)."""
    train = evaluate.load_examples(task, feature_lengths, "train", train_examples)
    test = evaluate.load_examples(task, feature_lengths, "test", test_examples)
    shuffled = evaluate.with_control(test, "shuffled_user")
    log(f"states of {len(train['candidate_label'])} train examples (one LLM forward each)")
    cached = cached_states(
        states_cache,
        {"train": train, "test": test, "shuffled": shuffled},
        lambda ex: answer_states(model, params, ex, batch_size),
        fingerprint=f"{task} {params_fingerprint(params)}",
    )
    states, test_states = cached["train"], cached["test"]
    teacher = teacher_scores(model, params, train, batch_size) if distill_weight else None
    holdout = tail_holdout(len(states))
    targets = next_item_ids(train)
    order = np.cumsum(~holdout)  # 1.. over the train rows, in example order
    variants = {"refitted head": {}}
    if learning_curve:
        for name, part in (("quarter", 4), ("half", 2), ("all", 1)):
            rows = order <= (~holdout).sum() // part
            variants[f"head from zero, {name} of train"] = {
                "train_rows": rows,
                "from_scratch": True,
            }
    if mlp_hidden:
        variants[f"refitted head + residual MLP ({mlp_hidden})"] = {"mlp_hidden": mlp_hidden}
    heads, fits = {}, {}
    for name, options in variants.items():
        heads[name], fits[name] = fit_item_head(
            model,
            params,
            states,
            targets,
            holdout,
            teacher,
            distill_weight,
            steps,
            learning_rate,
            **options,
        )
        log(f"{name}: { {k: v for k, v in fits[name].items() if k != 'curve'} }")
    head = heads["refitted head"]
    systems = {
        "trained head": head_scores(model, params, {"item_head": params["item_head"]}, test_states),
        **{name: head_scores(model, params, h, test_states) for name, h in heads.items()},
        "refitted head, shuffled user": head_scores(model, params, head, cached["shuffled"]),
        "AR encoder head": encoder_head_scores(model, params, test, batch_size),
    }
    per = {k: evaluate.item_ranking_metrics(v, test) for k, v in systems.items()}
    out: dict[str, Any] = {
        "task": task,
        "num_train": int((~holdout).sum()),
        "num_heldout": int(holdout.sum()),
        "num_test": len(test["candidate_label"]),
        "refit": fits.pop("refitted head"),
        "other_refits": fits,
        "systems": {k: evaluate.summarize(v) for k, v in per.items()},
    }
    refitted = per["refitted head"]
    out["paired_diff"] = {
        f"refitted head minus {other}": evaluate.paired_differences(refitted, per[other])
        for other in ("trained head", "refitted head, shuffled user", "AR encoder head")
    }
    for name in fits:
        out["paired_diff"][f"{name} minus AR encoder head"] = evaluate.paired_differences(
            per[name], per["AR encoder head"]
        )
    return out


def main(argv: Sequence[str]) -> None:
    from user_llm import trained_run

    del argv
    if not FLAGS.task:
        raise ValueError("--task is empty: name a registered User-LLM next-item task")
    run = trained_run.load(FLAGS.checkpoint_dir)
    if not getattr(run.model, "has_item_head", False):
        raise ValueError("the run's model has no item head (models/integration/item_head.gin)")
    result = refit(
        run.model,
        run.params,
        FLAGS.task,
        run.feature_lengths,
        train_examples=FLAGS.train_examples,
        test_examples=FLAGS.test_examples,
        steps=FLAGS.refit_steps,
        learning_rate=FLAGS.learning_rate,
        distill_weight=FLAGS.distill_weight,
        batch_size=FLAGS.batch_size,
        learning_curve=FLAGS.learning_curve,
        mlp_hidden=FLAGS.mlp_hidden,
        states_cache=FLAGS.states_cache,
    )
    here = Path.cwd()
    checkpoint = Path(run.checkpoint).resolve()
    # Relative where it can be, so a results file names no machine's paths.
    result["checkpoint"] = str(
        checkpoint.relative_to(here) if checkpoint.is_relative_to(here) else checkpoint
    )
    print(json.dumps(result))
    if FLAGS.output:
        Path(FLAGS.output).parent.mkdir(parents=True, exist_ok=True)
        Path(FLAGS.output).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    from user_llm import gin_utils

    _define_flags()
    gin_utils.run_main(main)
