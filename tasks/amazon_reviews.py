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

from tasks import common
from user_llm.data import families

FAMILY = families.AMAZON_REVIEWS

TASK_NAMES = common.register_family(FAMILY)
