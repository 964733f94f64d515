"""Every family's User-LLM tasks tokenized for SmolLM2-135M, plus per-form mixtures.

Import it from a gin file (``import tasks.smollm2``) to get, for each family, history length and
form, the tasks ``{dataset}_{task}_{form}_h{L}_smollm2`` (same examples as the byte-vocabulary
tasks, BPE-tokenized with the packaged GGUF's tokenizer) and the mixture
``{dataset}_{form}_h{L}_smollm2`` of next-item, favorite-genre and (where the family has it)
review generation at equal rates, which the main job and the studies train one model on. Each
text-prompt task also comes in the LLM's own chat template, form ``tpchat``
(``{dataset}_{task}_tpchat_h{L}_smollm2``): the prompt as a user turn (with the model's default
system message), the answer as the assistant turn ended by ``<|im_end|>``.
"""

from __future__ import annotations

import dataclasses

import seqio
import tensorflow as tf

import tasks
from tasks import common
from user_llm.convert.common import packaged_gguf
from user_llm.data import bpe_vocabulary

SUFFIX = tasks.SMOLLM2_SUFFIX
VOCABULARY = bpe_vocabulary.ByteLevelBPEVocabulary(packaged_gguf())
TASK_NAMES = tasks.register_tasks(VOCABULARY, SUFFIX)


def mixture_name(dataset: str, form: str, history_length: int) -> str:
    return common.task_name(dataset, None, form, history_length, SUFFIX)


def _register_mixtures() -> list[str]:
    names = []
    for name, info in common.user_llm_tasks().items():
        if not name.endswith(SUFFIX) or info.task != "next_item":
            continue
        family = info.family
        mixture = mixture_name(family.name, info.form, info.history_length)
        favorite = common.task_name(
            family.name, family.favorite_name, info.form, info.history_length, SUFFIX
        )
        members = [name, favorite]
        if "review_gen" in family.tasks:  # review generation trains in the same mixture
            members.append(
                common.task_name(family.name, "review_gen", info.form, info.history_length, SUFFIX)
            )
        names.append(mixture)
        if mixture not in seqio.MixtureRegistry.names():
            seqio.MixtureRegistry.add(mixture, members, default_rate=1.0)
    return names


def _chat_parts() -> tuple[str, str]:
    """(text before, text after) the user's message in the chat template."""
    marker = "\x00"
    rendered = VOCABULARY.tokenizer.apply_chat_template([{"role": "user", "content": marker}])
    before, after = rendered.split(marker)
    return before, after


def _register_chat_tasks() -> list[str]:
    before, after = _chat_parts()

    def to_chat(dataset: tf.data.Dataset) -> tf.data.Dataset:
        return dataset.map(
            lambda ex: {**ex, "inputs": tf.strings.join([before, ex["inputs"], after])}
        )

    names = []
    for name, info in common.user_llm_tasks().items():
        if not name.endswith(SUFFIX) or info.form != "tp":
            continue
        chat = common.task_name(
            info.family.name,
            info.family.task_label(info.task),
            "tpchat",
            info.history_length,
            SUFFIX,
        )
        names.append(chat)
        if chat in seqio.TaskRegistry.names():
            continue
        base = seqio.get_mixture_or_task(name)
        features = dict(base.output_features)
        # The prompt ends with the assistant header: no EOS (<|im_end|>) after it.
        features["inputs"] = seqio.Feature(VOCABULARY, add_eos=False)
        seqio.TaskRegistry.add(
            chat,
            task_cls=common.UserLLMTask,
            info=dataclasses.replace(info, form="tpchat"),
            source=base.source,
            preprocessors=[to_chat, *base.preprocessors],
            output_features=features,
            metric_fns=base.metric_fns,
        )
    return names


CHAT_TASK_NAMES = _register_chat_tasks()
MIXTURE_NAMES = _register_mixtures()  # every form's, the chat-template form included
