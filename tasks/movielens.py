"""MovieLens User-LLM tasks (next movie, favorite genre, encoder pretraining).

Data: ``$USER_LLM_MOVIELENS_DIR`` (a release folder or .zip, or a release name such as
``ml-1m`` that the reader downloads), else the bundled ml-latest-small (offline).

Registered with the byte vocabulary on import, for history lengths 20, 50, 100 and 200:
``movielens_next_item_{userllm,tp}_h{L}``, ``movielens_favorite_genre_{userllm,tp}_h{L}``,
``movielens_encoder_pretrain_h{L}``. ``register_tasks(vocab, "_suffix")`` adds another set.
"""

from __future__ import annotations

import seqio

from tasks import common
from user_llm.data import families
from user_llm.data.features import DatasetText

FAMILY = families.Family(
    name="movielens",
    env_var="USER_LLM_MOVIELENS_DIR",
    default_dir=None,
    text=DatasetText(item_noun="movie", genre_noun="genre", action="watch"),
    tasks=("next_item", "favorite_genre", "encoder_pretrain"),
)


def register_tasks(vocabulary: seqio.Vocabulary | None = None, name_suffix: str = "") -> list[str]:
    """Registers every MovieLens task with ``vocabulary`` (default: bytes); returns names."""
    return common.register_family(FAMILY, vocabulary, name_suffix)


TASK_NAMES = register_tasks()
