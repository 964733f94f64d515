r"""``DecoderConfig.attention_implementation`` against our attention, on the machine at hand.

  python benchmarks/attention_check.py --implementation=cudnn [--dtype=bfloat16] \
      [--output=results/attention_check_h200.md]

Builds the 100M decoder of ``gin/models/llm/decoder_100m.gin`` (``--llm_gin``) twice, once
with our attention and once with ``--implementation`` (``"cudnn"``: cuDNN's fused attention,
NVIDIA GPUs only; ``"xla"`` runs anywhere), the same parameters in both, and compares on one
random batch of 4 x 512 tokens with padding: the logits of a causal, a padded, a prefix-LM and
a packed pass, and the gradient of the padded pass's loss. Then it times a forward-and-backward
step of each.
``tests/test_attention_implementation.py`` checks the masks to float32 precision on the CPU;
this is the check of the kernel itself, in the dtype it runs in.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from results_file import publish

from user_llm import testing
from user_llm.decoder import Decoder

BATCH, LENGTH = 4, 512


def _relative(a: jax.Array, b: jax.Array, mask: np.ndarray | None = None) -> float:
    """max |a - b| / max |b| over the rows ``mask`` keeps (all by default)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if mask is not None:
        a, b = a[mask], b[mask]
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def measure(
    implementation: str, dtype: str, steps: int, llm_gin: str = "models/llm/decoder_100m.gin"
) -> tuple[list[dict], dict]:
    """(one row per masked pass, {loss and step time of each, largest gradient difference})."""
    base = testing.gin_decoder_config(llm_gin, dtype=dtype)
    ours = Decoder(dataclasses.replace(base, attention_implementation="ours"))
    other = Decoder(dataclasses.replace(base, attention_implementation=implementation))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, base.vocab_size, (BATCH, LENGTH)), jnp.int32)
    lengths = np.array([512, 480, 300, 64])
    valid = np.arange(LENGTH)[None] < lengths[:, None]
    prefix = (np.arange(LENGTH)[None] < (lengths // 2)[:, None]) & valid
    segments = np.where(np.arange(LENGTH)[None] < (lengths // 3)[:, None], 1, 2) * valid
    params = jax.jit(ours.init)(jax.random.PRNGKey(0), tokens)["params"]
    cases = {
        "causal": ({}, None),
        "causal, padded": ({"input_mask": valid}, valid),
        "prefix-LM, padded": ({"input_mask": valid, "prefix_mask": prefix}, valid),
        "packed (2 segments), padded": ({"input_mask": valid, "segment_ids": segments}, valid),
    }
    rows = []
    for name, (kwargs, mask) in cases.items():
        kw = {k: jnp.asarray(v) for k, v in kwargs.items()}
        want = jax.jit(lambda p, kw=kw: ours.apply({"params": p}, tokens, **kw))(params)
        got = jax.jit(lambda p, kw=kw: other.apply({"params": p}, tokens, **kw))(params)
        keep = np.ones((BATCH, LENGTH), bool) if mask is None else mask
        same = np.argmax(np.asarray(got), -1) == np.argmax(np.asarray(want), -1)
        rows.append(
            {
                "case": name,
                "logits_rel_diff": _relative(got, want, keep),
                "argmax_agree": float(same[keep].mean()),
            }
        )

    def loss(module, p):
        logits = module.apply({"params": p}, tokens, input_mask=jnp.asarray(valid))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))[:, :-1]
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(nll * valid[:, 1:]) / valid[:, 1:].sum()

    timing = {}
    grads = {}
    for label, module in (("ours", ours), (implementation, other)):
        step = jax.jit(jax.value_and_grad(lambda p, m=module: loss(m, p)))
        value, grads[label] = step(params)
        jax.block_until_ready(grads[label])
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            jax.block_until_ready(step(params))
            times.append(time.perf_counter() - start)
        timing[label] = {"loss": float(value), "step_ms": 1e3 * float(np.median(times))}
    flat = dict(jax.tree_util.tree_leaves_with_path(grads["ours"]))
    other_grads = jax.tree_util.tree_leaves_with_path(grads[implementation])
    timing["grad_rel_diff_max"] = max(_relative(g, flat[path]) for path, g in other_grads)
    return rows, timing


def report(rows: list[dict], timing: dict, args: argparse.Namespace, command: str) -> str:
    other = args.implementation
    lines = [
        f"# Attention implementation {other!r} against ours ({args.llm_gin}, {args.dtype})",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {jax.devices()[0].device_kind} ({jax.default_backend()}); "
        f"jax {jax.__version__}. One random batch of {BATCH} x {LENGTH} tokens, rows of "
        "512 / 480 / 300 / 64 real tokens; the same parameters for both.",
        "",
        "| pass | max abs logit diff / max abs logit | greedy token agreement |",
        "|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['logits_rel_diff']:.2e} | {r['argmax_agree']:.4f} |")
    ours, theirs = timing["ours"], timing[other]
    lines += [
        "",
        f"Loss of the padded pass: ours {ours['loss']:.5f}, {other} {theirs['loss']:.5f}; "
        f"largest gradient difference (per parameter, relative to its largest entry): "
        f"{timing['grad_rel_diff_max']:.2e}.",
        f"Forward + backward of that loss (median of {args.steps}): ours {ours['step_ms']:.1f} ms, "
        f"{other} {theirs['step_ms']:.1f} ms ({ours['step_ms'] / theirs['step_ms']:.2f}x).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--implementation", default="cudnn", choices=["cudnn", "xla"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--llm_gin", default="models/llm/decoder_100m.gin")
    parser.add_argument("--output", default="")
    args = parser.parse_args()
    rows, timing = measure(args.implementation, args.dtype, args.steps, args.llm_gin)
    command = "python benchmarks/attention_check.py " + " ".join(sys.argv[1:])
    publish(report(rows, timing, args, command.strip()), args.output)


if __name__ == "__main__":
    main()
