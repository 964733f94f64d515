"""SeqIO task registration, one module per dataset family.

Importing this package registers nothing (and imports no TensorFlow); import a family module
(``tasks.movielens``, ``tasks.amazon_reviews``, ``tasks.google_local``, ``tasks.movielens_lm``)
to register its tasks with the byte vocabulary, or call ``register_tasks`` to register every
family's User-LLM tasks with another vocabulary under a name suffix.
"""

from __future__ import annotations

import importlib
from typing import Any

FAMILY_MODULES = ("tasks.movielens", "tasks.amazon_reviews", "tasks.google_local")
# The name suffix of the tasks ``tasks.smollm2`` registers with SmolLM2's tokenizer (defined here,
# where the experiment runner can read it without importing TensorFlow).
SMOLLM2_SUFFIX = "_smollm2"


def register_tasks(vocabulary: Any, name_suffix: str = "") -> list[str]:
    """Registers every family's User-LLM tasks with ``vocabulary`` (a ``seqio.Vocabulary``),
    named ``{dataset}_{task}_{form}_h{L}{name_suffix}`` (e.g. suffix ``"_smollm2"``)."""
    from tasks import common  # imports TensorFlow: only when tasks are registered

    names: list[str] = []
    for module in FAMILY_MODULES:
        family = importlib.import_module(module).FAMILY
        names += common.register_family(family, vocabulary, name_suffix)
    return names
