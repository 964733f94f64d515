"""A training run as the CLIs that read one see it: its model and data from its own gin files,
and the parameters of one of its checkpoints.

``evaluate``, ``encoder_eval``, ``generate``, ``probe`` and ``item_head_refit`` all take the
run's ``--gin_file`` / ``--gin.X=Y`` flags (the same ones it trained with) and start here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from user_llm import checkpoints, gin_utils


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    model: Any  # the gin-built model wrapper (``models.TrainableModel``)
    dataset: Any  # its training ``pipeline.DatasetConfig``
    model_dir: str
    checkpoint: str  # where ``params`` were read: the newest checkpoint of this folder
    params: Any  # nested parameters

    @property
    def feature_lengths(self) -> dict[str, int]:
        """The run's task feature lengths ({} for a phase-1 encoder)."""
        return dict(self.dataset.task_feature_lengths)


def load(
    checkpoint_dir: str | Path | None = None, check: Callable[[], None] | None = None
) -> TrainedRun:
    """Parses the entry point's gin flags and reads the newest checkpoint of ``checkpoint_dir``
    (another run or an imported LLM, e.g. for the frozen text-prompt baseline), else of the
    run's own ``MODEL_DIR``. ``check`` runs between the two (the gin files' imports have
    registered their tasks by then), so a wrong flag is named before any checkpoint is read."""
    flags = gin_utils.FLAGS
    gin_utils.parse_gin(flags.gin_file, flags.gin_bindings, flags.gin_search_paths)
    if check is not None:
        check()
    run = gin_utils.query_values("train_lib.train", ("model", "train_dataset_cfg", "model_dir"))
    source = str(checkpoint_dir or run["model_dir"])
    params = checkpoints.unflatten(checkpoints.read_params(source))
    return TrainedRun(run["model"], run["train_dataset_cfg"], run["model_dir"], source, params)
