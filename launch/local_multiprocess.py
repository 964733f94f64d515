r"""Runs one job as N local CPU processes on JAX's distributed runtime: a pod in miniature.

    python launch/local_multiprocess.py --num_processes=2 --devices_per_process=4 -- \
      --gin_file=experiments/movielens_titles_lm.gin --gin_file=local_tiny.gin \
      --gin.MODEL_DIR=\"/tmp/titles_2proc\" --gin.train_lib.MeshConfig.mesh_shape="(2, 4)"

Everything after ``--`` goes to ``python -m user_llm.train`` unchanged. Process 0 hosts the
coordinator on 127.0.0.1 (a free port unless ``--port``). Output lines come back prefixed
``[p<i>]``. As on a cluster, when one process dies the others are stopped (a collective
cannot finish without it) and the launcher exits non-zero; running the same command again
resumes from the last checkpoint. ``--dry_run`` prints the commands instead of running them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port nobody listens on now (the OS picks it); the coordinator binds it next."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_commands(
    num_processes: int,
    devices_per_process: int,
    port: int,
    train_args: Sequence[str],
    module: str = "user_llm.train",
) -> list[tuple[dict[str, str], list[str]]]:
    """(environment additions, argv) for each process; the same for a dry run and a real one."""
    out = []
    for i in range(num_processes):
        env = {
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
            "USER_LLM_COORDINATOR": f"127.0.0.1:{port}",
            "USER_LLM_NUM_PROCESSES": str(num_processes),
            "USER_LLM_PROCESS_ID": str(i),
        }
        out.append((env, [sys.executable, "-m", module, *train_args]))
    return out


def format_command(env: dict[str, str], argv: Sequence[str]) -> str:
    """A shell line that reproduces one process (what ``--dry_run`` prints)."""
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    return f"{assignments} {shlex.join(argv)}"


def _pump(stream, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


def run(commands: list[tuple[dict[str, str], list[str]]], grace_s: float = 10.0) -> int:
    """Starts every process; if one fails, stops the rest. Returns the job's exit code."""
    procs = []
    pumps = []
    for i, (extra_env, argv) in enumerate(commands):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra_env)
        proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own group, so stopping it stops its children too
        )
        procs.append(proc)
        print(f"[launcher] process {i} pid {proc.pid}", flush=True)
        pump = threading.Thread(target=_pump, args=(proc.stdout, f"[p{i}] "), daemon=True)
        pump.start()
        pumps.append(pump)

    def stop_all(sig: int) -> None:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, sig)

    def on_signal(signum, frame):  # the launcher itself is stopped: stop the job with it
        stop_all(signal.SIGTERM)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    exit_code = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                exit_code = failed[0].returncode
                index = procs.index(failed[0])
                print(f"[launcher] process {index} exited {exit_code}; stopping the others")
                stop_all(signal.SIGTERM)
                deadline = time.time() + grace_s
                while time.time() < deadline and any(p.poll() is None for p in procs):
                    time.sleep(0.1)
                stop_all(signal.SIGKILL)
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        stop_all(signal.SIGTERM)
        raise
    for p in procs:
        p.wait()
    for pump in pumps:
        pump.join(timeout=5)
    if exit_code == 0:
        exit_code = next((p.returncode for p in procs if p.returncode != 0), 0)
    return exit_code


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--module", default="user_llm.train", help="entry point to run")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = parser.parse_args(own)
    if os.environ.get("DRY_RUN") == "1":
        args.dry_run = True
    return args, train_args


def main(argv: Sequence[str]) -> int:
    args, train_args = parse_args(argv)
    port = args.port or free_port()
    commands = process_commands(
        args.num_processes, args.devices_per_process, port, train_args, args.module
    )
    if args.dry_run:
        for env, cmd in commands:
            print(format_command(env, cmd))
        return 0
    return run(commands)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
