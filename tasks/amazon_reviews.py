"""Amazon Reviews User-LLM tasks (next product, favorite category, review generation,
encoder pretraining).

Data: ``$USER_LLM_AMAZON_DIR`` (a folder of ``<Category>.jsonl`` + ``meta_<Category>.jsonl``
files, 2023 or 2018 release), else ``../shared/data/amazon_reviews_2023`` next to the repository
when it exists. Without data the tasks still register and fail when a dataset is built.

Registered with the byte vocabulary on import, for history lengths 20, 50, 100 and 200:
``amazon_reviews_{next_item,favorite_category,review_gen}_{userllm,tp}_h{L}`` and
``amazon_reviews_encoder_pretrain_h{L}``.
"""

from __future__ import annotations

import seqio

from tasks import common
from user_llm.data import families
from user_llm.data.features import DatasetText

FAMILY = families.Family(
    name="amazon_reviews",
    env_var="USER_LLM_AMAZON_DIR",
    default_dir="../shared/data/amazon_reviews_2023",
    text=DatasetText(item_noun="product", genre_noun="category", action="review"),
    tasks=("next_item", "favorite_genre", "review_gen", "encoder_pretrain"),
    favorite_name="favorite_category",
)


def register_tasks(vocabulary: seqio.Vocabulary | None = None, name_suffix: str = "") -> list[str]:
    """Registers every Amazon Reviews task with ``vocabulary`` (default: bytes)."""
    return common.register_family(FAMILY, vocabulary, name_suffix)


TASK_NAMES = register_tasks()
