"""Google Local Reviews User-LLM tasks (next place, favorite category, review generation,
encoder pretraining).

Data: ``$USER_LLM_GOOGLE_LOCAL_DIR`` (a folder of ``review-<State>.json.gz`` +
``meta-<State>.json.gz`` files, 2021 release). There is no default: without the variable the
tasks still register and fail when a dataset is built, naming the variable.

Registered with the byte vocabulary on import, for history lengths 20, 50, 100 and 200:
``google_local_{next_item,favorite_category,review_gen}_{userllm,tp}_h{L}`` and
``google_local_encoder_pretrain_h{L}``.
"""

from __future__ import annotations

import seqio

from tasks import common
from user_llm.data import families
from user_llm.data.features import DatasetText

FAMILY = families.Family(
    name="google_local",
    env_var="USER_LLM_GOOGLE_LOCAL_DIR",
    default_dir=None,
    text=DatasetText(item_noun="place", genre_noun="category", action="review"),
    tasks=("next_item", "favorite_genre", "review_gen", "encoder_pretrain"),
    favorite_name="favorite_category",
)


def register_tasks(vocabulary: seqio.Vocabulary | None = None, name_suffix: str = "") -> list[str]:
    """Registers every Google Local task with ``vocabulary`` (default: bytes)."""
    return common.register_family(FAMILY, vocabulary, name_suffix)


TASK_NAMES = register_tasks()
