"""Shared fixtures: tiny configs, the shared real-data folder, subprocess helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The encoder's feature sizes (user_llm.data.feature_sizes) that this run's data builds write go
# to a fresh folder (subprocesses inherit it), so no JSON of another run is ever read.
os.environ["USER_LLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="user_llm_test_cache_")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SHARED_REFERENCE = REPO_ROOT.parent / "shared" / "reference"


def tiny_decoder_config(**overrides):
    """``user_llm.testing.tiny_decoder_config`` (imported here lazily: jax loads on first use)."""
    from user_llm import testing

    return testing.tiny_decoder_config(**overrides)


@pytest.fixture
def tiny_config():
    return tiny_decoder_config()


def run_module(args, env_extra=None, timeout=600, check=True, cwd=REPO_ROOT):
    """Runs ``python -m ...`` (or a script) in a fresh interpreter; returns CompletedProcess."""
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(env_extra or {})
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
            f"stderr:\n{proc.stderr[-4000:]}"
        )
    return proc
