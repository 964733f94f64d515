"""One personalized answer, shown: a training run's model on one example of a task.

Used by ``python -m user_llm.generate --gin_file=... --task=... --example_index=...`` (see its
docstring). Reads the example through the run's own SeqIO task and feature converter (so it is
exactly what evaluation reads), prints the user's history in short, the question, the target,
the model's greedy answer, and optionally a text-prompt (TP) model's answer on the same user.
TensorFlow enters here through the data pipeline; the plain text path of ``generate`` stays
free of it.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import numpy as np

from user_llm import errors
from user_llm.data import families, pipeline

SHOWN_ITEMS = 5  # the most recent history items printed by title


def raw_example(task: str, feature_lengths: dict[str, int], split: str, index: int) -> dict:
    """Example ``index`` of the split as the task gives it (token ids, user arrays), before
    the feature converter; the same order as ``converted_example``."""
    import seqio

    ds = seqio.get_mixture_or_task(task).get_dataset(
        sequence_length=dict(feature_lengths), split=split, shuffle=False, num_epochs=1
    )
    for example in ds.skip(index).take(1).as_numpy_iterator():
        return dict(example)
    raise errors.ConfigError(
        f"--example_index={index}: task {task!r} has no {split!r} example at that index "
        "(indices start at 0)"
    )


def converted_example(
    task: str, feature_lengths: dict[str, int], converter: str, split: str, index: int
) -> dict[str, np.ndarray]:
    """Example ``index`` as a batch of one, through the run's feature converter."""
    batches = pipeline.batches_in_order(task, feature_lengths, split, 1, converter)
    for batch in itertools.islice(batches, index, index + 1):
        return batch
    raise errors.ConfigError(
        f"--example_index={index}: task {task!r} has no such {split!r} example"
    )


def history_in_short(task: str, example: dict) -> str:
    """'N interactions; most recent: title, ...' for built-in tasks (titles from the family's
    histories), the number of interactions for any other task with ``user_mask``."""
    from tasks import common

    if "user_mask" not in example:
        return "(this task gives the model no user history)"
    mask = np.asarray(example["user_mask"]).astype(bool)
    n = int(mask.sum())
    if not common.is_user_llm_task(task):
        return f"{n} interactions"
    info = common.task_info(task)
    h = families.family_task_data(info.family, info.history_length).histories
    tokens = h.vocabularies["item"].tokens
    ids = np.asarray(example["user_item_ids"])[mask][-SHOWN_ITEMS:]
    names = []
    for i in ids[::-1]:  # most recent first
        item = str(tokens[i]) if 0 <= i < len(tokens) else "<oov>"
        where = np.searchsorted(h.item_ids, item)
        found = where < len(h.item_ids) and h.item_ids[where] == item
        names.append(str(h.item_titles[where]) if found and h.item_titles[where] else item)
    return f"{n} interactions; most recent first: " + "; ".join(names)


def text_prompt_twin(task: str) -> str | None:
    """The chat-template text-prompt task on the same examples as a built-in User-LLM task."""
    from tasks import common

    if not common.is_user_llm_task(task):
        return None
    info = common.task_info(task)
    label = info.family.task_label(info.task)
    base = common.task_name(info.family.name, label, info.form, info.history_length)
    if not task.startswith(base):
        return None
    twin = (
        common.task_name(info.family.name, label, "tpchat", info.history_length) + task[len(base) :]
    )
    return twin if common.is_user_llm_task(twin) else None


def answer(model: Any, params: Any, batch: dict[str, np.ndarray], max_decode_length: int):
    """The model's greedy continuation of the batch's prompt (token ids, up to EOS)."""
    out = jax.jit(lambda p, b: model.predict_batch(p, b, max_decode_length=max_decode_length))(
        params, batch
    )
    ids = [int(t) for t in np.asarray(out)[0]]
    eos = getattr(model, "eos_id", 1)
    return ids[: ids.index(eos)] if eos in ids else ids


def _decode(vocab: Any, ids: Any) -> str:
    return vocab.decode([int(t) for t in ids if int(t) > 1])


def show(
    model: Any,
    params: Any,
    task: str,
    feature_lengths: dict[str, int],
    converter: str,
    split: str,
    index: int,
    tp: tuple[Any, Any, Any] | None = None,
) -> dict[str, str]:
    """The example's history in short, question, target and answers (also printed).

    ``tp``: (DecoderConfig, params, tokenizer) of an imported LLM; it answers the chat-template
    text-prompt twin of the task for the same example."""
    import seqio

    vocab = seqio.get_mixture_or_task(task).output_features["targets"].vocabulary
    raw = raw_example(task, feature_lengths, split, index)
    batch = converted_example(task, feature_lengths, converter, split, index)
    shown = {
        "task": f"{task} ({split}, example {index})",
        "history": history_in_short(task, raw),
        "question": _decode(vocab, raw.get("inputs", [])),
        "target": _decode(vocab, raw["targets"]),
        "answer": vocab.decode(answer(model, params, batch, feature_lengths["targets"])),
    }
    if tp is not None:
        shown["text-prompt answer"] = _tp_answer(task, feature_lengths, split, index, tp)
    for key, value in shown.items():
        print(f"{key}: {value}")
    return shown


def _tp_answer(task: str, feature_lengths, split: str, index: int, tp) -> str:
    from user_llm import generate

    twin = text_prompt_twin(task)
    if twin is None:
        raise errors.ConfigError(
            f"--tp_checkpoint: {task!r} has no chat-template text-prompt twin task (only the "
            "built-in User-LLM tasks have one)"
        )
    cfg, params, tokenizer = tp
    import seqio

    features = seqio.get_mixture_or_task(twin).output_features
    untrimmed = {k: 1 << 16 for k in ("inputs", "targets") if k in features}
    raw = raw_example(twin, untrimmed, split, index)
    prompt = [int(t) for t in raw["inputs"]]
    if prompt and prompt[-1] == tokenizer.eos_id:
        prompt = prompt[:-1]
    # Position 0 holds token 0, as the prefix-LM converter lays out training and evaluation.
    ids = generate.generate_ids(
        cfg,
        params,
        [[0, *prompt]],
        max_decode_length=feature_lengths["targets"],
        eos_id=tokenizer.eos_id,
    )[0]
    return tokenizer.decode(ids, skip_special_tokens=True)
