"""Every family's User-LLM tasks tokenized for SmolLM2-135M, plus per-form mixtures.

Import it from a gin file (``import tasks.smollm2``) to get, for each family, history length and
form, the tasks ``{dataset}_{task}_{form}_h{L}_smollm2`` (same examples as the byte-vocabulary
tasks, BPE-tokenized with the packaged GGUF's tokenizer) and the mixture
``{dataset}_{form}_h{L}_smollm2`` of next-item and favorite-genre (equal rates), which the main
job trains one model on.
"""

from __future__ import annotations

import seqio

import tasks
from tasks import common
from user_llm import vocabularies
from user_llm.convert.common import packaged_gguf

SUFFIX = "_smollm2"
VOCABULARY = vocabularies.ByteLevelBPEVocabulary(packaged_gguf())
TASK_NAMES = tasks.register_tasks(VOCABULARY, SUFFIX)


def mixture_name(dataset: str, form: str, history_length: int) -> str:
    return f"{dataset}_{form}_h{history_length}{SUFFIX}"


def _register_mixtures() -> list[str]:
    names = []
    for name, info in list(common.TASK_INFO.items()):
        if not name.endswith(SUFFIX) or info.task != "next_item":
            continue
        family = info.family
        mixture = mixture_name(family.name, info.form, info.history_length)
        favorite = common.task_name(
            family.name, family.favorite_name, info.form, info.history_length, SUFFIX
        )
        names.append(mixture)
        if mixture not in seqio.MixtureRegistry.names():
            seqio.MixtureRegistry.add(mixture, [name, favorite], default_rate=1.0)
    return names


MIXTURE_NAMES = _register_mixtures()
