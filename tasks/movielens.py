"""MovieLens User-LLM tasks (next movie, favorite genre, encoder pretraining).

Data: ``$USER_LLM_MOVIELENS_DIR`` (a release folder or .zip, or a release name such as
``ml-1m`` that the reader downloads), else the bundled ml-latest-small (offline).

Registered with the byte vocabulary on import, for history lengths 20, 50, 100 and 200:
``movielens_next_item_{userllm,tp}_h{L}``, ``movielens_favorite_genre_{userllm,tp}_h{L}``,
``movielens_encoder_pretrain_h{L}``. ``tasks.register_tasks(vocab, "_suffix")`` adds another set.
"""

from __future__ import annotations

from tasks import common
from user_llm.data import families

FAMILY = families.MOVIELENS

TASK_NAMES = common.register_family(FAMILY)
