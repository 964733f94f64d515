r"""SmolLM2-135M prefill on this CPU in float32 against bfloat16 activations, in one process.

  python benchmarks/bf16_prefill.py [--prompt_len=2048] [--runs=3] [--output=FILE.md]

Three ways, the same weights (the packaged GGUF, float32 parameters), the same random prompt,
the last position's logits (what decoding and ranking read), one compile + one warm-up each,
then the best of ``--runs``:

- ``float32``: the decoder as configured by the importer;
- ``bfloat16``: ``DecoderConfig.dtype = "bfloat16"`` as built: every dense layer is a
  bfloat16 x bfloat16 -> bfloat16 dot;
- ``bfloat16, float32 accumulation``: the same, but the dense layers and the output logits
  accumulate in float32 (``preferred_element_type=float32``) and cast back to bfloat16. The
  model has no option for this; this process routes ``user_llm.layers``' einsums through it
  (``_accumulate_in_float32``). Why: ``benchmarks/bf16_matmul.py`` finds that XLA:CPU runs
  bfloat16 dots on AVX512-BF16 units only when they accumulate into float32.

Reports tokens/s, the speed-up over float32, and how far each bfloat16 way's last-position
logits are from float32's (largest absolute difference, KL divergence, same argmax).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from machine import describe_cpu
from results_file import publish

from user_llm import decoder, layers
from user_llm.convert import gguf as gguf_lib
from user_llm.decoder import Decoder
from user_llm.import_checkpoint import packaged_gguf

WAYS = (
    ("float32", "float32", False),
    ("bfloat16", "bfloat16", False),
    ("bfloat16, float32 accumulation", "bfloat16", True),
)


@contextlib.contextmanager
def _accumulate_in_float32():
    """``user_llm.layers`` sees a ``jnp`` whose ``einsum`` of two low-precision operands
    accumulates in float32 and returns the operands' dtype (traced while it is active)."""

    def einsum(spec, *operands, **kwargs):
        dtypes = {x.dtype for x in operands}
        if dtypes <= {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)} and len(dtypes) == 1:
            out = jnp.einsum(spec, *operands, preferred_element_type=jnp.float32, **kwargs)
            return out.astype(dtypes.pop())
        return jnp.einsum(spec, *operands, **kwargs)

    proxy = types.SimpleNamespace(**{k: getattr(jnp, k) for k in dir(jnp) if k[:2] != "__"})
    proxy.einsum = einsum
    original, layers.jnp = layers.jnp, proxy
    try:
        yield
    finally:
        layers.jnp = original


def measure(prompt_len: int, runs: int) -> list[dict]:
    cfg32, params, _ = gguf_lib.load_gguf(packaged_gguf())
    tokens = jax.random.randint(jax.random.PRNGKey(0), (1, prompt_len), 1, cfg32.vocab_size)
    index = jnp.full((1, 1), prompt_len - 1)
    rows, reference = [], None
    for name, dtype, accumulate in WAYS:
        cfg = dataclasses.replace(cfg32, dtype=dtype)
        module = Decoder(cfg)

        def prefill(params, tokens, module=module):
            return decoder.prefill(module, params, tokens, index)[0]

        with _accumulate_in_float32() if accumulate else contextlib.nullcontext():
            compiled = jax.jit(prefill).lower(params, tokens).compile()
        logits = np.asarray(compiled(params, tokens), np.float32)[0, 0]  # warm-up
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            jax.block_until_ready(compiled(params, tokens))
            times.append(time.perf_counter() - t)
        row = {"way": name, "seconds": min(times), "tokens_per_s": prompt_len / min(times)}
        if reference is None:
            reference = logits
        else:
            p, q = jax.nn.log_softmax(reference), jax.nn.log_softmax(logits)
            row.update(
                max_abs_logit_diff=float(np.max(np.abs(logits - reference))),
                kl=float(jnp.sum(jnp.exp(p) * (p - q))),
                same_argmax=bool(logits.argmax() == reference.argmax()),
            )
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    return rows


def report(rows: list[dict], prompt_len: int, runs: int, cmd: str) -> str:
    base = rows[0]["seconds"]
    lines = [
        f"Command: `{cmd}`",
        f"Machine: {platform.machine()}, CPU: {describe_cpu()}; jax {jax.__version__}.",
        f"Prefill of a {prompt_len}-token prompt, batch 1, last logits; best of {runs}.",
        "",
        "| way | s | tokens/s | vs float32 | max abs logit diff | KL(f32 ‖ way) | same argmax |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = (
            f"{r['max_abs_logit_diff']:.3f} | {r['kl']:.1e} | {r['same_argmax']}"
            if "kl" in r
            else "- | - | -"
        )
        lines.append(
            f"| {r['way']} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | "
            f"{base / r['seconds']:.2f}x | {diff} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt_len", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--output", default="")
    args = parser.parse_args()
    rows = measure(args.prompt_len, args.runs)
    cmd = "python benchmarks/bf16_prefill.py " + " ".join(sys.argv[1:])
    text = report(rows, args.prompt_len, args.runs, cmd.strip())
    publish(text, args.output)


if __name__ == "__main__":
    main()
