"""XLA options the entry points set before the backend starts.

Why: XLA:CPU's default instruction scheduler (concurrency-optimized) runs the rematerialized
forward pass of every decoder layer ahead of the backward pass, so ``remat_policy`` saved
almost no memory on a CPU: 12.4 of 13.0 GiB of working memory for a SmolLM2 text-prompt LoRA
step at 4 x 792 tokens. Under XLA:CPU's memory-optimized scheduler the same step needs 8.4 GiB
without remat and 4.0 GiB with it (User-LLM phase 2: 0.46 instead of 0.83 GiB), at about the
same speed (0.89-1.13x of the default across runs), and the trained parameters are bitwise the
same (``results/remat_tp.md``). Accelerators ignore the option.

XLA reads it from ``XLA_FLAGS`` once, when the backend starts: a per-compile
``compiler_options`` entry is accepted but leaves the schedule unchanged (measured), so it is
set in the environment, where subprocesses (experiment stages) inherit it too.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SCHEDULER_OPTION = "xla_cpu_enable_concurrency_optimized_scheduler"
MEMORY_SCHEDULER = f"--{SCHEDULER_OPTION}=false"
CONCURRENCY_SCHEDULER = f"--{SCHEDULER_OPTION}=true"


def prefer_memory_scheduler(environ: MutableMapping[str, str] = os.environ) -> None:
    """Adds ``MEMORY_SCHEDULER`` to ``XLA_FLAGS`` unless they already choose a scheduler (a
    user's ``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=true`` stays). Takes
    effect only if called before jax starts its backend (the first computation or device
    query)."""
    flags = environ.get("XLA_FLAGS", "")
    if SCHEDULER_OPTION not in flags:
        environ["XLA_FLAGS"] = f"{flags} {MEMORY_SCHEDULER}".strip()
