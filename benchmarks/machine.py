"""What the benchmark scripts report about the machine they ran on (standard library only, so
that a reference process in another venv can import it too)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The flags that decide which matmul kernels a CPU can run (float32 width, bfloat16 paths).
CPU_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")


def cpu_info() -> dict:
    """The CPU's model name and which of ``CPU_FLAGS`` it has (Linux; empty elsewhere)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("unknown", "x86_64", ""):
                model = value.strip()
            if key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), **{f: f in flags for f in CPU_FLAGS}}


def describe_cpu(cpu: dict | None = None) -> str:
    """One line: '<model>, flags: avx512f avx2 (no amx_bf16, ...)'."""
    cpu = cpu or cpu_info()
    have = [f for f in CPU_FLAGS if cpu.get(f)]
    missing = [f for f in CPU_FLAGS if not cpu.get(f)]
    text = f"{cpu['model']}, {' '.join(have) or 'none of ' + ', '.join(CPU_FLAGS)}"
    return text + (f" (no {', '.join(missing)})" if have and missing else "")
