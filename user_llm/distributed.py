"""Multi-process set-up on JAX's distributed runtime: one process per host (or per GPU).

The same gin files run from one CPU to a pod; only the process set-up differs, and it comes
from (first match wins):

1. flags ``--coordinator_address``, ``--num_processes``, ``--process_id`` (or the arguments of
   ``initialize``), else the environment ``USER_LLM_COORDINATOR``, ``USER_LLM_NUM_PROCESSES``,
   ``USER_LLM_PROCESS_ID`` (``launch/local_multiprocess.py`` sets these);
2. SLURM (``SLURM_JOB_ID`` with ``SLURM_NTASKS`` > 1): coordinator on the first node of
   ``SLURM_STEP_NODELIST``, one device per task when several tasks share a node;
3. ``USER_LLM_DISTRIBUTED=auto`` or a Cloud TPU VM environment: ``jax.distributed.initialize()``
   with no arguments, which asks the TPU metadata server for the workers;
4. otherwise a single process, and nothing is initialized.

``initialize`` must run before anything touches a JAX backend (it raises otherwise), so the
train entry point calls it first thing in ``main``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import flags, logging


def define_flags() -> None:
    """The process flags (``gin_utils.run_main`` defines them for every entry point, so that
    importing this module defines none); a second call does nothing."""
    if "coordinator_address" in flags.FLAGS:
        return
    flags.DEFINE_string(
        "coordinator_address", None, "host:port of process 0 (multi-process runs); env fallback."
    )
    flags.DEFINE_integer("num_processes", None, "Number of processes in the job; env fallback.")
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")


ENV_COORDINATOR = "USER_LLM_COORDINATOR"
ENV_NUM_PROCESSES = "USER_LLM_NUM_PROCESSES"
ENV_PROCESS_ID = "USER_LLM_PROCESS_ID"
ENV_AUTO = "USER_LLM_DISTRIBUTED"  # "auto": let JAX detect the cluster (TPU VMs)
ENV_PORT = "USER_LLM_COORDINATOR_PORT"  # port for the SLURM coordinator (default: from job id)
# Set by the Cloud TPU VM runtime; any of them means "let JAX ask the metadata server".
_TPU_ENV_MARKERS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_ID")


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    """How this process joins the job; ``source`` says where the values came from."""

    source: str  # "single" | "explicit" | "slurm" | "auto"
    coordinator_address: str | None = None
    num_processes: int | None = 1
    process_id: int | None = 0
    local_device_ids: tuple[int, ...] | None = None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``node[003-005,9],gpu1`` -> ``node003``."""
    match = re.match(r"([^,\[]*)(\[([^\]]*)\])?", nodelist.strip())
    if not match or not match.group(1) and not match.group(3):
        raise ValueError(f"Cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(3)
    return prefix if ranges is None else prefix + re.split(r"[,-]", ranges)[0]


def _int(value: str | int | None) -> int | None:
    return None if value is None or value == "" else int(value)


def detect(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    env: Mapping[str, str] | None = None,
) -> ProcessSpec:
    """Works out the process set-up without initializing anything (see the module docstring)."""
    env = os.environ if env is None else env
    ids = None if local_device_ids is None else tuple(local_device_ids)
    coordinator = coordinator_address or env.get(ENV_COORDINATOR) or None
    count = _int(num_processes if num_processes is not None else env.get(ENV_NUM_PROCESSES))
    index = _int(process_id if process_id is not None else env.get(ENV_PROCESS_ID))
    if count is not None:
        if count == 1:
            return ProcessSpec("single", local_device_ids=ids)
        if coordinator is None or index is None:
            raise ValueError(
                f"{count} processes need a coordinator address and a process id "
                f"(--coordinator_address/--process_id or {ENV_COORDINATOR}/{ENV_PROCESS_ID})"
            )
        if not 0 <= index < count:
            raise ValueError(f"process_id {index} is outside [0, {count})")
        return ProcessSpec("explicit", coordinator, count, index, ids)
    if coordinator is not None:
        raise ValueError(f"A coordinator address ({coordinator}) needs num_processes as well")

    if "SLURM_JOB_ID" in env and _int(env.get("SLURM_NTASKS")) not in (None, 1):
        count, index = int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"])
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodes:
            raise ValueError("SLURM_NTASKS > 1 but no SLURM_STEP_NODELIST to find process 0")
        # JAX's convention: a port in the ephemeral range derived from the job id.
        port = env.get(ENV_PORT) or str(int(env["SLURM_JOB_ID"]) % 2**12 + 65535 - 2**12 + 1)
        num_nodes = _int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES")) or 1
        # Several tasks per node means one task per GPU: each sees only its own device.
        if ids is None and count > num_nodes and "SLURM_LOCALID" in env:
            ids = (int(env["SLURM_LOCALID"]),)
        return ProcessSpec("slurm", f"{first_slurm_host(nodes)}:{port}", count, index, ids)

    if env.get(ENV_AUTO, "").lower() == "auto" or any(k in env for k in _TPU_ENV_MARKERS):
        return ProcessSpec("auto", None, None, None, ids)
    return ProcessSpec("single", local_device_ids=ids)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> ProcessSpec:
    """Joins the distributed job (no-op for one process); call before any JAX computation.

    On CPU the cross-process collectives need gloo; setting it is harmless on GPU and TPU,
    whose collectives do not go through the CPU client.
    """
    spec = detect(coordinator_address, num_processes, process_id, local_device_ids)
    if spec.source == "single" or jax.distributed.is_initialized():
        return spec
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logging.info("jax.distributed.initialize: %s", spec)
    jax.distributed.initialize(
        coordinator_address=spec.coordinator_address,
        num_processes=spec.num_processes,
        process_id=spec.process_id,
        local_device_ids=None if spec.local_device_ids is None else list(spec.local_device_ids),
    )
    return spec


def initialize_from_flags() -> ProcessSpec:
    """``initialize`` from the absl flags above (each falling back to the environment)."""
    f = flags.FLAGS
    return initialize(f.coordinator_address, f.num_processes, f.process_id)


def is_main_process() -> bool:
    """Process 0 writes console logs, summaries and manifests; all processes compute."""
    return jax.process_index() == 0


def lockstep(
    batches: Iterable[dict[str, np.ndarray]], filler: Mapping[str, np.ndarray]
) -> Iterator[dict[str, np.ndarray]]:
    """Yields this host's batches, then ``filler`` until every host has run out.

    Each step of a global computation is a collective: a host with fewer eval batches than
    another (its shard is one example shorter) would leave the others waiting forever. So
    every step, all hosts agree whether anyone still has data (one tiny allgather); ``filler``
    must carry zero loss weight, so it changes no sum. A single process skips the allgather.
    """
    it = iter(batches)
    if jax.process_count() == 1:
        yield from it
        return
    from jax.experimental import multihost_utils

    while True:
        batch = next(it, None)
        have = np.asarray(batch is not None, np.int32)
        if not np.any(multihost_utils.process_allgather(have)):
            return
        yield dict(filler) if batch is None else batch


def process_summary() -> dict[str, Any]:
    """Which process this is and what it sees; printed once at start-up."""
    return {
        "process": f"{jax.process_index()}/{jax.process_count()}",
        "local_devices": jax.local_device_count(),
        "global_devices": jax.device_count(),
        "platform": jax.default_backend(),
    }
