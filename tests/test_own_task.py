"""A researcher's own task, end to end through the CLIs, from a module outside the repository:
``--module_import``, phase 1 (the user encoder), phase 2 (User-LLM on the task, from that
encoder), ``evaluate`` with the task's own metric_fns and ``generate`` on one example."""

from __future__ import annotations

import json
import re
import textwrap

import pytest
from conftest import run_module

from user_llm.data import families

TASK = "movielens_likes_next_userllm_h20"
MODULE = textwrap.dedent(
    '''
    """Will the user rate the next movie 4 stars or more? (the README's example task)"""
    import numpy as np
    import seqio
    import tensorflow as tf

    from tasks import common, movielens
    from user_llm import metrics
    from user_llm.data import families, features

    HISTORY_LENGTH = 20


    def likes_next_fn(split, shuffle_files, seed=None):
        data = families.family_task_data(movielens.FAMILY, HISTORY_LENGTH)
        examples = data.histories.splits[split]
        n = len(examples["user_index"])
        return tf.data.Dataset.from_tensor_slices(
            {
                "inputs": ["Will this user like the next movie?"] * n,
                "targets": np.where(examples["target_rating"] >= 4.0, "yes", "no").tolist(),
                **features.user_arrays(examples),
            }
        )


    def answer_rates(targets, predictions):
        """Our own metric: how often the model and the data say yes."""
        return {
            "predicted_yes": float(np.mean([p == "yes" for p in predictions])),
            "target_yes": float(np.mean([t == "yes" for t in targets])),
        }


    vocabulary = seqio.ByteVocabulary()
    seqio.TaskRegistry.add(
        "movielens_likes_next_userllm_h20",
        source=seqio.FunctionDataSource(likes_next_fn, splits=common.SPLITS),
        preprocessors=[common.tokenize_text, seqio.preprocessors.append_eos_after_trim],
        output_features={
            "inputs": seqio.Feature(vocabulary, add_eos=True),
            "targets": seqio.Feature(vocabulary, add_eos=True),
            **common.user_output_features(),
        },
        metric_fns=[metrics.exact_match, answer_rates],
    )
    '''
)


@pytest.mark.slow
def test_own_task_trains_and_evaluates_with_its_own_metrics(tmp_path):
    project = tmp_path / "my_project"
    project.mkdir()
    (project / "my_tasks.py").write_text(MODULE)
    env = {"PYTHONPATH": str(project)}
    # Phase 1: the user encoder pretrained on the same histories (history 20).
    encoder_dir = tmp_path / "encoder"
    run_module(
        ["-m", "user_llm.train", "--gin_file=experiments/encoder_pretrain.gin",
         "--gin_file=datasets/movielens.gin",
         "--gin_file=local_tiny.gin", "--gin.HISTORY_LENGTH=20", "--gin.TRAIN_STEPS=2",
         "--gin.train_lib.train.eval_every_steps=0", f"--gin.MODEL_DIR='{encoder_dir}'"],
        timeout=900,
    )  # fmt: skip
    run_dir = tmp_path / "run"
    gin_args = [
        "--module_import=my_tasks",
        "--gin_file=experiments/user_llm_tiny.gin",
        "--gin_file=datasets/movielens.gin",
        "--gin_file=local_tiny.gin",
        "--gin.HISTORY_LENGTH=20",
        f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 8}",
        "--gin.TRAIN_STEPS=2",
        # Phase 2 from the phase-1 encoder; the tiny LLM from scratch (no LLM checkpoint).
        "--gin.STRATEGY='full'",
        "--gin.train_lib.train.init_checkpoint=[@encoder/train_lib.InitCheckpoint()]",
        "--gin.LLM_CHECKPOINT='unused'",
        f"--gin.ENCODER_CHECKPOINT='{encoder_dir}'",
        "--gin.train_lib.train.eval_every_steps=0",
        f"--gin.MODEL_DIR='{run_dir}'",
    ]
    trained = run_module(["-m", "user_llm.train", *gin_args], env_extra=env, timeout=900)
    warm = re.search(r"Warm start from \S*encoder: (\d+) restored", trained.stdout)
    assert warm and int(warm.group(1)) > 10, trained.stdout[-3000:]
    output = tmp_path / "metrics.json"
    proc = run_module(
        ["-m", "user_llm.evaluate", *gin_args, f"--tasks={TASK}", "--num_examples=10",
         "--batch_size=4", f"--output={output}"],
        env_extra=env,
        timeout=900,
    )  # fmt: skip
    result = json.loads(output.read_text())["tasks"][TASK]
    assert result["n"] == 10, proc.stdout[-2000:]
    got = result["metrics"]
    assert set(got) == {"exact_match", "predicted_yes", "target_yes"}, got
    records = [json.loads(line) for line in output.with_suffix(".predictions.jsonl").open()]
    assert len(records) == 10
    assert {r["target"] for r in records} <= {"yes", "no"}
    # The metrics are computed from exactly these predictions and targets.
    targets = [r["target"] for r in records]
    predicted = [r["generated"].strip() for r in records]
    assert got["target_yes"] == pytest.approx(sum(t == "yes" for t in targets) / 10)
    assert got["predicted_yes"] == pytest.approx(sum(p == "yes" for p in predicted) / 10)
    assert all(isinstance(r["score"], float) and r["score"] <= 0 for r in records)

    # A personalized answer on one example: the same example evaluation read at that index.
    shown = run_module(
        ["-m", "user_llm.generate", *gin_args, f"--task={TASK}", "--example_index=2"],
        env_extra=env,
        timeout=900,
    )
    lines = dict(ln.split(": ", 1) for ln in shown.stdout.splitlines() if ": " in ln)
    assert lines["question"] == "Will this user like the next movie?", shown.stdout
    assert lines["target"] == records[2]["target"], (lines, records[2])
    assert lines["history"].endswith("interactions") and int(lines["history"].split()[0]) > 0
    assert lines["answer"].strip() == records[2]["generated"].strip()


def test_an_unregistered_task_is_one_line_naming_module_import(tmp_path):
    proc = run_module(
        ["-m", "user_llm.evaluate", "--gin_file=experiments/movielens_titles_lm.gin",
         "--gin_file=local_tiny.gin", f"--gin.MODEL_DIR='{tmp_path}'", "--tasks=not_a_task_xyz"],
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR: ")]
    assert len(errors) == 1 and "not_a_task_xyz" in errors[0] and "--module_import" in errors[0]


def test_built_in_example_shows_recent_titles_and_has_a_text_prompt_twin():
    import numpy as np

    import tasks.movielens  # noqa: F401
    import tasks.smollm2  # noqa: F401
    from tasks import common
    from user_llm import personalized

    twin = personalized.text_prompt_twin("movielens_next_item_userllm_h50_smollm2")
    assert twin == "movielens_next_item_tpchat_h50_smollm2"
    assert personalized.text_prompt_twin(TASK) is None
    task = "movielens_next_item_userllm_h20"
    raw = personalized.raw_example(task, {"inputs": 64, "targets": 64}, "test", 3)
    shown = personalized.history_in_short(task, raw)
    info = common.task_info(task)
    h = families.family_task_data(info.family, info.history_length).histories
    test = h.splits["test"]
    n = int(np.asarray(test["user_mask"][3]).sum())
    newest = h.item_titles[test["user_item_index"][3][n - 1]]
    assert shown.startswith(f"{n} interactions; most recent first: {newest};"), (shown, newest)
    with pytest.raises(Exception, match="no 'test' example at that index"):
        personalized.raw_example(task, {"inputs": 64, "targets": 64}, "test", 10**6)
