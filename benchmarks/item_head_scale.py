"""Does User-LLM's item head start and end at the encoder head's scale? (issue 11 diagnostic)

For a trained MovieLens h50 User-LLM run with an item head, on the first N test users of
``movielens_next_item_userllm_h50_smollm2``, prints: the RMS of the LLM's final hidden state at
the answer position, of the encoder's last state and of the item head's output (trained, and
with a fresh kernel); the logits' spread; the full-catalogue cross entropy of the encoder head
(on its last state and on the mean of its states), of the trained item head and of a fresh one;
and the cosine between the item head's output and the encoder's last state.

  python benchmarks/item_head_scale.py runs/exp/movielens/<run dir> 64
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import tasks.movielens  # noqa: F401  (registers the task)
from user_llm import checkpoints, evaluate, gin_utils
from user_llm import user_encoder as ue
from user_llm.layers import kernel_init
from user_llm.models import user_features

TASK = "movielens_next_item_userllm_h50_smollm2"
ITEMS = "user_item_ids"


def rms(x) -> float:
    return float(jnp.sqrt(jnp.mean(jnp.square(x))))


def cross_entropy(logits, target: np.ndarray) -> float:
    """Mean full-catalogue cross entropy over in-vocabulary targets (ids 0-1 are reserved)."""
    scores = np.asarray(logits, np.float64)
    scores[:, :2] = -np.inf
    top = scores.max(1)
    lse = np.log(np.sum(np.exp(scores - top[:, None]), 1)) + top
    ok = target >= 2
    return float(np.mean((lse - scores[np.arange(len(target)), target])[ok]))


def main(run_dir: str, n: int) -> None:
    gin_utils.parse_gin([f"{run_dir}/config.gin"], [], [])
    model = gin_utils.query_values("train_lib.train", ("model",))["model"]
    params = {"params": checkpoints.unflatten(checkpoints.read_params(run_dir))}
    ex = evaluate.load_examples(TASK, {"inputs": 16, "targets": 24}, "test", n)
    label = np.asarray(ex["candidate_label"]).reshape(-1)
    target = np.asarray(ex["candidate_item_ids"])[np.arange(len(label)), label]
    batch = {k: jnp.asarray(v) for k, v in ex.items() if not k.startswith("candidate")}
    users = user_features(batch)
    answer = jnp.argmax(batch["decoder_loss_weights"] > 0, axis=1)[:, None]
    hidden = model._forward(params["params"], batch, None, True, answer, return_hidden=True)[:, 0]

    def encoder_states(m, f):
        states = m.user_encoder(f)
        mask = f["user_mask"][..., None].astype(states.dtype)
        mean = jnp.sum(states * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1.0)
        return ue.last_position(states, f["user_mask"]), mean

    def scores(m, q):
        return m.user_encoder.feature_logits(q, ITEMS)

    apply = model.module.apply
    last, mean = apply(params, users, method=encoder_states)
    item_out = apply(params, hidden, method=lambda m, h: m.item_head(h))
    fresh_out = hidden @ kernel_init()(jax.random.PRNGKey(0), (hidden.shape[-1], last.shape[-1]))
    logits = {
        "encoder head (last state)": apply(params, last, method=scores),
        "encoder head (mean state)": apply(params, mean, method=scores),
        "item head (trained)": apply(params, item_out, method=scores),
        "item head (fresh kernel)": apply(params, fresh_out, method=scores),
    }
    num_items = logits["item head (trained)"].shape[-1] - 2
    print(f"n={len(target)}; LLM final hidden RMS {rms(hidden):.2f}")
    print(
        f"RMS: encoder last state {rms(last):.3f}, item head output {rms(item_out):.3f}, "
        f"fresh item head output {rms(fresh_out):.3f}"
    )
    for name, value in logits.items():
        print(
            f"{name}: logit std {float(jnp.std(value)):.2f}, "
            f"full-catalogue cross entropy {cross_entropy(value, target):.2f}"
        )
    print(f"uniform cross entropy {np.log(num_items):.2f}")
    cos = jnp.sum(item_out * last, -1) / (
        jnp.linalg.norm(item_out, axis=-1) * jnp.linalg.norm(last, axis=-1)
    )
    print(f"cosine(item head output, encoder last state): mean {float(jnp.mean(cos)):.3f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 64)
