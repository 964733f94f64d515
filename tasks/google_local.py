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

from tasks import common
from user_llm.data import families

FAMILY = families.GOOGLE_LOCAL

TASK_NAMES = common.register_family(FAMILY)
