"""The two-phase User-LLM pipeline on real ml-latest-small, every phase a ``user_llm.train`` run
composed from gin files: a tiny byte-level "LLM", phase-1 encoder pretraining (which must beat
the popularity baseline on held-out last items), and phase-2 finetuning under several
integration modes and strategies."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_module

from user_llm import checkpoints

pytestmark = pytest.mark.slow

TRAIN = ["-m", "user_llm.train"]


@pytest.fixture(scope="module")
def phases(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_phase")
    lm, enc = root / "lm", root / "enc"
    run_module(
        [*TRAIN, "--gin_file=experiments/movielens_titles_lm.gin", "--gin_file=local_tiny.gin",
         f"--gin.MODEL_DIR='{lm}'", "--gin.TRAIN_STEPS=20"]
    )  # fmt: skip
    run_module(
        [*TRAIN, "--gin_file=experiments/encoder_pretrain.gin",
         "--gin_file=datasets/movielens.gin",
         f"--gin.MODEL_DIR='{enc}'", "--gin.TRAIN_STEPS=300",
         "--gin.train_lib.train.eval_every_steps=0"]
    )  # fmt: skip
    return root, lm, enc


def test_phase1_encoder_beats_popularity_on_held_out_last_items(phases):
    _, _, enc = phases
    proc = run_module(
        ["-m", "user_llm.encoder_eval", "--gin_file=experiments/encoder_pretrain.gin",
         "--gin_file=datasets/movielens.gin",
         f"--gin.MODEL_DIR='{enc}'", "--split=test", "--k=10"]
    )  # fmt: skip
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["num_examples"] > 500  # ml-latest-small has 610 users
    assert result["encoder_recall@10"] > result["popularity_recall@10"]
    assert result["encoder_ndcg@10"] > result["popularity_ndcg@10"]
    mean = run_module(
        ["-m", "user_llm.encoder_eval", "--gin_file=experiments/encoder_pretrain.gin",
         "--gin_file=datasets/movielens.gin",
         f"--gin.MODEL_DIR='{enc}'", "--split=test", "--k=10", "--pooling=mean"]
    )  # fmt: skip
    mean = json.loads(mean.stdout.strip().splitlines()[-1])
    assert (mean["pooling"], mean["num_examples"]) == ("mean", result["num_examples"])


def _finetune(root, lm, enc, name, *extra):
    out = root / name
    proc = run_module(
        [*TRAIN, "--gin_file=experiments/user_llm_tiny.gin",
         "--gin_file=datasets/movielens.gin", *extra,
         f"--gin.MODEL_DIR='{out}'", f"--gin.LLM_CHECKPOINT='{lm}'",
         f"--gin.ENCODER_CHECKPOINT='{enc}'", "--gin.TRAIN_STEPS=6", "--gin.BATCH_SIZE=4",
         "--gin.train_lib.train.eval_every_steps=0", "--gin.train_lib.train.log_every_steps=6",
         "--gin.train_lib.train.save_every_steps=6"]
    )  # fmt: skip
    assert "step 6:" in proc.stdout
    return checkpoints.read_params(out)


def test_phase2_cross_attention_enc_strategy_keeps_the_llm_frozen(phases):
    root, lm, enc = phases
    params = _finetune(root, lm, enc, "xattn_enc")
    llm = checkpoints.read_params(lm)
    for name, value in llm.items():
        np.testing.assert_array_equal(params[f"decoder/{name}"], value, err_msg=name)
    gates = [v for k, v in params.items() if k.endswith("context_block/gate")]
    assert len(gates) == 2 and all(float(g) != 0.0 for g in gates)
    encoder = checkpoints.read_params(enc)
    changed = [
        k for k, v in encoder.items()
        if f"user_encoder/{k}" in params and not np.array_equal(params[f"user_encoder/{k}"], v)
    ]  # fmt: skip
    assert changed  # Enc trains the encoder


def test_phase2_soft_prompt_perceiver_lora(phases):
    root, lm, enc = phases
    params = _finetune(
        root, lm, enc, "soft_lora",
        "--gin_file=models/integration/soft_prompt.gin",
        "--gin_file=models/integration/perceiver.gin",
        "--gin.decoder.DecoderConfig.lora_rank=4", "--gin.STRATEGY='lora'",
    )  # fmt: skip
    llm = checkpoints.read_params(lm)
    assert any(k.startswith("perceiver/") for k in params)
    assert not any("context_block" in k for k in params)
    lora_b = [v for k, v in params.items() if k.endswith("lora_b")]
    assert lora_b and any(np.any(v != 0) for v in lora_b)  # adapters trained from zero
    np.testing.assert_array_equal(
        params["decoder/layers_0/mlp/wi_0/kernel"], llm["layers_0/mlp/wi_0/kernel"]
    )


def test_phase2_proj_strategy_with_dual_encoder(phases):
    root, lm, _ = phases
    dual = root / "dual"
    run_module(
        [*TRAIN, "--gin_file=experiments/encoder_pretrain.gin",
         "--gin_file=datasets/movielens.gin",
         "--gin_file=models/user_encoder/dual.gin", f"--gin.MODEL_DIR='{dual}'",
         "--gin.TRAIN_STEPS=10", "--gin.train_lib.train.eval_every_steps=0"]
    )  # fmt: skip
    params = _finetune(
        root, lm, dual, "dual_proj", "--gin_file=models/user_encoder/dual.gin",
        "--gin.STRATEGY='proj'",
    )  # fmt: skip
    encoder = checkpoints.read_params(dual)
    for k, v in encoder.items():
        if f"user_encoder/{k}" in params:
            np.testing.assert_array_equal(params[f"user_encoder/{k}"], v, err_msg=k)


def test_item_head_refit_on_real_users_matches_evaluate_and_lowers_held_out_loss(phases):
    """The refit diagnostic on a tiny Proj run with the item head: its trained-head row equals
    what ``user_llm.evaluate`` reports for the same test users, and the refit lowers the item
    cross entropy of held-out train users."""
    root, lm, enc = phases
    _finetune(
        root, lm, enc, "item_head", "--gin_file=models/integration/item_head.gin",
        "--gin.STRATEGY='proj'",
    )  # fmt: skip
    run = root / "item_head"
    task = "movielens_next_item_userllm_h50"
    refit = run_module(
        ["-m", "user_llm.item_head_refit", f"--gin_file={run / 'config.gin'}", f"--task={task}",
         "--train_examples=80", "--test_examples=16", "--refit_steps=30", "--batch_size=8",
         "--learning_curve", "--mlp_hidden=32", f"--output={root / 'refit.json'}"]
    )  # fmt: skip
    result = json.loads((root / "refit.json").read_text())
    assert json.loads(refit.stdout.strip().splitlines()[-1])["refit"] == result["refit"]
    assert (result["num_train"], result["num_heldout"], result["num_test"]) == (72, 8, 16)
    assert result["refit"]["heldout_ce"] <= result["refit"]["heldout_ce_start"]
    assert result["refit"]["train_ce"] < result["refit"]["train_ce_start"]
    proc = run_module(
        ["-m", "user_llm.evaluate", f"--gin_file={run / 'config.gin'}", f"--tasks={task}",
         "--num_examples=16", "--controls=", "--batch_size=8"]
    )  # fmt: skip
    evaluated = json.loads(proc.stdout.strip().splitlines()[-1])[task]
    trained = result["systems"]["trained head"]
    for metric in ("recall@5", "ndcg@10", "full_ndcg@10"):
        assert trained[metric] == pytest.approx(evaluated[f"item_head_{metric}"], abs=1e-6)
    others = ["head from zero, quarter of train", "head from zero, half of train",
              "head from zero, all of train", "refitted head + residual MLP (32)"]  # fmt: skip
    assert list(result["other_refits"]) == others
    for name in ["refitted head", *others]:
        gap = result["paired_diff"][f"{name} minus AR encoder head"]["ndcg@10"]
        assert gap[1] <= gap[0] <= gap[2]
        assert set(result["systems"][name]) == set(trained)
