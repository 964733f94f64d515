"""The jitted update and eval steps, free of TensorFlow, gin and the input pipeline, so that
benchmarks and accelerator checks can compile exactly what ``user_llm.train`` runs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from user_llm import strategies
from user_llm.models import TrainableModel

Array = jax.Array


def _split_microbatches(batch: Mapping[str, Array], num: int) -> dict[str, Array]:
    def split(x):
        if x.shape[0] % num:
            raise ValueError(f"batch of {x.shape[0]} not divisible into {num} microbatches")
        return x.reshape((num, x.shape[0] // num) + x.shape[1:])

    return {k: split(v) for k, v in batch.items()}


def make_train_step(
    model: TrainableModel,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    accumulation_steps: int,
    use_dropout: bool,
    strategy: str | strategies.Table = "full",
    check_finite: bool = True,
    differentiate: str = "trainable",
) -> Callable[[dict, dict, Array], tuple[dict, dict]]:
    """One optimizer update from one global batch, split into ``accumulation_steps`` pieces.

    Losses and gradients are summed over microbatches and divided by the total target-token
    weight once, so accumulation gives the same update as one big batch. Parameters that the
    ``strategy`` freezes pass through the step untouched (``optimizer`` must be built with
    ``strategies.masked_optimizer`` for the same strategy).

    ``check_finite`` adds ``finite`` to the metrics (loss, gradient norm and update norm are
    finite), which the train loop reads every step; off only to measure its cost.

    ``differentiate``: ``"trainable"`` (default) takes gradients of the trained parameters
    only; ``"all"`` differentiates every parameter and drops the frozen ones' gradients
    afterwards: the same update at a higher cost, kept to measure and test against.
    """
    if differentiate not in ("trainable", "all"):
        raise ValueError(f"differentiate must be 'trainable' or 'all', not {differentiate!r}")

    def grad_terms(params, microbatch, rng):
        """Loss terms and the gradients of the leaves ``differentiate`` selects, in
        ``tree_leaves`` order. Frozen leaves enter as constants: no weight gradient is formed
        for them, and no backward pass runs below the lowest layer that a trained leaf feeds."""
        leaves, treedef = jax.tree_util.tree_flatten(params)
        wanted = _differentiated(params, strategy, differentiate)

        def summed(chosen):
            it = iter(chosen)
            full = [next(it) if w else leaf for leaf, w in zip(leaves, wanted, strict=True)]
            p = jax.tree_util.tree_unflatten(treedef, full)
            loss, weight, metrics = model.loss_terms(p, microbatch, rng if use_dropout else None)
            return loss, (weight, metrics)

        chosen = [leaf for leaf, w in zip(leaves, wanted, strict=True) if w]
        (loss, (weight, metrics)), grads = jax.value_and_grad(summed, has_aux=True)(chosen)
        return loss, weight, metrics, grads

    def train_step(state, batch, rng):
        params = state["params"]
        rng = jax.random.fold_in(rng, state["step"])
        micro = _split_microbatches(batch, accumulation_steps)

        def body(carry, xs):
            i, mb = xs
            loss, weight, metrics, grads = grad_terms(params, mb, jax.random.fold_in(rng, i))
            acc = jax.tree_util.tree_map(jnp.add, carry, (loss, weight, metrics, grads))
            return acc, None

        zeros = jax.tree_util.tree_map(
            jnp.zeros_like,
            jax.eval_shape(grad_terms, params, jax.tree_util.tree_map(lambda x: x[0], micro), rng),
        )
        (loss, weight, metrics, chosen_grads), _ = jax.lax.scan(
            body, zeros, (jnp.arange(accumulation_steps), micro)
        )
        denom = jnp.maximum(weight, 1.0)
        chosen_grads = [g / denom for g in chosen_grads]
        leaves, treedef = jax.tree_util.tree_flatten(params)
        trained = jax.tree_util.tree_leaves(strategies.trainable_mask(params, strategy))
        wanted = _differentiated(params, strategy, differentiate)
        # Frozen leaves get zero gradients that nothing reads (the masked optimizer discards
        # them, the updates of frozen leaves are dropped below), so XLA never forms them.
        it = iter(chosen_grads)
        grad_leaves = [
            next(it) if w else jnp.zeros_like(x) for x, w in zip(leaves, wanted, strict=True)
        ]
        grads = jax.tree_util.tree_unflatten(treedef, grad_leaves)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        mask = jax.tree_util.tree_unflatten(treedef, trained)
        new_params = strategies.apply_updates(params, updates, mask)
        trained_grads = [g for g, t in zip(grad_leaves, trained, strict=True) if t]
        trained_updates = [
            u for u, t in zip(jax.tree_util.tree_leaves(updates), trained, strict=True) if t
        ]
        grad_norm = optax.global_norm(trained_grads)
        out = {
            "loss": loss / denom,
            "cross_entropy": metrics["cross_entropy_sum"] / denom,
            "accuracy": metrics["correct_sum"] / denom,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state["step"]),
            "num_tokens": weight,
        }
        if "dropped_loss_tokens_sum" in metrics:  # a model's loss_positions too small: NaN loss
            out["dropped_loss_tokens"] = metrics["dropped_loss_tokens_sum"]
        if "item_examples_sum" in metrics:  # User-LLM's item head: per example, not per token
            items = jnp.maximum(metrics["item_examples_sum"], 1.0)
            out["item_cross_entropy"] = metrics["item_cross_entropy_sum"] / items
            out["item_accuracy"] = metrics["item_correct_sum"] / items
            if "item_distill_kl_sum" in metrics:
                out["item_distill_kl"] = metrics["item_distill_kl_sum"] / items
        if check_finite:  # read by the loop after every step: a non-finite state is never saved
            update_norm = optax.global_norm(trained_updates)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
            out["finite"] = finite
        out.update(gate_gradients(grads))
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
        return new_state, out

    return train_step


def _differentiated(params: Any, strategy: str | strategies.Table, which: str) -> list[bool]:
    """Per leaf (``tree_leaves`` order): whether the step takes its gradient."""
    if which == "all":
        return [True] * len(jax.tree_util.tree_leaves(params))
    return jax.tree_util.tree_leaves(strategies.trainable_mask(params, strategy))


def gate_gradients(grads: Any) -> dict[str, Array]:
    """``gate_grad/layer_NN``: the loss gradient reaching each cross-attention gate (User-LLM).
    Logged per step, its sign shows whether the gate is pushed one way or just jitters."""
    out = {}
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        name = strategies.path_name(path)
        if name.endswith("/context_block/gate") and name.startswith("decoder/layers_"):
            out[f"gate_grad/layer_{int(name.split('/')[1][7:]):02d}"] = g
    return out


def make_eval_step(model: TrainableModel) -> Callable[[Any, dict], dict]:
    def eval_step(params, batch):
        loss, weight, metrics = model.loss_terms(params, batch, None)
        return {"loss_sum": loss, "weight": weight, "correct_sum": metrics["correct_sum"]}

    return eval_step
