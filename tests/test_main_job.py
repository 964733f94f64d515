"""The main job and the experiment runner: stage commands, and one tiny end-to-end main job on
ml-latest-small with the real SmolLM2-135M (phase 1, phase 2, evaluation of every system)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import seqio
from conftest import REPO_ROOT, run_module

from user_llm import experiments as ex
from user_llm import gin_utils


@pytest.mark.parametrize("study", sorted(ex.STUDIES))
@pytest.mark.parametrize("dataset", ["movielens", "amazon_reviews"])
def test_every_study_stage_names_existing_gin_files_and_registered_tasks(study, dataset, tmp_path):
    import tasks.amazon_reviews  # noqa: F401
    import tasks.movielens  # noqa: F401
    import tasks.smollm2  # noqa: F401

    names = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
    for v in ex.STUDIES[study]:
        plan = ex.stages(v, dataset, tmp_path, ex.Budget())
        assert plan[0].name == "import_llm" and plan[0].shared and not plan[-1].shared
        for stage in plan:
            name, args, done = stage.name, stage.args, stage.done
            assert str(done).startswith(str(tmp_path)), (name, done)
            files = [a.split("=", 1)[1] for a in args if a.startswith("--gin_file=")]
            bindings = [a[len("--gin.") :] for a in args if a.startswith("--gin.")]
            paths = list(gin_utils.DEFAULT_SEARCH_PATHS)
            assert gin_utils.unused_macros(files, bindings, paths) is None, (name, v.name)
            for arg in args:
                if arg.startswith("--gin_file="):
                    assert (REPO_ROOT / "gin" / arg.split("=", 1)[1]).is_file(), arg
                if arg.startswith(("--tasks=", "--gin.MIXTURE_OR_TASK_NAME=")):
                    for t in arg.split("=", 1)[1].strip('"').split(","):
                        assert t in names, (study, v.name, t)


@pytest.mark.slow
def test_tiny_main_job_end_to_end_with_smollm2(tmp_path):
    # Few users: User-LLM is evaluated three times (real, shuffled, no user) and the text
    # prompt reads ~800 tokens a user; the whole job still runs every stage for real.
    args = ["-m", "user_llm.main_job", f"--model_dir={tmp_path}", "--encoder_steps=20",
            "--user_llm_steps=2", "--eval_examples=4", "--tp_eval_examples=2",
            "--history_length=20"]  # fmt: skip
    out = run_module(args, timeout=1800).stdout
    assert re.search(r"step 2: .*train/loss=", out)  # phase-2 progress is printed
    assert "steps, ~" in out and "examples_per_sec" in out and "gate_tanh/max_abs" in out
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["results"]
    user_llm = ex.XATTN.name
    tp = "TP, frozen SmolLM2 (zero-shot, chat template)"
    user_llm_rows = {user_llm, f"{user_llm}: shuffled user", f"{user_llm}: no user"}
    llm_rows = user_llm_rows | {tp}
    assert llm_rows < set(rows), sorted(rows)
    rules = [r for r in rows if r.endswith("(all test users)")]
    assert "Popularity (all test users)" in rules and len(rules) == 3, rules
    for system, row in rows.items():
        for cell in row.values():
            low, high = cell["ci95"]
            assert 0.0 <= low <= cell["value"] <= high <= 100.0
            # User-LLM on the first 4 users, TP on the first 2; the encoder head and the rules
            # on all of them.
            want = 4 if system in user_llm_rows else 2 if system == tp else None
            assert want is None and cell["num_examples"] > 100 or cell["num_examples"] == want

    assert "Recall@5" in rows[user_llm] and "Fav. genre acc. (ranked)" in rows[user_llm]
    assert "Full-catalogue Recall@10" in rows["AR encoder's next-item head"]
    # Each control, and each rule on the same users (popularity ranks the same candidates).
    compared = sorted(results["paired"][user_llm])
    assert {"shuffled user", "no user", "Popularity (same users)"} < set(compared), compared
    assert any(c.startswith("Majority genre (") for c in compared), compared
    assert "NDCG@10" in results["paired"][user_llm]["Popularity (same users)"]
    assert "gate_tanh/max_abs" in results["diagnostics"][user_llm]
    # Every evaluated example's target, answer and metrics, real and under each control.
    records = [
        json.loads(line)
        for path in (tmp_path / "movielens" / "eval").glob("user_llm_*.predictions.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert len(records) == 8, len(records)  # 4 users x (next item, favourite genre)
    assert {"target", "generated", "metrics", "controls"} <= set(records[0])
    assert set(records[0]["controls"]) == {"shuffled_user", "no_user"}
    # The encoder head's too (every test user), so two encoders can be paired on the same users.
    (head,) = (tmp_path / "movielens" / "eval").glob("encoder_*.predictions.jsonl")
    head_records = [json.loads(line) for line in head.read_text().splitlines()]
    assert len(head_records) == rows["AR encoder's next-item head"]["Recall@5"]["num_examples"]
    assert head_records[0]["target"] and "ndcg@10" in head_records[0]["metrics"]
    text = (tmp_path / "results.md").read_text()
    assert "| Popularity (all test users) |" in text and "Paired differences" in text
    assert list((tmp_path / "summaries" / "results").glob("events.out.tfevents.*"))
    # A second run finds every stage done and only rebuilds the report.
    again = run_module(args, timeout=1800).stdout
    assert again.count("skipped") >= 5 and "step 2:" not in again


def test_a_different_budget_never_reuses_another_budgets_folders(tmp_path):
    """Steps, seed and eval size name the folders they made: a run with another budget must not
    resume from (or be skipped as) the default one, while the default keeps its names."""
    v = ex.XATTN
    default = ex.stages(v, "movielens", tmp_path, ex.Budget())
    for changed in (
        ex.Budget(steps=450),
        ex.Budget(seed=1),
        ex.Budget(encoder_steps=20),
        dataclasses.replace(ex.Budget(), eval_examples=128),
    ):
        plan = ex.stages(v, "movielens", tmp_path, changed)
        assert plan[-1].done != default[-1].done, changed  # the eval JSON
        if changed.eval_examples == ex.Budget().eval_examples:
            assert plan[-2].done.parent.parent != default[-2].done.parent.parent, changed
    longer = ex.stages(dataclasses.replace(v, steps=450), "movielens", tmp_path, ex.Budget())
    assert longer[-2].done == ex.stages(v, "movielens", tmp_path, ex.Budget(steps=450))[-2].done
    assert "--gin.TRAIN_STEPS=450" in longer[-2].args
    assert default[-2].done.parent.parent.name == ex.run_name(v)  # defaults: names unchanged


def test_a_rerun_study_keeps_the_hand_written_notes(tmp_path):
    path = tmp_path / "study.md"
    ex.write_keeping_notes(path, "# tables v1\n")
    path.write_text(path.read_text() + "\nWhat the sweep supports: ...\n")
    ex.write_keeping_notes(path, "# tables v2\n")
    text = path.read_text()
    assert text.startswith("# tables v2\n") and "v1" not in text
    assert text.endswith(ex.NOTES_MARKER + "\n\nWhat the sweep supports: ...\n")


def test_rows_selects_study_rows_in_order_and_refuses_unknown_ones():
    study = ex.STUDIES["perceiver"]
    assert ex.select_rows(study, "") == study
    assert [v.name for v in ex.select_rows(study, "3,1")] == [study[0].name, study[2].name]
    for bad in ("0", f"{len(study) + 1}", "x", ","):
        with pytest.raises(SystemExit, match="--rows"):
            ex.select_rows(study, bad)


def test_commands_section_lines_run_as_pasted_in_a_shell(tmp_path):
    import shlex

    root = tmp_path / "movielens"
    text = ex.commands_section([ex.XATTN], "movielens", root, ex.Budget(), "runs/exp/movielens")
    lines = [ln.strip().strip("`") for ln in text.splitlines() if ln.strip().startswith("`")]
    stages = ex.stages(ex.XATTN, "movielens", root, ex.Budget())
    stages = [s for s in stages if s.name != "import_llm"]  # the encoder, the run, the eval
    assert len(lines) == len(stages) == 3
    for line, stage in zip(lines, stages, strict=True):
        # What a shell hands the program is the stage's own argument list (quotes included).
        want = [a.replace(str(root), "runs/exp/movielens") for a in stage.args]
        assert shlex.split(line) == ["python", *want], line


def test_later_systems_are_paired_with_the_first_on_the_same_examples(tmp_path):
    first, second = ex.Variant("A"), ex.Variant("B", encoder="titles")
    other_length = ex.Variant("C", history_length=20)
    head = ex.Variant("head", kind="encoder")
    name = ex.task("movielens", "next_item", "userllm", 50)
    hits = {"A": [1, 0, 0, 1], "B": [1, 1, 0, 1], "C": [0, 0, 0, 0], "head": [1, 1, 1, 1]}
    ran = {}
    for v in (first, second, other_length, head):
        # A has an item head too; the encoder head ranks by its own scores (plain names).
        extra = {"A": "item_head_recall@5", "head": "recall@5"}.get(v.name, "unused")
        # The encoder head reads the byte-vocabulary task: the same examples, no LLM suffix.
        named = name.removesuffix(ex.SUFFIX) if v is head else name
        lines = [json.dumps({"task": named, "index": i, "metrics": {"recall@1_norm": h, extra: h}})
                 for i, h in enumerate(hits[v.name])]  # fmt: skip
        lines.append(json.dumps({"task": name, "index": 9, "metrics": {"recall@1_norm": 1}}))
        (tmp_path / f"{v.name}.predictions.jsonl").write_text("\n".join(lines[: 4 + (v is first)]))
        ran[v.name] = {"eval": f"{v.name}.json"}
    old_eval = ex.Variant("D", encoder="late")  # evaluated before predictions files existed
    ran["D"] = {"eval": "D.json"}
    variants = [first, second, other_length, head, old_eval]
    paired = ex.versus_first_system(ran, variants, "movielens", tmp_path)
    # Another history length reads other examples; a lone head has no later head to pair.
    assert sorted(paired) == ["A", "B"] and list(paired["B"]) == ["A (same users)"]
    diff, low, high = paired["B"]["A (same users)"]["Recall@1"]
    assert diff == pytest.approx(25.0) and low <= diff <= high  # index 9: A alone, not paired
    # A's item head against the encoder head, on the same 4 users: (2 - 4) / 4 hits.
    assert list(paired["A"]) == ["head (same users)"]
    assert list(paired["A"]["head (same users)"]) == ["Item head: Recall@5"]
    assert paired["A"]["head (same users)"]["Item head: Recall@5"][0] == pytest.approx(-50.0)


def test_user_llm_is_paired_with_text_prompts_on_the_same_targets_only(tmp_path):
    """User-LLM (title ranking and item head) minus TP's title ranking, over the examples both
    read: different task forms of the same users, so the targets must agree example by
    example, and a mismatch is refused rather than paired."""
    user_llm, tp = ex.Variant("U"), ex.Variant("T", kind="tp_frozen", form="tpchat")
    hits = {"U": [1, 0, 1, 0], "T": [0, 0, 1, 1]}
    items = [1, 1, 1, 0]  # U's item head
    ran = {}

    def write(v, targets):
        name = ex.task("movielens", "next_item", v.form, 50)
        lines = []
        for i, (h, t) in enumerate(zip(hits[v.name], targets, strict=True)):
            metrics = {"recall@5_norm": h, "recall@5": 1 - h}  # TP's summed score: not paired
            if v is user_llm:
                metrics["item_head_recall@5"] = items[i]
            lines.append(json.dumps({"task": name, "index": i, "target": t, "metrics": metrics}))
        (tmp_path / f"{v.name}.predictions.jsonl").write_text("\n".join(lines))
        ran[v.name] = {"eval": f"{v.name}.json"}

    write(user_llm, ["a", "b", "c", "d"])
    write(tp, ["a", "b", "c", "d"])
    paired = ex.versus_first_system(ran, [user_llm, tp], "movielens", tmp_path)
    assert list(paired) == ["U"] and list(paired["U"]) == ["T (same users)"]
    diffs = paired["U"]["T (same users)"]
    assert sorted(diffs) == ["Item head: Recall@5", "Recall@5"]
    assert diffs["Recall@5"][0] == pytest.approx(0.0)  # (2 - 2) / 4, headline scores
    assert diffs["Item head: Recall@5"][0] == pytest.approx(25.0)  # (3 - 2) / 4
    write(tp, ["a", "b", "x", "d"])
    with pytest.raises(ValueError, match="do not have the same targets"):
        ex.versus_first_system(ran, [user_llm, tp], "movielens", tmp_path)
