"""Vocabulary sizes of the user encoder's features, as a small JSON written with the data.

The encoder's embedding tables are as large as the dataset's vocabularies (items, rating and
time buckets, genres), which are only known once the histories are built. Building them is the
data pipeline's work, so the sizes are written next to it: every time a process builds a
dataset's histories (``families.task_data``) it writes ``{dataset}_h{L}_{key}.json`` into the
cache folder (``$USER_LLM_CACHE_DIR``, else ``~/.cache/user_llm``), keyed by the dataset, its
data folder, the history config and a fingerprint of the data files (names, sizes, modification
times: new files mean a new key, never stale sizes).

Model gin files read the sizes as plain macros (``ITEM_VOCAB_SIZE``, ``RATING_VOCAB_SIZE``,
``TIME_BUCKETS``, ``GENRE_VOCAB_SIZE``; ``gin/models/user_encoder/ar.gin``), which the entry
points bind from this JSON (``gin_utils.parse_gin``), as T5X gin files name a vocabulary's
size. ``--gin.FEATURE_SIZES_FILE="sizes.json"`` names a JSON of your own (for example one
written on another machine with ``python -m user_llm.data.feature_sizes``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import flags, logging

from user_llm import errors
from user_llm.data.histories import Histories, HistoryConfig

CACHE_ENV_VAR = "USER_LLM_CACHE_DIR"
# Gin macro -> FeatureSizes field.
MACROS = {
    "ITEM_VOCAB_SIZE": "item",
    "RATING_VOCAB_SIZE": "rating",
    "TIME_BUCKETS": "time_buckets",
    "GENRE_VOCAB_SIZE": "genre",
}


class FeatureSizesError(errors.UserLLMError, ValueError):
    """A feature-sizes JSON that is missing, malformed or for another dataset."""


@dataclasses.dataclass(frozen=True)
class FeatureSizes:
    """Vocabulary sizes of the encoder's features (ids 0 and 1, padding and OOV, included)."""

    item: int
    rating: int
    time_buckets: int
    genre: int

    @classmethod
    def from_histories(cls, histories: Histories) -> FeatureSizes:
        return cls(
            item=histories.vocabularies["item"].size,
            rating=histories.vocabularies["rating"].size,
            time_buckets=histories.config.num_time_buckets,
            genre=histories.vocabularies["genre"].size,
        )

    def macros(self) -> dict[str, int]:
        """{gin macro: size}."""
        return {macro: getattr(self, field) for macro, field in MACROS.items()}

    def categorical(self) -> dict[str, int]:
        """``UserEncoderConfig.categorical_features`` of these sizes."""
        return {
            "user_item_ids": self.item,
            "user_ratings": self.rating,
            "user_time_buckets": self.time_buckets,
        }

    def multivalued(self) -> dict[str, int]:
        """``UserEncoderConfig.multivalued_features`` of these sizes."""
        return {"user_genres": self.genre}


def cache_dir() -> Path:
    """Where the JSONs go: ``$USER_LLM_CACHE_DIR/feature_sizes``, else under ``~/.cache``."""
    root = os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "user_llm"
    return Path(root) / "feature_sizes"


def _data_files(dataset: str, data_dir: str | None) -> list[list[Any]]:
    """[name, size, mtime_ns] of every file the reader may read (the bundled archive when
    MovieLens has no folder; a release name the reader downloads is named as it is)."""
    if data_dir is None:
        from user_llm.data.readers.movielens import BUNDLED_ZIP

        path = BUNDLED_ZIP if dataset == "movielens" else None
    else:
        path = Path(data_dir)
    if path is None or not path.exists():
        return [[str(data_dir), None, None]]
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    out = []
    for f in files:
        stat = f.stat()
        out.append(
            [str(f.relative_to(path)) if f != path else f.name, stat.st_size, stat.st_mtime_ns]
        )
    return out


def sizes_path(
    dataset: str, data_dir: str | None, config: HistoryConfig, lenient: bool = False
) -> Path:
    """The JSON of ``dataset``'s histories built from ``data_dir`` with ``config``."""
    key = {
        "dataset": dataset,
        "data_dir": data_dir,
        "config": dataclasses.asdict(config),
        "lenient": lenient,
        "files": _data_files(dataset, data_dir),
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"{dataset}_h{config.max_history_length}_{digest}.json"


def write(sizes: FeatureSizes, path: str | Path, about: dict[str, Any] | None = None) -> Path:
    """Writes ``sizes`` (and what they are of, ``about``) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**(about or {}), "macros": sizes.macros()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def write_for_histories(
    histories: Histories, dataset: str, data_dir: str | None, lenient: bool = False
) -> Path | None:
    """Writes the JSON of freshly built histories; a cache folder that cannot be written is
    a warning (the sizes are then bound from the histories themselves), not a failure."""
    config = histories.config
    path = sizes_path(dataset, data_dir, config, lenient)
    about = {"dataset": dataset, "history_length": config.max_history_length}
    try:
        return write(FeatureSizes.from_histories(histories), path, about)
    except OSError as e:
        logging.warning("Could not write the feature sizes to %s (%s)", path, e)
        return None


def read(path: str | Path, dataset: str | None = None, history_length: int | None = None):
    """The ``FeatureSizes`` of a JSON; a clear error for a missing or malformed file, or one
    that says it is of another dataset or history length than the ones given."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise FeatureSizesError(f"feature-sizes file {path} not found") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FeatureSizesError(f"feature-sizes file {path} is not readable JSON: {e}") from e
    macros = record.get("macros") if isinstance(record, dict) else None
    if not isinstance(macros, dict):
        raise FeatureSizesError(f"{path}: no 'macros' object (expected {{'macros': {{...}}}})")
    if missing := sorted(set(MACROS) - set(macros)):
        raise FeatureSizesError(f"{path}: 'macros' lacks {missing}")
    bad = {
        k: macros[k]
        for k in MACROS
        if not isinstance(macros[k], int) or isinstance(macros[k], bool) or macros[k] < 1
    }
    if bad:
        raise FeatureSizesError(f"{path}: sizes must be positive integers, got {bad}")
    for name, wanted in (("dataset", dataset), ("history_length", history_length)):
        if wanted is not None and name in record and record[name] != wanted:
            raise FeatureSizesError(
                f"{path} holds the sizes of {name} {record[name]!r}, not {wanted!r}"
            )
    return FeatureSizes(**{field: macros[macro] for macro, field in MACROS.items()})


def _define_flags() -> None:
    flags.DEFINE_string("dataset", "movielens", "A dataset family's name.")
    flags.DEFINE_integer("history_length", 50, "Interactions per history.")


def main(argv: Sequence[str]) -> None:
    """Builds a dataset's histories (which writes their JSON) unless the JSON is there; prints
    its path and sizes. ``--gin.tasks.data_settings.data_dirs={...}`` names the data folder."""
    del argv
    from user_llm import gin_utils
    from user_llm.data import families

    gin_utils.parse_gin([], flags.FLAGS.gin_bindings)
    family = families.by_name(flags.FLAGS.dataset)
    sizes = families.feature_sizes(family, flags.FLAGS.history_length)
    print(f"{families.feature_sizes_path(family, flags.FLAGS.history_length)}: {sizes.macros()}")


if __name__ == "__main__":
    _define_flags()
    from user_llm import gin_utils

    gin_utils.run_main(main)
