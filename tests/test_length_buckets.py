"""``DatasetConfig.length_bucket``: a training batch runs at its longest row's length (rounded up
to the bucket), not the task's full feature length, and trains the same parameters."""

from __future__ import annotations

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import run_module, tiny_decoder_config

from user_llm import checkpoints
from user_llm.data import pipeline
from user_llm.decoder import Decoder
from user_llm.models import DecoderOnlyModel
from user_llm.train_step import make_train_step


def _batch(lengths: list[int], full: int = 40) -> dict[str, np.ndarray]:
    valid = np.arange(full)[None] < np.asarray(lengths)[:, None]
    tokens = np.where(valid, 7, 0).astype(np.int32)
    return {
        "decoder_input_tokens": tokens,
        "decoder_target_tokens": tokens,
        "decoder_loss_weights": valid.astype(np.float32),
        "decoder_causal_attention": valid.astype(np.int32),
        "user_item_ids": np.ones((len(lengths), 50), np.int32),  # another length axis
    }


def test_bucketed_length_rounds_up_the_longest_row_and_caps_at_the_full_length():
    assert pipeline.bucketed_length(_batch([5, 17, 9]), 8) == 24
    assert pipeline.bucketed_length(_batch([5, 16]), 8) == 16
    assert pipeline.bucketed_length(_batch([37, 2]), 16) == 40  # capped, not 48
    assert pipeline.bucketed_length(_batch([0, 0]), 8) == 8  # all padding: one bucket
    # Any decoder_* array counts: a target past the last input token keeps its column.
    batch = _batch([5, 5])
    batch["decoder_target_tokens"][1, 11] = 3
    assert pipeline.bucketed_length(batch, 4) == 12


def test_cut_length_cuts_decoder_arrays_only():
    cut = pipeline.cut_length(_batch([5, 17]), 24)
    assert {k: v.shape[1] for k, v in cut.items()} == {
        "decoder_input_tokens": 24,
        "decoder_target_tokens": 24,
        "decoder_loss_weights": 24,
        "decoder_causal_attention": 24,
        "user_item_ids": 50,
    }
    np.testing.assert_array_equal(
        cut["decoder_input_tokens"], _batch([5, 17])["decoder_input_tokens"][:, :24]
    )


def test_bad_buckets_and_batches_are_named():
    with pytest.raises(ValueError, match="length_bucket must be a positive"):
        pipeline.bucketed_length(_batch([3]), 0)
    with pytest.raises(ValueError, match="needs decoder_\\* arrays.*user_item_ids"):
        pipeline.bucketed_length({"user_item_ids": np.ones((2, 5))}, 8)


def test_a_step_on_the_cut_batch_trains_the_same_parameters():
    """A prefix-LM batch with right padding (rows of 9, 14 and 21 tokens in 40 slots): three
    Adam steps on it and on its 24-position cut give the same parameters and losses."""
    model = DecoderOnlyModel(Decoder(tiny_decoder_config()))
    lengths, prefix = np.array([9, 14, 21]), np.array([4, 6, 10])
    slots = np.arange(40)[None]
    valid, inputs = slots < lengths[:, None], slots < prefix[:, None]
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (3, 40), 2, 64)) * valid
    batch = {
        "decoder_input_tokens": np.concatenate([np.zeros((3, 1), np.int32), tokens[:, :-1]], 1),
        "decoder_target_tokens": tokens,
        "decoder_loss_weights": (valid & ~inputs).astype(np.int32),
        "decoder_causal_attention": inputs.astype(np.int32),
    }
    cut = pipeline.cut_length(batch, pipeline.bucketed_length(batch, 8))
    assert cut["decoder_input_tokens"].shape == (3, 24)

    def train(batch):
        params = nn.unbox(
            model.get_initial_variables(jax.random.PRNGKey(0), {"decoder_input_tokens": (3, 40)})
        )["params"]
        tx = optax.adam(3e-3)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
        step = jax.jit(make_train_step(model, tx, optax.constant_schedule(3e-3), 1, False))
        losses = []
        for _ in range(3):
            state, metrics = step(state, batch, jax.random.PRNGKey(1))
            losses.append(float(metrics["loss"]))
        return state["params"], losses

    (full, full_losses), (short, short_losses) = train(batch), train(cut)
    np.testing.assert_allclose(short_losses, full_losses, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(short), jax.tree_util.tree_leaves(full), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_training_with_length_buckets_trains_the_same_parameters(tmp_path: Path):
    """The titles LM on real ml-latest-small titles (256 byte slots, unpacked; the examples are
    30-70 bytes): three steps at full length and three with 16-position buckets, through the
    train CLI."""

    def train(name: str, bucket: int) -> dict[str, np.ndarray]:
        proc = run_module(
            [
                "-m",
                "user_llm.train",
                "--gin_file=experiments/movielens_titles_lm.gin",
                "--gin_file=local_tiny.gin",
                "--gin.TASK_FEATURE_LENGTHS={'targets': 256}",
                "--gin.PACK=False",  # packed rows are full: nothing to cut
                f"--gin.MODEL_DIR='{tmp_path / name}'",
                "--gin.TRAIN_STEPS=3",
                "--gin.train_lib.train.eval_every_steps=0",
                "--gin.train_lib.train.save_every_steps=3",
                "--gin.train_lib.train.log_every_steps=3",
                f"--gin.train/pipeline.DatasetConfig.length_bucket={bucket}",
            ]
        )
        logged = dict(re.findall(r"train/(\w+)=([\d.e+-]+)", proc.stdout))
        # Padded tokens per step (both rates are over the same three steps and seconds).
        per_step = float(logged["tokens_per_sec"]) / float(logged["steps_per_sec"])
        return checkpoints.read_params(tmp_path / name), per_step

    (full, full_tokens), (bucketed, bucketed_tokens) = train("full", 0), train("bucketed", 16)
    assert full_tokens == pytest.approx(8 * 256, rel=1e-3)  # BATCH_SIZE 8 x 256 slots
    assert bucketed_tokens < full_tokens / 1.5  # titles are short: the batches were cut
    assert (tmp_path / "bucketed" / "config.gin").read_text().count("length_bucket = 16") == 1
    assert full.keys() == bucketed.keys()
    for key in full:
        np.testing.assert_allclose(bucketed[key], full[key], atol=1e-5, err_msg=key)
