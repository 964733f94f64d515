"""Process detection (flags, env, SLURM, TPU) and the launch scripts' dry runs.

Dry runs are parsed back with ``shlex``: each printed command must be well-formed, name only
flags the train entry point defines, and gin files that exist.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT

from user_llm import distributed, gin_utils, partitioning

TRAIN_FLAGS = {
    "gin_file",
    "gin_bindings",
    "gin_search_paths",
    "coordinator_address",
    "num_processes",
    "process_id",
}
TRAIN_ARGS = [
    "--gin_file=experiments/movielens_titles_lm.gin",
    "--gin_file=local_tiny.gin",
    "--gin.MODEL_DIR='/tmp/launch_dry_run'",
    "--gin.TASK_FEATURE_LENGTHS={'targets': 64}",
]


# -- process detection ---------------------------------------------------------------------


def test_single_process_by_default():
    assert distributed.detect(env={}) == distributed.ProcessSpec("single")
    assert distributed.detect(env={"USER_LLM_NUM_PROCESSES": "1"}).source == "single"


def test_explicit_from_env_and_flags_override_env():
    env = {
        "USER_LLM_COORDINATOR": "10.0.0.1:1234",
        "USER_LLM_NUM_PROCESSES": "4",
        "USER_LLM_PROCESS_ID": "3",
    }
    assert distributed.detect(env=env) == distributed.ProcessSpec("explicit", "10.0.0.1:1234", 4, 3)
    spec = distributed.detect("h:1", 2, 1, env=env)
    assert (spec.coordinator_address, spec.num_processes, spec.process_id) == ("h:1", 2, 1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_processes": 2}, "coordinator"),
        ({"num_processes": 2, "coordinator_address": "h:1", "process_id": 2}, "outside"),
        ({"coordinator_address": "h:1"}, "num_processes"),
    ],
)
def test_incomplete_settings_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distributed.detect(env={}, **kwargs)


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node001", "node001"),
        ("node001,gpu2", "node001"),
        ("node[003-005,9],gpu1", "node003"),
        ("gpu-a[12,15]", "gpu-a12"),
    ],
)
def test_first_slurm_host(nodelist, first):
    assert distributed.first_slurm_host(nodelist) == first


def test_slurm_one_task_per_gpu():
    env = {
        "SLURM_JOB_ID": "4097",
        "SLURM_NTASKS": "16",
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
    }
    spec = distributed.detect(env=env)
    assert spec == distributed.ProcessSpec("slurm", "gpu07:61441", 16, 9, (1,))
    # One task per node: the task sees all of its node's GPUs.
    one_per_node = dict(env, SLURM_NTASKS="2", SLURM_PROCID="1", USER_LLM_COORDINATOR_PORT="999")
    assert distributed.detect(env=one_per_node) == distributed.ProcessSpec(
        "slurm", "gpu07:999", 2, 1, None
    )
    # A single-task SLURM job is a single process.
    assert distributed.detect(env=dict(env, SLURM_NTASKS="1")).source == "single"


def test_tpu_vm_and_explicit_auto_defer_to_jax():
    assert distributed.detect(env={"TPU_WORKER_HOSTNAMES": "a,b"}).source == "auto"
    assert distributed.detect(env={"USER_LLM_DISTRIBUTED": "auto"}).source == "auto"


def test_initialize_is_a_no_op_for_one_process():
    assert distributed.initialize(num_processes=1).source == "single"
    assert not jax.distributed.is_initialized()


def test_lockstep_single_process_passes_batches_through():
    batches = [{"x": np.ones(2)}, {"x": np.zeros(2)}]
    out = list(distributed.lockstep(batches, {"x": np.full(2, -1.0)}))
    assert len(out) == 2 and out[0]["x"][0] == 1


def test_describe_state_reports_memory_and_largest_arrays():
    mesh = partitioning.create_mesh((1, 1))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shape = lambda *s: jax.ShapeDtypeStruct(s, np.float32, sharding=sharding)
    state = {"params": {"big": shape(256, 4), "small": shape(3)}, "opt_state": (shape(256, 4),)}
    text = partitioning.describe_state(state, mesh, top=1)
    assert "params: 2 arrays, 4.0 KiB in all, 4.0 KiB per device" in text
    assert "opt_state: 1 arrays, 4.0 KiB in all" in text
    assert "['big']: (256, 4) -> (256, 4), P()" in text
    assert "['small']" not in text


# -- dry runs --------------------------------------------------------------------------------


def _check_train_command(argv: list[str]) -> None:
    """``python -m user_llm.train ...`` with known flags and existing gin files."""
    i = argv.index("-m")
    assert argv[i + 1] == "user_llm.train"
    train_args = gin_utils.rewrite_gin_args(argv[i + 2 :])
    for arg in train_args:
        assert arg.startswith("--") and "=" in arg, arg
        name, value = arg[2:].split("=", 1)
        assert name in TRAIN_FLAGS, f"unknown flag {arg}"
        if name == "gin_file":
            gin_utils.find_gin_file(value, gin_utils.DEFAULT_SEARCH_PATHS)


def _run(cmd: list[str], **env: str) -> list[list[str]]:
    proc = subprocess.run(
        cmd,
        cwd=REPO_ROOT,
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [shlex.split(line) for line in proc.stdout.splitlines() if not line.startswith("#")]


def test_local_multiprocess_dry_run():
    script = str(REPO_ROOT / "launch" / "local_multiprocess.py")
    lines = _run([sys.executable, script, "--dry_run", "--num_processes=3", "--", *TRAIN_ARGS])
    assert len(lines) == 3
    ports = set()
    for i, argv in enumerate(lines):
        env = dict(a.split("=", 1) for a in argv[:5])
        assert env["USER_LLM_PROCESS_ID"] == str(i) and env["USER_LLM_NUM_PROCESSES"] == "3"
        assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
        ports.add(env["USER_LLM_COORDINATOR"])
        assert argv[-len(TRAIN_ARGS) :] == TRAIN_ARGS  # passed through unchanged
        _check_train_command(argv[5:])
    assert len(ports) == 1 and next(iter(ports)).startswith("127.0.0.1:")


def test_tpu_pod_dry_run():
    script = str(REPO_ROOT / "launch" / "tpu_pod.sh")
    env = {"DRY_RUN": "1", "TPU_NAME": "pod", "ZONE": "us-central2-b", "PROJECT": "p"}
    lines = _run(["bash", script, "--", *TRAIN_ARGS], **env)
    assert lines[0][:3] == ["git", "-C", str(REPO_ROOT)]
    ssh = [a for a in lines if a[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert len(ssh) == 2  # setup, then train
    for argv in ssh:
        assert "--worker=all" in argv and "--zone=us-central2-b" in argv
    train = shlex.split(ssh[-1][-1].removeprefix("--command="))
    assert "USER_LLM_DISTRIBUTED=auto" in train
    _check_train_command(train)
    assert train[-len(TRAIN_ARGS) :] == TRAIN_ARGS
    # Its default train command is valid too.
    default = _run(["bash", script, "--skip_setup"], **env)
    assert len(default) == 1
    _check_train_command(shlex.split(default[0][-1].removeprefix("--command=")))


def test_slurm_dry_run():
    lines = _run(
        ["bash", str(REPO_ROOT / "launch" / "slurm_gpu.sbatch"), "--", *TRAIN_ARGS], DRY_RUN="1"
    )
    assert len(lines) == 1 and lines[0][0] == "srun"
    _check_train_command(lines[0])
    assert lines[0][-len(TRAIN_ARGS) :] == TRAIN_ARGS
    text = (REPO_ROOT / "launch" / "slurm_gpu.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --gpus-per-node=8" in text


def test_xmanager_dry_run_needs_no_xmanager():
    script = str(REPO_ROOT / "launch" / "xmanager_launch.py")
    lines = _run(
        [sys.executable, script, "--dry_run", "--accelerator=A100", "--count=8", "--", *TRAIN_ARGS]
    )
    assert len(lines) == 1
    assert "USER_LLM_DISTRIBUTED=auto" in lines[0]
    _check_train_command(lines[0])
    assert lines[0][-len(TRAIN_ARGS) :] == TRAIN_ARGS


def test_tpu_pod_quotes_environment_values_and_pins_jax():
    script = str(REPO_ROOT / "launch" / "tpu_pod.sh")
    env = {"DRY_RUN": "1", "TPU_NAME": "pod", "ZONE": "z", "PROJECT": "p",
           "REMOTE_DIR": "my dir; touch /tmp/pwned", "BUCKET": "b$(id)"}  # fmt: skip
    lines = _run(["bash", script, "--", *TRAIN_ARGS], **env)
    setup = [a for a in lines if a[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]][0]
    remote = setup[-1].removeprefix("--command=")
    words = shlex.split(remote)  # what the remote shell sees, word by word
    assert "$HOME/my dir; touch /tmp/pwned" in words
    assert "b$(id)" in words
    bad = subprocess.run(
        ["bash", script, "--skip_setup"], env={**os.environ, **env, "JAX_VERSION": "0.1; rm -rf ~"},
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "JAX_VERSION must look like" in bad.stderr
