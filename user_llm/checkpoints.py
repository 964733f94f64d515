"""Orbax checkpoints: save every N steps, keep K, resume from the latest good one.

Safety rules, because a lost or silently wrong checkpoint costs days:
- Orbax finalizes a step atomically (written to a temporary directory, then renamed), so a run
  killed mid-save leaves no half-written step that looks finished.
- *Before* a save starts, a manifest of the state's values (per array: shape, dtype and two
  exact wrap-around sums of its bits, computed on device whatever the sharding) is written
  atomically. So every finished step has one, even if the process dies right after the save,
  and a restored state is compared with it: bit rot anywhere in the values is caught.
- On resume a step that Orbax cannot read, or whose values do not match its manifest, is
  reported, moved aside to ``<model_dir>/checkpoints_corrupt/`` (never deleted), and the
  previous step is tried.
- A step written by a *different model or optimizer* (another config) is not corruption: the
  run stops, names the first mismatching parameters and shapes, and moves nothing.
- A save that cannot be written (disk full, read-only or unwritable directory) stops the run
  with one line naming the step, the cause and the steps still on disk; the half-written
  temporary step is removed and nothing finished is touched, so a rerun resumes.
- If checkpoints exist but none is readable, the run stops with a message instead of silently
  starting from scratch; so does a fresh start in a directory holding quarantined steps,
  unless ``allow_fresh_start`` says so.

Also here: restoring an *initial* checkpoint into a different model with a regex assignment
map and fallback to scratch (T5X's ``assignment_map`` / ``fallback_to_scratch``), which is how a
pretrained LLM is loaded into User-LLM with new cross-attention parameters.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from user_llm import errors

MANIFEST_DIR = "checkpoint_manifests"
CORRUPT_DIR = "checkpoints_corrupt"
MANIFEST_FORMAT = "value-checksums-v1"


class CheckpointError(errors.UserLLMError, RuntimeError):
    """A checkpoint cannot be used; the message says which and why."""


class ConfigMismatchError(CheckpointError):
    """The checkpoint was written by another model or optimizer configuration."""


class CheckpointWriteError(CheckpointError):
    """A step could not be written (disk full, read-only file system, no permission)."""


def _key_name(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _bits_checksum(x: jax.Array) -> jax.Array:
    """Two uint32 sums of ``x``'s bit patterns, the second weighted by position; exact and
    independent of sharding and reduction order (addition modulo 2^32)."""
    x = jnp.asarray(x)
    if x.dtype.itemsize == 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 2:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    elif x.dtype.itemsize == 8:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)  # a trailing axis of 2
    else:
        bits = x.astype(jnp.uint32)
    primes = (2654435761, 2246822519, 3266489917, 668265263)
    weight = jnp.ones(bits.shape, jnp.uint32)
    for axis in range(bits.ndim):
        iota = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
        weight = weight + iota * jnp.uint32(primes[axis % len(primes)])
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)])


_checksums = jax.jit(lambda tree: jax.tree_util.tree_map(_bits_checksum, tree))


def value_manifest(state: Any) -> dict[str, list]:
    """{'params/a/kernel': [shape, dtype, sum, weighted sum]} for every array of ``state``."""
    sums = jax.device_get(_checksums(state))
    return {
        _key_name(path): [list(np.shape(x)), str(np.dtype(x.dtype)), *map(int, c)]
        for (path, x), c in zip(
            jax.tree_util.tree_leaves_with_path(state), jax.tree_util.tree_leaves(sums), strict=True
        )
    }


def _shapes(tree: Any, prefix: str) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the arrays under ``prefix/``, in tree order."""
    return {
        name[len(prefix) + 1 :]: tuple(x.shape)
        for name, x in ((_key_name(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree))
        if name.startswith(prefix + "/")
    }


def structure_mismatch(saved: Any, expected: Any, limit: int = 5) -> str | None:
    """What differs between a checkpoint's array tree and the state this run builds (names and
    shapes of parameters; the optimizer state by leaf count and shapes, since optax's tuples
    have no stable names), or None when they agree."""
    saved_params, want_params = _shapes(saved, "params"), _shapes(expected, "params")
    problems = [
        f"{name}: checkpoint {saved_params[name]}, this config {want_params[name]}"
        for name in want_params
        if name in saved_params and saved_params[name] != want_params[name]
    ]
    problems += [f"{n}: only in this config" for n in want_params if n not in saved_params]
    problems += [f"{n}: only in the checkpoint" for n in saved_params if n not in want_params]
    if problems:
        more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
        return "parameters differ: " + "; ".join(problems[:limit]) + more
    saved_opt = list(_shapes(saved, "opt_state").values())
    want_opt = list(_shapes(expected, "opt_state").values())
    if saved_opt != want_opt:
        return (
            f"the optimizer state differs ({len(saved_opt)} arrays in the checkpoint, "
            f"{len(want_opt)} in this config): another optimizer or training strategy"
        )
    return None


class Checkpointer:
    """A ``CheckpointManager`` over ``<model_dir>/checkpoints`` with value manifests."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        keep: int | None = 3,
        async_save: bool = True,
        allow_fresh_start: bool = False,
    ):
        self.model_dir = Path(model_dir).expanduser().resolve()  # Orbax needs absolute paths
        self.directory = self.model_dir / "checkpoints"
        self.manifest_dir = self.model_dir / MANIFEST_DIR
        self.directory.mkdir(parents=True, exist_ok=True)
        self.manifest_dir.mkdir(parents=True, exist_ok=True)
        # A step a killed process was still writing (Orbax's temporary folder) never counted
        # as finished: it is removed before this run starts. Done here, synchronously, and not
        # by Orbax's ``cleanup_tmp_directories``, whose background thread outlives a run that
        # stops at once with an error and then prints a traceback at interpreter shutdown.
        self._remove_partial_steps("*")
        self._manager = self._new_manager(keep, async_save)
        self._keep, self._async = keep, async_save
        self._allow_fresh_start = allow_fresh_start
        self._in_flight: int | None = None

    def _new_manager(self, keep: int | None, async_save: bool) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        return ocp.CheckpointManager(self.directory, options=options)

    # -- saving ---------------------------------------------------------------------------
    def save(self, step: int, state: Any) -> None:
        """Writes ``step``'s manifest, then starts saving ``state`` (asynchronously if enabled).

        The caller guarantees ``state`` is finite (the train loop checks every step)."""
        self._wait_for_in_flight()
        manifest = {"format": MANIFEST_FORMAT, "step": step, "arrays": value_manifest(state)}
        self._in_flight = step
        try:
            if jax.process_index() == 0:
                tmp = self.manifest_dir / f"{step}.json.tmp"
                tmp.write_text(json.dumps(manifest))
                tmp.replace(self.manifest_dir / f"{step}.json")
            self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        except Exception as e:
            self._raise_write_failure(e)
            raise
        self._drop_stale_manifests()

    def wait(self) -> None:
        """Blocks until the last save is on disk."""
        self._wait_for_in_flight()
        self._drop_stale_manifests()

    def _wait_for_in_flight(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._raise_write_failure(e)
            raise
        self._in_flight = None

    def _raise_write_failure(self, error: Exception) -> None:
        """Turns a failed write of the in-flight step into one ``CheckpointWriteError``: the
        half-written step (Orbax's temporary folder and its manifest) is removed, every
        finished step is left as it is. Returns if ``error`` is not a write failure."""
        cause = errors.write_failure_cause(error)
        if cause is None:
            return
        step, self._in_flight = self._in_flight, None
        if step is not None:
            self._remove_partial_steps(str(step))
        finished = [s for s in self._manager.all_steps(read=True) if s != step]
        kept = (
            f"finished steps on disk, untouched: {sorted(finished)}; a rerun resumes from step "
            f"{max(finished)}"
            if finished
            else "no earlier step was saved"
        )
        raise CheckpointWriteError(
            f"could not write checkpoint step {step} in {self.directory}: {cause} "
            f"({str(error).splitlines()[0][:200]}). The partial step was removed; {kept} once "
            "the directory is writable again."
        ) from None

    def _remove_partial_steps(self, step: str) -> None:
        """Removes Orbax's temporary folders of ``step`` (a glob) and the manifests of steps
        that did not finish."""
        if jax.process_index() != 0:
            return
        for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            if partial.is_dir() and not partial.is_symlink():
                shutil.rmtree(partial, ignore_errors=True)
        for manifest in self.manifest_dir.glob(f"{step}.json*"):
            number = manifest.name.split(".", 1)[0]
            if manifest.name.endswith(".tmp") or not (self.directory / number).is_dir():
                manifest.unlink(missing_ok=True)

    def _drop_stale_manifests(self) -> None:
        if jax.process_index() != 0:
            return
        live = {str(s) for s in self._manager.all_steps()} | {str(self._in_flight)}
        for manifest in self.manifest_dir.glob("*.json"):
            if manifest.stem not in live:
                manifest.unlink(missing_ok=True)

    # -- restoring ------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def _saved_tree(self, step: int) -> Any:
        path = self.directory / str(step) / "default"
        metadata = ocp.StandardCheckpointer().metadata(path)
        tree = getattr(metadata, "item_metadata", metadata)
        if tree is None:
            raise CheckpointError(f"no readable array metadata in {path}")
        return tree

    def verify(self, step: int, state: Any) -> None:
        """Raises CheckpointError if restored ``state`` does not match the step's manifest.
        A step without a manifest (written before manifests existed) is accepted, with a
        warning."""
        manifest_path = self.manifest_dir / f"{step}.json"
        if not manifest_path.exists():
            logging.warning("Checkpoint step %d has no manifest; its values are unverified", step)
            return
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            logging.warning("Checkpoint step %d has an old manifest; values unverified", step)
            return
        expected, actual = manifest["arrays"], value_manifest(state)
        changed = sorted(k for k in expected if actual.get(k) != expected[k])
        if changed or set(actual) != set(expected):
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not match its manifest: "
                f"{len(changed)} arrays changed, e.g. {changed[:3]}"
            )

    def restore_latest(self, abstract_state: Any) -> tuple[Any, int] | None:
        """Restores the newest readable step into ``abstract_state``'s shapes and shardings.

        Returns None when there is no checkpoint. Unreadable or corrupt steps are moved aside
        and reported; a step of another configuration stops the run and moves nothing.
        """
        steps = self.steps()
        if not steps:
            self._check_fresh_start()
            return None
        failures = []
        for step in reversed(steps):
            try:
                saved = self._saved_tree(step)
            except Exception as e:  # noqa: BLE001 - unreadable metadata: not usable
                failures.append(self._quarantine_report(step, e))
                continue
            mismatch = structure_mismatch(saved, abstract_state)
            if mismatch:
                raise ConfigMismatchError(
                    f"checkpoint step {step} in {self.directory} was written by another "
                    f"configuration: {mismatch}. Nothing was moved. Resume with the config it "
                    f"was trained with (see config*.gin in {self.model_dir}) or use a new "
                    "MODEL_DIR."
                )
            try:
                state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
                self.verify(step, state)
            except Exception as e:  # noqa: BLE001 - any read failure means "not usable"
                failures.append(self._quarantine_report(step, e))
                continue
            if failures:
                logging.warning("Resuming from step %d after skipping: %s", step, failures)
            return state, step
        raise CheckpointError(
            f"No readable checkpoint in {self.directory}; every step failed and was moved aside "
            f"(nothing was deleted):\n" + "\n".join(failures)
        )

    def _check_fresh_start(self) -> None:
        quarantined = self.model_dir / CORRUPT_DIR
        if self._allow_fresh_start or not quarantined.is_dir() or not any(quarantined.iterdir()):
            return
        raise CheckpointError(
            f"{self.model_dir} has no usable checkpoint but holds quarantined steps in "
            f"{quarantined}; refusing to start from scratch over them. Inspect or move them, "
            "or set train.allow_fresh_start=True."
        )

    def _quarantine_report(self, step: int, error: Exception) -> str:
        reason = f"{type(error).__name__}: {str(error)[:500]}"
        moved = self._quarantine(step)
        msg = f"checkpoint step {step} is unreadable ({reason}); moved aside to {moved}"
        logging.error(msg)
        print(f"WARNING: {msg}", flush=True)
        return msg

    def _quarantine(self, step: int) -> Path:
        """Moves a bad step (and its manifest) out of Orbax's view; never deletes it."""
        self._manager.wait_until_finished()
        self._manager.close()
        dest_root = self.model_dir / CORRUPT_DIR
        dest_root.mkdir(parents=True, exist_ok=True)
        dest = dest_root / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        source = self.directory / str(step)
        if source.is_symlink():  # never follow a link out of MODEL_DIR: move the link itself
            dest.mkdir()
            shutil.move(str(source), str(dest / "step_link"))
        else:
            shutil.move(str(source), str(dest))
        manifest = self.manifest_dir / f"{step}.json"
        if manifest.exists():
            shutil.move(str(manifest), str(dest / "user_llm_manifest.json"))
        self._manager = self._new_manager(self._keep, self._async)
        return dest

    def close(self) -> None:
        try:
            self.wait()
        except BaseException:
            with contextlib.suppress(Exception):  # keep the first, clear error
                self._manager.close()
            raise
        self._manager.close()


# -- initial checkpoints with assignment maps --------------------------------------------


def flatten(tree: Any) -> dict[str, Any]:
    """{'a/b/c': leaf} with '/'-joined dictionary keys."""
    return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """The nested dictionaries of a ``flatten`` result."""
    return traverse_util.unflatten_dict(flat, sep="/")


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
