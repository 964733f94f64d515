"""What the benchmark scripts share: timing a compiled train step the same way everywhere."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np


def timed_steps(compiled: Any, state: Any, batch: Any, rng: Any, steps: int) -> tuple:
    """One warm-up call of a compiled ``(state, batch, rng) -> (state, metrics)`` step, then
    ``steps`` timed calls, each waited for. Returns (state after the warm-up step, final
    state, median seconds per step)."""
    first, m = compiled(state, batch, rng)
    jax.block_until_ready(m)
    times, s = [], first
    for _ in range(steps):
        t = time.perf_counter()
        s, m = compiled(s, batch, rng)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return first, s, float(np.median(times))
