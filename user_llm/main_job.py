r"""The main job: User-LLM on a frozen SmolLM2-135M versus text prompting, on ml-latest-small.

  python -m user_llm.main_job --model_dir=runs/main

Runs offline on a laptop CPU (the data and the LLM are bundled), each stage in its own process
with its output under ``model_dir/movielens`` (a finished stage is skipped, so a killed job
resumes where it stopped):

1. ``smollm2/``: import the packaged SmolLM2-135M-Instruct GGUF (``user_llm.import_checkpoint``).
2. ``encoder_ar_h50/``: phase 1, the AR user encoder pretrained on next-movie prediction
   (``experiments/encoder_pretrain.gin`` with ``datasets/movielens.gin``).
3. ``user_llm_.../``: phase 2, User-LLM with the LLM and the phase-1 encoder frozen (Proj
   strategy): gated cross-attention in every 6th layer over the encoder's 50 output vectors,
   each block's output scaled to the residual stream's RMS, the integration at 10x the base
   learning rate, trained on next movie + favorite genre: the recipe of
   ``results/phase2_recipe.md`` (``experiments.RECIPE``). An item head (an extension, not in
   the paper) also scores the LLM's answer-position state against every movie with the
   encoder's own next-item head (``models/integration/item_head.gin``): its full-catalogue loss
   is what made next-movie answers depend on the user (sweep row 11).
4. ``eval/``: User-LLM on the first ``--eval_examples`` test users, with its shuffled-user and
   no-user controls (paired intervals); the frozen SmolLM2 reading the history as text in its
   chat template (TP, zero-shot) on the same users; the encoder's own next-item head and the
   rules (popularity, majority genre, the window's most frequent genre) on every test user
   (``user_llm.evaluate``). With ``--tp_lora_steps`` > 0 also TP + LoRA trained for that many
   steps: its prompts are ~100x longer than User-LLM's (~1,600 tokens at 50 items), so at
   equal steps it does not fit the main job's CPU budget and is off by default.

Prints the results table and writes ``results.json``, ``results.md`` and TensorBoard summaries
(``summaries/results``) into ``model_dir``; stage logs (stderr) go to ``model_dir/*/logs``.
Every stage is also a command of its own (``user_llm.experiments`` prints each one).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import flags

from user_llm import experiments as ex

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Flags of the entry point only, so importing this module defines none."""
    flags.DEFINE_string("model_dir", None, "Where every stage writes its output.", required=True)
    flags.DEFINE_integer("history_length", 50, "Interactions per user history (20, 50, 100, 200).")
    flags.DEFINE_integer("encoder_steps", 1000, "Phase-1 steps (batch 32).")
    flags.DEFINE_integer("user_llm_steps", 150, "Phase-2 steps (batch 16).")
    flags.DEFINE_integer("tp_lora_steps", 0, "Steps of the TP + LoRA baseline (0: leave it out).")
    flags.DEFINE_integer("eval_examples", 64, "Test users evaluated per task (0: all 610).")
    flags.DEFINE_integer(
        "tp_eval_examples",
        8,
        "Test users for the text-prompt systems (the first of the same users): "
        "their ~1,600-token prompts cost ~30 s per user and task on a 2-core CPU, "
        "~100x User-LLM's.",
    )


DATASET = "movielens"


def variants(history_length: int, with_tp_lora: bool) -> list[ex.Variant]:
    systems = [
        ex.XATTN,
        ex.Variant(
            "TP, frozen SmolLM2 (zero-shot, chat template)", kind="tp_frozen", form="tpchat"
        ),
        ex.Variant("AR encoder's next-item head", kind="encoder"),
    ]
    if with_tp_lora:
        systems.insert(1, ex.Variant("TP + LoRA", kind="tp_lora", form="tp"))
    return [dataclasses.replace(v, history_length=history_length) for v in systems]


def write_summaries(log_dir: Path, rows: dict[str, dict[str, Any]]) -> None:
    """One TensorBoard scalar per (system, metric), at step 0."""
    from tensorboard.summary import Writer  # writes event files without TensorFlow

    writer = Writer(str(log_dir))
    for system, row in rows.items():
        tag = "".join(c if c.isalnum() else "_" for c in system.split(" (")[0]).strip("_")
        for column, v in row.items():
            metric = "".join(c if c.isalnum() or c == "@" else "_" for c in column).strip("_")
            writer.add_scalar(f"{tag}/{metric}", v["value"], step=0)
    writer.close()


def main(argv: Sequence[str]) -> None:
    del argv
    model_dir = Path(FLAGS.model_dir).resolve()
    root = model_dir / DATASET
    budget = ex.Budget(
        FLAGS.encoder_steps,
        FLAGS.user_llm_steps,
        FLAGS.eval_examples,
        text_prompt_eval_examples=FLAGS.tp_eval_examples,
    )
    systems = variants(FLAGS.history_length, FLAGS.tp_lora_steps > 0)
    start = time.time()
    ran = {}
    for v in systems:  # TP + LoRA trains for its own number of steps
        steps = FLAGS.tp_lora_steps if v.kind == "tp_lora" else budget.steps
        ran.update(ex.run_variants([v], DATASET, root, dataclasses.replace(budget, steps=steps)))
    tables = ex.collect(ran, systems, DATASET, root)
    rows = tables["rows"]
    n = FLAGS.eval_examples or "all"
    text = (
        f"# Main job: User-LLM vs text prompt on ml-latest-small, {FLAGS.history_length} items\n\n"
        f"LLM systems on the first {n} test users per task, the encoder head and the rules on all "
        "test users (n per row); percent with 95% bootstrap intervals. "
        + ex.PROTOCOL
        + " A User-LLM figure shows the model uses the user only where it beats its "
        "shuffled-user control (the paired interval excludes 0).\n\n" + ex.report(tables) + "\n"
    )
    print("\n" + text, flush=True)
    (model_dir / "results.md").write_text(text)
    results = {
        "flags": {
            k: FLAGS[k].value
            for k in (
                "history_length",
                "encoder_steps",
                "user_llm_steps",
                "tp_lora_steps",
                "eval_examples",
                "tp_eval_examples",
            )
        },
        "results": rows,
        "paired": tables["paired"],
        "diagnostics": tables["diagnostics"],
        "stage_seconds": {k: v["seconds"] for k, v in ran.items()},
        "wall_seconds": round(time.time() - start, 1),
        "machine": ex.machine(),
    }
    (model_dir / "results.json").write_text(json.dumps(results, indent=1))
    write_summaries(model_dir / "summaries" / "results", rows)
    print(
        f"Wrote {model_dir}/results.json, results.md, summaries/results "
        f"({results['wall_seconds']:.0f} s)"
    )


if __name__ == "__main__":
    from user_llm import gin_utils

    _define_flags()
    gin_utils.run_main(main)
