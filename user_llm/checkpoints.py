"""Orbax checkpoints: save every N steps, keep K, resume from the latest good one.

Safety rules, because a lost or silently wrong checkpoint costs days:
- Orbax finalizes a step atomically (written to a temporary directory, then renamed), so a run
  killed mid-save leaves no half-written step that looks finished.
- After a step is finalized we record a SHA-256 manifest of its files. On resume a step whose
  files do not match (or that Orbax cannot read) is reported, moved aside to
  ``<model_dir>/checkpoints_corrupt/`` (never deleted), and the previous step is tried.
- If checkpoints exist but none is readable, the run stops with a message instead of silently
  starting from scratch.

Also here: restoring an *initial* checkpoint into a different model with a regex assignment
map and fallback to scratch (T5X's ``assignment_map`` / ``fallback_to_scratch``), which is how a
pretrained LLM is loaded into User-LLM with new cross-attention parameters.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

MANIFEST_DIR = "checkpoint_manifests"
CORRUPT_DIR = "checkpoints_corrupt"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which and why."""


def _file_digests(step_dir: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digests[str(path.relative_to(step_dir))] = h.hexdigest()
    return digests


class Checkpointer:
    """A ``CheckpointManager`` over ``<model_dir>/checkpoints`` with integrity manifests."""

    def __init__(self, model_dir: str | Path, *, keep: int | None = 3, async_save: bool = True):
        self.model_dir = Path(model_dir).expanduser().resolve()  # Orbax needs absolute paths
        self.directory = self.model_dir / "checkpoints"
        self.manifest_dir = self.model_dir / MANIFEST_DIR
        self.directory.mkdir(parents=True, exist_ok=True)
        self.manifest_dir.mkdir(parents=True, exist_ok=True)
        self._manager = self._new_manager(keep, async_save)
        self._keep, self._async = keep, async_save
        self._pending_manifest: int | None = None

    def _new_manager(self, keep: int | None, async_save: bool) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        return ocp.CheckpointManager(self.directory, options=options)

    # -- saving ---------------------------------------------------------------------------
    def save(self, step: int, state: Any) -> None:
        """Starts saving ``state`` at ``step`` (asynchronously if enabled)."""
        self._manager.wait_until_finished()
        self._write_pending_manifest()
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._pending_manifest = step
        self._drop_stale_manifests()

    def wait(self) -> None:
        """Blocks until the last save is on disk and its manifest written."""
        self._manager.wait_until_finished()
        self._write_pending_manifest()

    def _write_pending_manifest(self) -> None:
        step = self._pending_manifest
        if step is None or jax.process_index() != 0:
            return
        step_dir = self.directory / str(step)
        if step_dir.is_dir():
            tmp = self.manifest_dir / f"{step}.json.tmp"
            tmp.write_text(json.dumps(_file_digests(step_dir), indent=0))
            tmp.replace(self.manifest_dir / f"{step}.json")
        self._pending_manifest = None

    def _drop_stale_manifests(self) -> None:
        live = {str(s) for s in self._manager.all_steps()}
        for manifest in self.manifest_dir.glob("*.json"):
            if manifest.stem not in live and manifest.stem != str(self._pending_manifest):
                manifest.unlink(missing_ok=True)

    # -- restoring ------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def verify(self, step: int) -> None:
        """Raises CheckpointError if the step's files do not match its manifest."""
        manifest = self.manifest_dir / f"{step}.json"
        if not manifest.exists():
            return  # Finalized by Orbax but killed before the manifest: Orbax's read decides.
        expected = json.loads(manifest.read_text())
        actual = _file_digests(self.directory / str(step))
        missing = sorted(set(expected) - set(actual))
        changed = sorted(k for k in expected if k in actual and actual[k] != expected[k])
        if missing or changed:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not match its manifest: "
                f"missing files {missing[:5]}, changed files {changed[:5]}"
            )

    def restore_latest(self, abstract_state: Any) -> tuple[Any, int] | None:
        """Restores the newest readable step into ``abstract_state``'s shapes and shardings.

        Returns None when there is no checkpoint. Unreadable steps are moved aside and reported.
        """
        steps = self.steps()
        if not steps:
            return None
        failures = []
        for step in reversed(steps):
            try:
                self.verify(step)
                state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
                if failures:
                    logging.warning("Resuming from step %d after skipping: %s", step, failures)
                return state, step
            except Exception as e:  # noqa: BLE001 - any read failure means "not usable"
                reason = f"{type(e).__name__}: {str(e)[:500]}"
                moved = self._quarantine(step)
                msg = f"checkpoint step {step} is unreadable ({reason}); moved aside to {moved}"
                logging.error(msg)
                print(f"WARNING: {msg}", flush=True)
                failures.append(msg)
        raise CheckpointError(
            f"No readable checkpoint in {self.directory}; every step failed and was moved aside "
            f"(nothing was deleted):\n" + "\n".join(failures)
        )

    def _quarantine(self, step: int) -> Path:
        """Moves a bad step (and its manifest) out of Orbax's view; never deletes it."""
        self._manager.wait_until_finished()
        self._manager.close()
        dest_root = self.model_dir / CORRUPT_DIR
        dest_root.mkdir(parents=True, exist_ok=True)
        dest = dest_root / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        shutil.move(str(self.directory / str(step)), str(dest))
        manifest = self.manifest_dir / f"{step}.json"
        if manifest.exists():
            shutil.move(str(manifest), str(dest / "user_llm_manifest.json"))
        self._manager = self._new_manager(self._keep, self._async)
        return dest

    def close(self) -> None:
        self.wait()
        self._manager.close()


# -- initial checkpoints with assignment maps --------------------------------------------


def flatten(tree: Any) -> dict[str, Any]:
    """{'a/b/c': leaf} with '/'-joined dictionary keys."""
    flat = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        flat["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = leaf
    return flat


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, leaf in flat.items():
        node = tree
        *parents, last = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


def read_params(checkpoint_dir: str | Path, step: int | None = None) -> dict[str, np.ndarray]:
    """Reads the ``params`` of a user_llm checkpoint (a model dir, its checkpoints dir, or a
    step dir) as flat host arrays, without needing the model that wrote it."""
    path = Path(checkpoint_dir)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if not path.exists():
        raise CheckpointError(f"Initial checkpoint {checkpoint_dir} does not exist")
    if not (path / "_CHECKPOINT_METADATA").exists() and not (path / "_METADATA").exists():
        steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())
        if not steps:
            raise CheckpointError(f"No checkpoint steps found in {path}")
        path = path / str(step if step is not None else steps[-1])
    if (path / "default").is_dir():
        path = path / "default"
    try:
        checkpointer = ocp.StandardCheckpointer()
        metadata = checkpointer.metadata(path.resolve())
        tree = getattr(metadata, "item_metadata", metadata)
        # Restore onto this host's first device, whatever topology wrote the checkpoint.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree
        )
        restored = checkpointer.restore(path.resolve(), target)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"Cannot read initial checkpoint {path}: {e}") from e
    params = restored.get("params", restored) if isinstance(restored, dict) else restored
    return {k: np.asarray(v) for k, v in flatten(params).items()}


def apply_assignment_map(
    target: dict[str, Any],
    source: dict[str, np.ndarray],
    assignment_map: Sequence[tuple[str, str | None]] = (),
    fallback_to_scratch: bool = False,
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Fills flat ``target`` params from flat ``source`` params.

    Each target name is rewritten by the first ``(regex, replacement)`` whose regex fully
    matches (replacement None: keep the target's fresh initialization); with no match the name
    is looked up unchanged. A missing source is an error unless ``fallback_to_scratch``.
    Shapes must agree. Returns the new flat params and a report of what came from where.
    """
    out, report = {}, {"restored": [], "from_scratch": [], "unused_source": []}
    used = set()
    for name, value in target.items():
        source_name: str | None = name
        for pattern, replacement in assignment_map:
            if re.fullmatch(pattern, name):
                source_name = None if replacement is None else re.sub(pattern, replacement, name)
                break
        if source_name is not None and source_name in source:
            src = source[source_name]
            if tuple(src.shape) != tuple(np.shape(value)):
                raise CheckpointError(
                    f"Shape mismatch for {name}: model {tuple(np.shape(value))}, "
                    f"checkpoint {source_name} {tuple(src.shape)}"
                )
            out[name] = src.astype(
                np.asarray(value).dtype if hasattr(value, "dtype") else src.dtype
            )
            used.add(source_name)
            report["restored"].append(name)
        elif source_name is None or fallback_to_scratch:
            out[name] = value
            report["from_scratch"].append(name)
        else:
            raise CheckpointError(
                f"Parameter {name} (looked up as {source_name}) is not in the initial checkpoint; "
                "add an assignment_map entry or set fallback_to_scratch=True"
            )
    report["unused_source"] = sorted(set(source) - used)
    return out, report
