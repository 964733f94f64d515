"""User encoders, Perceiver, integration modes, LoRA and training strategies (synthetic arrays)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO_ROOT, tiny_decoder_config

from user_llm import item_head_refit, lora, models, strategies, testing
from user_llm.decoder import Decoder
from user_llm.integration import IntegrationConfig, UserLLM, belief_scores, recency_distance
from user_llm.models import (
    ARUserEncoderModel,
    DualUserEncoderModel,
    UserLLMModel,
    distillation_kl,
    param_shapes_and_axes,
)
from user_llm.perceiver import PerceiverResampler
from user_llm.train_step import make_train_step
from user_llm.user_encoder import DualEncoder, UserEncoder
from user_llm.user_encoder import pool_states as ue_pool

GOLDEN = REPO_ROOT / "tests" / "testdata" / "user_llm_params.json"
B, L, G = 2, 6, 3
NUM_ITEMS = testing.TINY_ENCODER["categorical_features"]["user_item_ids"]

ENCODER = testing.tiny_encoder_config(predict_features=("user_item_ids", "user_genres"))
PERCEIVER = testing.tiny_perceiver_config()

VARIANTS = {
    "xattn_ar_early": (dict(cross_attention_layers=(1,)), {}, IntegrationConfig()),
    "xattn_ar_late_perceiver": (
        dict(cross_attention_layers=(0, 1)),
        {"fusion": "late"},
        IntegrationConfig(use_perceiver=True, perceiver=PERCEIVER),
    ),
    "xattn_dual": (dict(cross_attention_layers=(1,)), {}, IntegrationConfig(encoder_kind="dual")),
    "xattn_perceiver_plus_states": (
        dict(cross_attention_layers=(1,)),
        {},
        IntegrationConfig(use_perceiver=True, perceiver=PERCEIVER, keep_encoder_states=True),
    ),
    "xattn_ar_recency": (
        dict(cross_attention_layers=(1,)),
        {},
        IntegrationConfig(recency_positions=4),
    ),
    "soft_prompt_perceiver": (
        {},
        {},
        IntegrationConfig(mode="soft_prompt", use_perceiver=True, perceiver=PERCEIVER),
    ),
    "soft_prompt_ar_lora": (
        dict(lora_rank=2),
        {},
        IntegrationConfig(mode="soft_prompt", projector_hidden_dim=24),
    ),
}


def user_batch(seed=0, lengths=(6, 3)):
    rng = np.random.default_rng(seed)
    mask = np.arange(L)[None, :] < np.asarray(lengths)[:, None]
    batch = {
        "user_item_ids": rng.integers(2, NUM_ITEMS, (B, L)) * mask,
        "user_ratings": rng.integers(2, 12, (B, L)) * mask,
        "user_genres": rng.integers(0, 20, (B, L, G)) * mask[..., None],
        "user_mask": mask,
    }
    return {k: jnp.asarray(v) for k, v in batch.items()}


def lm_batch(seed=1, length=8):
    targets = jax.random.randint(jax.random.PRNGKey(seed), (B, length), 2, 64)
    return {
        "decoder_input_tokens": jnp.concatenate([jnp.zeros((B, 1), jnp.int32), targets[:, :-1]], 1),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": jnp.ones_like(targets),
    }


def build(variant):
    dec_kw, enc_kw, integration = VARIANTS[variant]
    module = UserLLM(
        tiny_decoder_config(**dec_kw), dataclasses.replace(ENCODER, **enc_kw), integration
    )
    model = UserLLMModel(module, eos_id=1, max_decode_length=4)
    batch = {**lm_batch(), **user_batch()}
    shapes = {k: v.shape for k, v in batch.items()}
    types = {k: v.dtype for k, v in batch.items()}
    variables = model.get_initial_variables(jax.random.PRNGKey(0), shapes, types)
    return model, variables, batch


def test_param_tree_goldens_for_every_variant():
    """Regenerate after an intended change: UPDATE_GOLDENS=1 pytest tests/test_user_llm.py"""
    actual = {name: param_shapes_and_axes(build(name)[1]["params"]) for name in VARIANTS}
    if os.environ.get("UPDATE_GOLDENS"):
        GOLDEN.write_text(json.dumps(actual, indent=1, sort_keys=True) + "\n")
    assert actual == json.loads(GOLDEN.read_text())
    xattn = actual["xattn_ar_late_perceiver"]
    assert xattn["perceiver/latents"] == {"shape": [4, 16], "axes": ["latents", "embed"]}
    assert "decoder/layers_0/context_block/gate" in xattn
    assert "decoder/layers_0/mlp/wi_0/lora_a" in actual["soft_prompt_ar_lora"]
    assert not any("context_block" in k for k in actual["soft_prompt_perceiver"])


@pytest.mark.parametrize("variant", ["xattn_ar_early", "xattn_ar_late_perceiver", "xattn_dual"])
def test_zero_gate_user_llm_equals_bare_decoder(variant):
    model, variables, batch = build(variant)
    params = nn.unbox(variables)["params"]
    user_logits = model.module.apply(
        {"params": params}, batch["decoder_input_tokens"], user_features=user_batch()
    )
    bare = Decoder(model.module.decoder_config).apply(
        {"params": params["decoder"]}, batch["decoder_input_tokens"]
    )
    np.testing.assert_array_equal(user_logits, bare)


@pytest.mark.parametrize("variant", ["xattn_ar_early", "soft_prompt_ar_lora"])
def test_history_padding_never_changes_outputs(variant):
    model, variables, batch = build(variant)
    params = _open_gates(nn.unbox(variables)["params"])
    features = user_batch(lengths=(6, 3))
    garbage = dict(features)
    pad = ~np.asarray(features["user_mask"])
    garbage["user_item_ids"] = jnp.where(pad, 7, features["user_item_ids"])
    garbage["user_genres"] = jnp.where(pad[..., None], 5, features["user_genres"])
    a = model.module.apply(
        {"params": params}, batch["decoder_input_tokens"], user_features=features
    )
    b = model.module.apply({"params": params}, batch["decoder_input_tokens"], user_features=garbage)
    np.testing.assert_allclose(a, b, atol=1e-6)
    # ... while a real history item does matter.
    changed = dict(features)
    changed["user_item_ids"] = features["user_item_ids"].at[1, 0].set(9)
    c = model.module.apply({"params": params}, batch["decoder_input_tokens"], user_features=changed)
    assert not np.allclose(a[1], c[1])


def _open_gates(params, value=1.0):
    def visit(node):
        if isinstance(node, dict):
            return {k: (jnp.asarray(value) if k == "gate" else visit(v)) for k, v in node.items()}
        return node

    return visit(params)


def test_encoder_outputs_at_real_positions_ignore_padding():
    enc = UserEncoder(ENCODER)
    features = user_batch(lengths=(6, 3))
    variables = enc.init(jax.random.PRNGKey(0), features)
    garbage = dict(features)
    garbage["user_ratings"] = jnp.where(features["user_mask"], features["user_ratings"], 3)
    a, b = enc.apply(variables, features), enc.apply(variables, garbage)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.all(np.asarray(a[1, 3:]) == 0)  # padded positions are zeroed


@pytest.mark.parametrize("length", [5, 17, 64])
def test_perceiver_output_shape_is_independent_of_history_length(length):
    perceiver = PerceiverResampler(PERCEIVER)
    x = jnp.ones((2, length, 16))
    mask = jnp.ones((2, length), bool)
    variables = perceiver.init(jax.random.PRNGKey(0), x, mask)
    assert perceiver.apply(variables, x, mask).shape == (2, 4, 16)


def test_lora_merged_equals_unmerged():
    cfg = tiny_decoder_config(lora_rank=2, lora_alpha=8.0)
    module = Decoder(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 64)
    params = nn.unbox(module.init(jax.random.PRNGKey(0), tokens))["params"]
    # Trained adapters are non-zero: perturb every lora_b.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if strategies.path_name(p).endswith("lora_b") else x, params
    )
    merged = lora.merge(params, lora_alpha=8.0)
    assert not any("lora" in k for k in strategies_paths(merged))
    plain = Decoder(dataclasses.replace(cfg, lora_rank=0))
    np.testing.assert_allclose(
        module.apply({"params": params}, tokens),
        plain.apply({"params": merged}, tokens),
        atol=1e-4,
    )


def strategies_paths(tree):
    return [strategies.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.mark.parametrize("strategy", ["full", "lora", "enc", "proj"])
def test_frozen_parameters_are_bitwise_unchanged_and_stateless(strategy):
    model, variables, batch = build("soft_prompt_ar_lora")
    params = nn.unbox(variables)["params"]
    tx = strategies.masked_optimizer(optax.adam(1e-2), strategy)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    step = jax.jit(
        make_train_step(model, tx, optax.constant_schedule(1e-2), 1, False, strategy=strategy)
    )
    before = jax.tree_util.tree_map(np.asarray, params)
    for _ in range(3):
        state, _ = step(state, batch, jax.random.PRNGKey(0))
    mask = strategies.trainable_mask(params, strategy)
    flat_mask = dict(zip(strategies_paths(params), jax.tree_util.tree_leaves(mask), strict=True))
    after = dict(
        zip(strategies_paths(params), jax.tree_util.tree_leaves(state["params"]), strict=True)
    )
    for name, old in zip(strategies_paths(params), jax.tree_util.tree_leaves(before), strict=True):
        if flat_mask[name]:
            continue
        np.testing.assert_array_equal(np.asarray(after[name]), old, err_msg=name)
    trained = [n for n, t in flat_mask.items() if t]
    changed = [
        n
        for n in trained
        if not np.array_equal(
            np.asarray(after[n]),
            dict(zip(strategies_paths(params), jax.tree_util.tree_leaves(before), strict=True))[n],
        )
    ]
    assert changed, f"{strategy}: nothing trained"
    # Optimizer moments exist only for trainable parameters.
    moments = sum(
        int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state["opt_state"]) if x.ndim
    )
    trainable_size = sum(int(np.prod(after[n].shape)) for n in trained)
    assert moments == 2 * trainable_size
    expected = {
        "full": lambda n: True,
        "lora": lambda n: "lora_" in n or not n.startswith("decoder/"),
        "enc": lambda n: not n.startswith("decoder/"),
        "proj": lambda n: n.startswith(("projector/", "perceiver/")),
    }[strategy]
    assert trained == [n for n in flat_mask if expected(n)]


@pytest.mark.parametrize(
    "variant,strategy",
    [
        ("xattn_ar_early", "proj"),
        ("xattn_ar_early", "enc"),
        ("xattn_ar_late_perceiver", "enc"),
        ("soft_prompt_ar_lora", "lora"),
        ("soft_prompt_ar_lora", "full"),
    ],
)
def test_trainable_only_gradients_give_the_same_update_for_less_work(variant, strategy):
    """Differentiating only the trained leaves is the same step (float32 round-off) as
    differentiating everything and dropping the frozen gradients, and the program handed to XLA
    holds fewer matmuls wherever something is frozen (no frozen weight gradients, no backward
    pass below the lowest trained layer), instead of relying on XLA to remove them."""
    model, variables, batch = build(variant)
    params = _open_gates(nn.unbox(variables)["params"], 0.5)
    tx = strategies.masked_optimizer(optax.adam(1e-2), strategy)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    results, dots = {}, {}
    for which in ("trainable", "all"):
        step = jax.jit(
            make_train_step(
                model, tx, optax.constant_schedule(1e-2), 2, False, strategy, differentiate=which
            )
        )
        s = state
        for _ in range(2):
            s, metrics = step(s, batch, jax.random.PRNGKey(0))
        results[which] = (s, metrics)
        jaxpr = jax.make_jaxpr(step)(state, batch, jax.random.PRNGKey(0))
        dots[which] = str(jaxpr).count("dot_general")
    (new, new_m), (old, old_m) = results["trainable"], results["all"]
    for a, b in zip(
        jax.tree_util.tree_leaves(new["params"]),
        jax.tree_util.tree_leaves(old["params"]),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert set(new_m) == set(old_m)
    for key in new_m:
        np.testing.assert_allclose(new_m[key], old_m[key], rtol=1e-5, atol=1e-6, err_msg=key)
    if strategy == "full":
        assert dots["trainable"] == dots["all"], dots
    else:
        assert dots["trainable"] < dots["all"], dots


def test_unknown_strategy_is_named():
    with pytest.raises(ValueError, match="adapters"):
        strategies.trainable_mask({"a": jnp.ones(1)}, "adapters")


@pytest.mark.parametrize(
    "variant",
    ["xattn_ar_early", "soft_prompt_perceiver", "xattn_dual", "xattn_perceiver_plus_states"],
)
def test_cached_decoding_matches_uncached_greedy(variant):
    model, variables, _ = build(variant)
    params = _open_gates(nn.unbox(variables)["params"], 0.7)
    prompts = [[0, 5, 9], [0, 7]]
    tokens = np.zeros((B, 5), np.int32)
    causal = np.zeros((B, 5), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)], causal[b, : len(p)] = p, 1
    features = user_batch()
    batch = {
        "decoder_input_tokens": jnp.asarray(tokens),
        "decoder_causal_attention": jnp.asarray(causal),
        **features,
    }
    out = jax.jit(model.predict_batch)(params, batch)
    for b, p in enumerate(prompts):
        seq = list(p)
        row = {k: v[b : b + 1] for k, v in features.items()}
        for t in range(4):
            prefix = jnp.asarray([[1] * len(p) + [0] * (len(seq) - len(p))])
            logits = model.module.apply(
                {"params": params}, jnp.asarray([seq]), prefix_mask=prefix, user_features=row
            )
            nxt = int(jnp.argmax(logits[0, -1]))
            assert int(out[b, t]) == nxt, (variant, b, t)
            if nxt == 1:
                break
            seq.append(nxt)


def _train(model, params, batch, tx, steps):
    """(final state, per-step losses) of ``steps`` jitted train steps at lr 1e-2 on one batch."""
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    step = jax.jit(make_train_step(model, tx, optax.constant_schedule(1e-2), 1, False))
    losses = []
    for _ in range(steps):
        state, m = step(state, batch, jax.random.PRNGKey(0))
        losses.append(float(m["loss"]))
    return state, losses


def test_encoder_pretraining_losses_fall_and_scores_rank_items():
    for model in (
        ARUserEncoderModel(UserEncoder(ENCODER)),
        DualUserEncoderModel(DualEncoder(ENCODER)),
    ):
        module = model.module
        batch = user_batch(seed=3, lengths=(6, 5))
        shapes = {k: v.shape for k, v in batch.items()}
        params = nn.unbox(model.get_initial_variables(jax.random.PRNGKey(0), shapes))["params"]
        state, losses = _train(model, params, batch, optax.adam(1e-2), 30)
        assert losses[-1] < losses[0] * 0.7, (type(module).__name__, losses[0], losses[-1])
        scores = model.score_next_items(state["params"], batch)
        assert scores.shape == (B, NUM_ITEMS)


def test_pooled_states_are_the_last_or_the_mean_of_the_valid_ones():
    hidden = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    mask = jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
    np.testing.assert_array_equal(ue_pool(hidden, mask, "last"), [hidden[0, 2], hidden[1, 0]])
    np.testing.assert_allclose(
        ue_pool(hidden, mask, "mean"), [hidden[0, :3].mean(0), hidden[1, 0]], rtol=1e-6
    )
    with pytest.raises(ValueError, match="pooling must be one of"):
        ue_pool(hidden, mask, "max")
    model = ARUserEncoderModel(UserEncoder(ENCODER))
    batch = user_batch(seed=3, lengths=(6, 1))
    shapes = {k: v.shape for k, v in batch.items()}
    params = nn.unbox(model.get_initial_variables(jax.random.PRNGKey(0), shapes))["params"]
    last = model.score_next_items(params, batch)
    mean = model.score_next_items(params, batch, pooling="mean")
    np.testing.assert_allclose(mean[1], last[1], rtol=1e-5)  # one state: the same
    assert not np.allclose(mean[0], last[0])
    dual = DualUserEncoderModel(DualEncoder(ENCODER))
    with pytest.raises(ValueError, match="dual encoder.*only 'last'"):
        dual.score_next_items({}, batch, pooling="mean")


def test_sampled_softmax_option_trains():
    cfg = dataclasses.replace(
        ENCODER, sampled_softmax_negatives=8, predict_features=("user_item_ids",)
    )
    model = ARUserEncoderModel(UserEncoder(cfg))
    batch = user_batch(seed=4)
    params = nn.unbox(
        model.get_initial_variables(jax.random.PRNGKey(0), {k: v.shape for k, v in batch.items()})
    )["params"]
    loss, weight, _ = model.loss_terms(params, batch, jax.random.PRNGKey(1))
    assert float(weight) == 5 + 2 and np.isfinite(float(loss))


def test_integration_config_errors_are_clear():
    with pytest.raises(ValueError, match="cross_attention_layers"):
        build_module = UserLLM(tiny_decoder_config(), ENCODER, IntegrationConfig())
        build_module.init(
            jax.random.PRNGKey(0), jnp.zeros((B, 4), jnp.int32), user_features=user_batch()
        )
    with pytest.raises(ValueError, match="mode"):
        IntegrationConfig(mode="prefix")
    with pytest.raises(ValueError, match="fusion"):
        dataclasses.replace(ENCODER, fusion="middle")
    with pytest.raises(ValueError, match="keep_encoder_states.*use_perceiver=True"):
        IntegrationConfig(keep_encoder_states=True)
    with pytest.raises(ValueError, match="recency_positions must be >= 0"):
        IntegrationConfig(recency_positions=-1)
    with pytest.raises(ValueError, match="recency_positions needs the AR encoder"):
        IntegrationConfig(encoder_kind="dual", recency_positions=8)


def test_recency_distance_counts_back_from_each_rows_last_interaction():
    mask = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(
        recency_distance(mask, 4),
        [[3, 3, 3, 2, 1, 0], [2, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]],
    )


def test_recency_embedding_starts_at_zero_and_marks_each_users_last_state():
    """At initialization the recency table is zero, so the context equals the recency-free
    model's; a vector written into slot 0 (the last interaction) moves only each user's last
    valid position (position 5 of a 6-item history, position 2 of a 3-item one)."""
    model, variables, _ = build("xattn_ar_recency")
    params = nn.unbox(variables)["params"]
    features = user_batch(lengths=(6, 3))
    context, mask = model.module.apply({"params": params}, features, method="encode_user")
    integration = dataclasses.replace(model.module.integration, recency_positions=0)
    plain = dataclasses.replace(model.module, integration=integration)
    without = {k: v for k, v in params.items() if k != "recency"}
    reference, _ = plain.apply({"params": without}, features, method="encode_user")
    np.testing.assert_array_equal(context, reference)
    table = params["recency"]["embedding"]
    marked = {**params, "recency": {"embedding": table.at[0].set(1.0)}}
    moved, _ = model.module.apply({"params": marked}, features, method="encode_user")
    changed = np.any(np.abs(np.asarray(moved - context)) > 1e-6, axis=-1)
    np.testing.assert_array_equal(
        changed & np.asarray(mask), [[0, 0, 0, 0, 0, 1], [0, 0, 1, 0, 0, 0]]
    )
    assert strategies.trainable_mask(params, "proj")["recency"]["embedding"]


def test_perceiver_plus_states_context_is_the_latents_then_every_state():
    """The context holds the Perceiver's latents (present when the user has a history) and then
    the uncompressed states at their own mask: each part equals what the Perceiver-only and the
    Perceiver-free models, with the same parameters, hand the LLM."""
    model, variables, _ = build("xattn_perceiver_plus_states")
    params = nn.unbox(variables)["params"]
    features = user_batch(lengths=(6, 0))  # the second user has no history at all
    context, mask = model.module.apply({"params": params}, features, method="encode_user")
    n = PERCEIVER.num_latents
    assert context.shape == (B, n + L, model.module.decoder_config.embed_dim)
    np.testing.assert_array_equal(mask[:, :n], [[True] * n, [False] * n])
    np.testing.assert_array_equal(mask[:, n:], features["user_mask"])

    def alone(**kw):
        integration = dataclasses.replace(model.module.integration, **kw)
        module = dataclasses.replace(model.module, integration=integration)
        kept = (
            params
            if kw.get("use_perceiver", True)
            else {k: v for k, v in params.items() if k != "perceiver"}
        )
        return module.apply({"params": kept}, features, method="encode_user")

    latents, latent_mask = alone(keep_encoder_states=False)
    states, state_mask = alone(keep_encoder_states=False, use_perceiver=False)
    np.testing.assert_array_equal(context[:, :n], latents)
    np.testing.assert_array_equal(context[:, n:], states)
    np.testing.assert_array_equal(mask, np.concatenate([latent_mask, state_mask], axis=1))


@pytest.mark.parametrize("causal_prompt", [False, True])
@pytest.mark.parametrize("variant", ["xattn_ar_early", "soft_prompt_perceiver"])
def test_cached_candidate_scores_equal_full_forward_likelihoods(variant, causal_prompt):
    """``score_candidates`` (prompt read once, candidates as segments of its cache) == the summed
    log-likelihood of prompt + candidate in one uncached forward pass, for each candidate."""
    model, variables, _ = build(variant)
    model.causal_prompt = causal_prompt
    params = _open_gates(nn.unbox(variables)["params"], 0.7)
    prompts = [[0, 5, 9], [0, 7]]
    cands = np.zeros((B, 3, 4), np.int32)
    cands[0, 0, :3], cands[0, 1, :1], cands[0, 2, :4] = [4, 6, 1], [1], [8, 8, 3, 1]
    cands[1, 0, :2], cands[1, 1, :3] = [11, 1], [2, 13, 1]  # cands[1, 2]: empty
    tokens = np.zeros((B, 5), np.int32)
    causal = np.zeros((B, 5), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)], causal[b, : len(p)] = p, 1
    features = user_batch()
    batch = {"decoder_input_tokens": tokens, "decoder_causal_attention": causal, **features}
    got = np.asarray(jax.jit(model.score_candidates)(params, batch, jnp.asarray(cands)))
    # Ranking and generation from one prefill: the same scores, the same greedy tokens.
    both_scores, tokens = model.score_and_predict(params, batch, jnp.asarray(cands), 4)
    np.testing.assert_allclose(both_scores, got, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(tokens, model.predict_batch(params, batch))
    # Packed tightly (8 real tokens in row 0 of 12 padded slots): the same scores; a width
    # too small for a row gives NaN there, never a silently wrong score.
    width = models.packed_candidate_width(cands, multiple=1)
    assert width == 8
    tight, _ = model.score_and_predict(params, batch, jnp.asarray(cands), 0, width)
    np.testing.assert_allclose(tight, got, rtol=1e-6, atol=1e-6)
    short, _ = model.score_and_predict(params, batch, jnp.asarray(cands), 0, 6)
    assert np.isnan(short[0]).all() and np.allclose(short[1], got[1], atol=1e-6)
    for b, p in enumerate(prompts):
        for c in range(3):
            cand = [t for t in cands[b, c] if t]
            seq = p + cand
            prefix = [1] * len(p) + [0] * (len(seq) - 1 - len(p))
            row = {
                "decoder_input_tokens": jnp.asarray([seq[:-1] if cand else p]),
                "decoder_target_tokens": jnp.asarray([seq[1:] if cand else p]),
                "decoder_loss_weights": jnp.asarray(
                    [[0] * (len(p) - 1) + [1] * len(cand) if cand else [0] * len(p)]
                ),
                "decoder_causal_attention": jnp.asarray([prefix]),
                **{k: v[b : b + 1] for k, v in features.items()},
            }
            want = float(model.score_batch(params, row)[0])
            np.testing.assert_allclose(got[b, c], want, rtol=1e-5, atol=1e-5, err_msg=(b, c))


@pytest.mark.parametrize("variant", ["xattn_ar_early", "soft_prompt_perceiver", None])
def test_loss_at_loss_positions_only_equals_the_full_loss(variant):
    # Prefix-LM rows: prompts of 5 and 2 tokens carry no loss, then 3 target tokens each; the
    # rest is padding. Logits at only 3 positions per row give the same loss and gradients.
    if variant is None:
        model = models.DecoderOnlyModel(Decoder(tiny_decoder_config()))
        batch = lm_batch()
        params = model.get_initial_variables(
            jax.random.PRNGKey(0), {"decoder_input_tokens": (B, 8)}
        )
    else:
        model, params, batch = build(variant)
    params = nn.unbox(params)["params"]
    weights = np.zeros((B, 8), np.int32)
    weights[0, 5:8] = 1
    weights[1, 2:5] = 1
    batch = {**batch, "decoder_loss_weights": jnp.asarray(weights)}

    def terms(m, p):
        loss, weight, metrics = m.loss_terms(p, batch, None)
        return loss, (weight, metrics)

    (full, (w_full, m_full)), g_full = jax.value_and_grad(terms, 1, has_aux=True)(model, params)
    few = copy.copy(model)
    few.loss_positions = 3
    (part, (w_part, m_part)), g_part = jax.value_and_grad(terms, 1, has_aux=True)(few, params)
    np.testing.assert_allclose(float(part), float(full), rtol=1e-5)
    assert float(w_part) == float(w_full) == 6
    assert float(m_part["correct_sum"]) == float(m_full["correct_sum"])
    assert float(m_part["dropped_loss_tokens_sum"]) == 0
    leaves = zip(jax.tree_util.tree_leaves(g_part), jax.tree_util.tree_leaves(g_full), strict=True)
    for a, b in leaves:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    # A row with more loss tokens than loss_positions: NaN, and the count, not a smaller loss.
    few.loss_positions = 2
    loss, _, metrics = few.loss_terms(params, batch, None)
    assert np.isnan(float(loss)) and float(metrics["dropped_loss_tokens_sum"]) == 2


def test_item_title_vectors_stay_frozen_and_shape_the_next_item_scores(tmp_path):
    table = np.random.default_rng(0).normal(size=(NUM_ITEMS, 5)).astype(np.float32)
    table[:2] = 0.0  # pad and OOV
    np.save(tmp_path / "titles.npy", table)
    cfg = dataclasses.replace(ENCODER, item_text_table=str(tmp_path / "titles.npy"))
    model = ARUserEncoderModel(UserEncoder(cfg))
    batch = user_batch(seed=3, lengths=(6, 5))
    shapes = {k: v.shape for k, v in batch.items()}
    params = nn.unbox(model.get_initial_variables(jax.random.PRNGKey(0), shapes))["params"]
    np.testing.assert_array_equal(params["embedder"]["frozen_item_text"], table)
    mask = strategies.trainable_mask(params, "full")
    assert mask["embedder"]["frozen_item_text"] is False
    assert mask["embedder"]["tables_user_item_ids"]["embedding"] is True
    # Weight decay too would move a frozen table that merely gets no gradient.
    tx = strategies.masked_optimizer(optax.adamw(1e-2, weight_decay=0.1), "full")
    state, losses = _train(model, params, batch, tx, 20)
    assert losses[-1] < losses[0] * 0.8, losses
    trained = state["params"]["embedder"]
    np.testing.assert_array_equal(trained["frozen_item_text"], table)
    assert not np.allclose(trained["item_text_projection"]["kernel"],
                           params["embedder"]["item_text_projection"]["kernel"])  # fmt: skip
    # The tied next-item head scores through the title vectors: other titles, other scores.
    scores = model.score_next_items(state["params"], batch)
    other = copy.deepcopy(state["params"])
    other["embedder"]["frozen_item_text"] = jnp.asarray(table[::-1].copy())
    assert not np.allclose(scores, model.score_next_items(other, batch))


def test_a_wrong_item_title_table_is_named(tmp_path):
    np.save(tmp_path / "other.npy", np.zeros((NUM_ITEMS + 3, 5), np.float32))
    (tmp_path / "text.npy").write_text("not an array")
    cases = [("other.npy", r"expected a float \[50, D\].*another dataset"),
             ("text.npy", "cannot read it"), ("missing.npy", "cannot read it")]  # fmt: skip
    for name, match in cases:
        cfg = dataclasses.replace(ENCODER, item_text_table=str(tmp_path / name))
        batch = user_batch()
        with pytest.raises(ValueError, match=match) as e:
            ARUserEncoderModel(UserEncoder(cfg)).get_initial_variables(
                jax.random.PRNGKey(0), {k: v.shape for k, v in batch.items()}
            )
        assert name in str(e.value)
    with pytest.raises(ValueError, match="not a categorical feature"):
        dataclasses.replace(ENCODER, item_text_table="t.npy", item_text_feature="user_genres")


def _belief_llm(tmp_path, **kw):
    table = np.random.default_rng(1).normal(size=(NUM_ITEMS, 5)).astype(np.float32)
    np.save(tmp_path / "titles.npy", table)
    integration = IntegrationConfig(belief_top_k=3, belief_text_table=str(tmp_path / "titles.npy"))
    module = UserLLM(tiny_decoder_config(cross_attention_layers=(1,)), ENCODER,
                     dataclasses.replace(integration, **kw))  # fmt: skip
    model = UserLLMModel(module, eos_id=1, max_decode_length=4)
    batch = {**lm_batch(), **user_batch()}
    shapes = {k: v.shape for k, v in batch.items()}
    types = {k: v.dtype for k, v in batch.items()}
    params = nn.unbox(model.get_initial_variables(jax.random.PRNGKey(0), shapes, types))["params"]
    return module, params, table


def test_belief_tokens_are_the_titles_of_the_encoder_heads_top_items(tmp_path):
    module, params, table = _belief_llm(tmp_path)
    features = user_batch(lengths=(6, 3))
    context, mask = module.apply({"params": params}, features, method="encode_user")
    assert context.shape == (B, L + 3, module.decoder_config.embed_dim)
    np.testing.assert_array_equal(mask[:, L:], True)
    np.testing.assert_array_equal(mask[:, :L], features["user_mask"])
    np.testing.assert_array_equal(params["belief"]["frozen_item_text"], table)

    def scores(p):
        def f(m):
            hidden = m.user_encoder(features)
            return belief_scores(m.user_encoder, hidden, features, "user_item_ids")

        return np.asarray(nn.apply(f, module)({"params": p}))

    s = scores(params)
    history = np.asarray(features["user_item_ids"] * features["user_mask"])
    for row in range(B):  # history items, padding and OOV are never recommended
        assert np.all(np.isneginf(s[row, history[row][history[row] > 0]]))
        assert np.all(np.isneginf(s[row, :2])) and np.isfinite(s[row, 2:]).sum() > 3
    top = np.argsort(-s, axis=1)[:, :3]

    def context_with_row(item, value):
        p = copy.deepcopy(params)
        p["belief"]["frozen_item_text"] = p["belief"]["frozen_item_text"].at[item].set(value)
        return module.apply({"params": p}, features, method="encode_user")[0]

    # Another title for user 0's best item changes user 0's first belief token only ...
    changed = context_with_row(int(top[0, 0]), 10.0)
    assert not np.allclose(changed[0, L], context[0, L])
    np.testing.assert_allclose(changed[0, L + 1 :], context[0, L + 1 :], atol=1e-6)
    np.testing.assert_allclose(changed[:, :L], context[:, :L], atol=1e-6)
    # ... while a title no user's top 3 holds changes nothing.
    unused = next(i for i in range(2, NUM_ITEMS) if i not in top)
    np.testing.assert_allclose(context_with_row(unused, 10.0), context, atol=1e-6)
    # The table never trains; the belief projection and rank embedding are integration params.
    mask = strategies.trainable_mask(params, "proj")
    assert mask["belief"]["frozen_item_text"] is False
    assert mask["belief"]["rank_embedding"] is True
    assert mask["belief"]["projector"]["out"]["kernel"] is True
    assert not any(jax.tree_util.tree_leaves(mask["user_encoder"]))


def test_belief_token_configs_that_cannot_work_are_named(tmp_path):
    with pytest.raises(ValueError, match="needs the AR encoder"):
        IntegrationConfig(belief_top_k=2, belief_text_table="t.npy", encoder_kind="dual")
    with pytest.raises(ValueError, match="needs belief_text_table"):
        IntegrationConfig(belief_top_k=2)
    with pytest.raises(ValueError, match="'user_ratings' has no next-value head"):
        _belief_llm(tmp_path, item_feature="user_ratings")
    np.save(tmp_path / "short.npy", np.zeros((NUM_ITEMS - 1, 5), np.float32))
    with pytest.raises(ValueError, match=r"short.npy: expected a float \[50, D\]"):
        _belief_llm(tmp_path, belief_text_table=str(tmp_path / "short.npy"))


def test_every_model_wrapper_is_a_trainable_model():
    """The train loop's contract (``models.TrainableModel``) holds for every wrapper kind."""
    from user_llm.models import DecoderOnlyModel, LanguageModel, NextItemRanker, TrainableModel

    wrappers = [
        DecoderOnlyModel(Decoder(tiny_decoder_config())),
        build("xattn_ar_early")[0],
        ARUserEncoderModel(UserEncoder(ENCODER)),
        DualUserEncoderModel(DualEncoder(ENCODER)),
    ]
    for model in wrappers:
        assert isinstance(model, TrainableModel), type(model).__name__
    assert not isinstance(object(), TrainableModel)
    # What evaluation dispatches on: text models score and predict; encoders rank items.
    kinds = [(isinstance(m, LanguageModel), isinstance(m, NextItemRanker)) for m in wrappers]
    assert kinds == [(True, False), (True, False), (False, True), (False, True)]
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DualUserEncoderModel(DualEncoder(ENCODER), temperature=0.0)


def test_input_features_name_what_each_model_reads_and_a_missing_one_is_refused():
    """``TrainableModel.input_features``: the decoder keys, the encoder's history features (its
    config's, with the mask) and the item head's target; ``check_input_features`` names what a
    dataset lacks. The batches the tests feed each model give every feature it declares."""
    from user_llm.errors import ConfigError
    from user_llm.models import DecoderOnlyModel, check_input_features

    decoder_keys = {"decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"}
    history = {"user_item_ids", "user_ratings", "user_genres", "user_mask"}
    assert DecoderOnlyModel(Decoder(tiny_decoder_config())).input_features() == decoder_keys
    model, _, batch = build("xattn_ar_early")
    assert model.input_features() == decoder_keys | history
    check_input_features(model, batch, "the test batch")
    assert _item_head_llm()[0].input_features() == decoder_keys | history | {"item_target_id"}
    for encoder in (
        ARUserEncoderModel(UserEncoder(ENCODER)),
        DualUserEncoderModel(DualEncoder(ENCODER)),
    ):
        assert encoder.input_features() == history
        check_input_features(encoder, user_batch(), "the test batch")
    without_ratings = {k: v for k, v in batch.items() if k != "user_ratings"}
    with pytest.raises(
        ConfigError,
        match=r"UserLLMModel reads \['user_ratings'\], which the test batch does not give",
    ):
        check_input_features(model, without_ratings, "the test batch")


def _item_head_llm(**kw):
    integration = IntegrationConfig(item_head=True, **kw)
    module = UserLLM(tiny_decoder_config(cross_attention_layers=(1,)), ENCODER, integration)
    model = UserLLMModel(module, eos_id=1, max_decode_length=4)
    prompt = jnp.arange(8)[None, :] < 3  # 3 prompt positions, then 5 answer tokens
    batch = {
        **lm_batch(),
        **user_batch(),
        "decoder_loss_weights": jnp.broadcast_to(~prompt, (B, 8)).astype(jnp.int32),
        "item_target_id": jnp.asarray([9, 1]),  # 1: out of vocabulary (or another task's)
    }
    shapes = {k: v.shape for k, v in batch.items()}
    types = {k: v.dtype for k, v in batch.items()}
    params = nn.unbox(model.get_initial_variables(jax.random.PRNGKey(0), shapes, types))["params"]
    return model, params, batch


def test_item_head_loss_is_the_title_loss_plus_the_next_items_cross_entropy():
    model, params, batch = _item_head_llm(item_loss_weight=0.5)
    assert "item_head" in params and "heads" in str(params["user_encoder"].keys())
    loss, weight, metrics = model.loss_terms(params, batch, None)
    # By hand: the title loss of the same parameters without the head, plus 0.5 times example
    # 0's item cross entropy at its answer position (3: the first loss-bearing one); example 1's
    # next item is out of vocabulary and adds nothing.
    title_only = UserLLMModel(
        dataclasses.replace(model.module, integration=IntegrationConfig()), eos_id=1
    )
    lm_loss, lm_weight, _ = title_only.loss_terms(params, batch, None)
    variables = {"params": params}
    hidden = model.module.apply(
        variables, batch["decoder_input_tokens"], user_features=user_batch(), return_hidden=True
    )
    item_logits = model.module.apply(variables, hidden[:, 3], method="item_logits")
    item_ce = -jax.nn.log_softmax(item_logits[0])[9]
    np.testing.assert_allclose(loss, lm_loss + 0.5 * item_ce, rtol=1e-5)
    assert weight == lm_weight == 10
    assert metrics["item_examples_sum"] == 1
    np.testing.assert_allclose(metrics["item_cross_entropy_sum"], item_ce, rtol=1e-5)
    np.testing.assert_allclose(model.item_scores(params, batch), item_logits, rtol=1e-5)


def test_distillation_kl_matches_a_hand_computation_and_skips_ruled_out_items():
    teacher = jnp.asarray([[0.0, jnp.log(3.0), -jnp.inf], [1.0, 2.0, 3.0]])
    student = jnp.asarray([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    # Row 0: p = (1/4, 3/4, 0), q uniform; row 1 is weighted 0 (and equal anyway).
    by_hand = 0.25 * np.log(0.25 * 3) + 0.75 * np.log(0.75 * 3)
    got = distillation_kl(teacher, student, jnp.asarray([1.0, 0.0]))
    np.testing.assert_allclose(got, by_hand, rtol=1e-6)
    assert float(distillation_kl(student, student, jnp.ones(2))) == pytest.approx(0.0, abs=1e-6)
    grad = jax.grad(lambda s: distillation_kl(teacher, s, jnp.ones(2)))(student)
    assert np.all(np.isfinite(grad))  # the -inf teacher entry gives no NaN


def test_item_distillation_adds_the_kl_to_the_encoder_head_and_pulls_the_item_head_to_it():
    model, params, batch = _item_head_llm(item_distill_weight=2.0)
    plain = UserLLMModel(
        dataclasses.replace(model.module, integration=IntegrationConfig(item_head=True)), eos_id=1
    )
    loss, _, metrics = model.loss_terms(params, batch, None)
    plain_loss, _, _ = plain.loss_terms(params, batch, None)
    # By hand: the teacher is the encoder head on the last state with the history excluded
    # (belief_scores), only example 0 has a next item (example 1's is OOV).
    variables = {"params": params}
    hidden = model.module.apply(variables, user_batch(), method=lambda m, f: m.user_encoder(f))
    teacher = model.module.apply(
        variables,
        hidden,
        user_batch(),
        method=lambda m, h, f: belief_scores(m.user_encoder, h, f, "user_item_ids"),
    )
    kl = distillation_kl(teacher[:1], model.item_scores(params, batch)[:1], jnp.ones(1))
    np.testing.assert_allclose(metrics["item_distill_kl_sum"], kl, rtol=1e-5)
    np.testing.assert_allclose(loss, plain_loss + 2.0 * kl, rtol=1e-5)
    # Trained on the distillation term alone (no item loss), the KL falls under Proj. The tiny
    # random encoder's head is near uniform (KL ~0.18, most of it from the history items the
    # teacher rules out): its query map x10 gives a peaked teacher, frozen under Proj.
    head = params["user_encoder"]["heads_user_item_ids"]
    params = {
        **params,
        "user_encoder": {
            **params["user_encoder"],
            "heads_user_item_ids": jax.tree_util.tree_map(lambda x: 10 * x, head),
        },
    }
    only = UserLLMModel(
        dataclasses.replace(
            model.module,
            integration=IntegrationConfig(
                item_head=True, item_loss_weight=0.0, item_distill_weight=1.0
            ),
        ),
        eos_id=1,
    )
    tx = strategies.masked_optimizer(optax.adam(3e-2), "proj")
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    step = jax.jit(make_train_step(only, tx, optax.constant_schedule(3e-2), 1, False, "proj"))
    kls = []
    for _ in range(20):
        state, m = step(state, batch, jax.random.PRNGKey(0))
        kls.append(float(m["item_distill_kl"]))
    assert kls[-1] < 0.5 * kls[0], kls


def test_item_head_reads_the_prompt_only_and_trains_under_proj():
    model, params, batch = _item_head_llm()
    scores = model.item_scores(params, batch)
    # Other answer tokens (after the answer position) never change the item scores ...
    other = dict(batch, decoder_input_tokens=batch["decoder_input_tokens"].at[:, 4:].set(7))
    np.testing.assert_array_equal(model.item_scores(params, other), scores)
    # At step 0 (gates at 0) the user cannot reach it. Under Proj the head and the blocks learn
    # the next item; the encoder (and its head) stay as they are.
    # (The random tiny encoder's output table is small, so its logits move slowly: lr 3e-2.)
    tx = strategies.masked_optimizer(optax.adam(3e-2), "proj")
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    step = jax.jit(make_train_step(model, tx, optax.constant_schedule(3e-2), 1, False, "proj"))
    first = None
    for _ in range(30):
        state, m = step(state, batch, jax.random.PRNGKey(0))
        first = float(m["item_cross_entropy"]) if first is None else first
    assert float(m["item_cross_entropy"]) < 0.5 * first
    assert float(m["item_accuracy"]) == 1.0
    for a, b in zip(
        jax.tree_util.tree_leaves(params["user_encoder"]),
        jax.tree_util.tree_leaves(state["params"]["user_encoder"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(state["params"]["item_head"]["kernel"], params["item_head"]["kernel"])
    # Trained, the item scores depend on the user's history (through the opened blocks).
    trained = state["params"]
    swapped = {**batch, **user_batch(seed=5)}
    assert not np.allclose(model.item_scores(trained, swapped), model.item_scores(trained, batch))


def test_item_head_refit_states_cache_reuses_its_states_and_refuses_another_runs(tmp_path):
    calls = []

    def compute(examples):
        calls.append(len(examples["candidate_label"]))
        return np.full((len(examples["candidate_label"]), 3), float(len(calls)), np.float32)

    sets = {"train": {"candidate_label": np.zeros(5)}, "test": {"candidate_label": np.zeros(2)}}
    path = str(tmp_path / "states.npz")
    first = item_head_refit.cached_states(path, sets, compute, "task abc")
    again = item_head_refit.cached_states(path, sets, compute, "task abc")
    assert calls == [5, 2]  # computed once, then read back
    for name in sets:
        np.testing.assert_array_equal(first[name], again[name])
    assert not list(tmp_path.glob("*partial*"))
    with pytest.raises(ValueError, match="other weights, task or example counts"):
        item_head_refit.cached_states(path, sets, compute, "task other-weights")
    fewer = {**sets, "test": {"candidate_label": np.zeros(1)}}
    with pytest.raises(ValueError, match="other weights, task or example counts"):
        item_head_refit.cached_states(path, fewer, compute, "task abc")
    (tmp_path / "states.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="not readable"):
        item_head_refit.cached_states(path, sets, compute, "task abc")
    assert len(item_head_refit.cached_states("", sets, compute, "x")) == 2  # no cache: computed
    assert calls == [5, 2, 5, 2]
    weights = {"a": np.zeros((2, 2), np.float32), "b": np.ones(3, np.float32)}
    changed = {**weights, "b": np.array([1, 1, 1.5], np.float32)}
    fingerprint = item_head_refit.params_fingerprint
    assert fingerprint(weights) == fingerprint({k: v.copy() for k, v in weights.items()})
    assert fingerprint(weights) != fingerprint(changed)


def test_item_head_refit_scores_like_the_trained_head_and_fits_held_out_users_better():
    model, params, batch = _item_head_llm()
    examples = {k: np.asarray(v) for k, v in batch.items()}
    states = item_head_refit.answer_states(model, params, examples, batch_size=2)
    np.testing.assert_allclose(
        item_head_refit.head_scores(model, params, {"item_head": params["item_head"]}, states),
        model.item_scores(params, batch),
        rtol=1e-5,
        atol=1e-6,  # jitted vs eager
    )
    # The encoder head's raw scores are the distillation teacher's wherever the teacher does
    # not rule an item out (history, padding, OOV).
    raw = item_head_refit.encoder_head_scores(model, params, examples, 2)
    teacher = item_head_refit.teacher_scores(model, params, examples, 2)
    finite = np.isfinite(teacher)
    assert finite.sum() > teacher.size // 2 and not finite[:, :2].any()
    np.testing.assert_allclose(raw[finite], teacher[finite], rtol=1e-5, atol=1e-6)
    # 400 random states whose next item (one of 4) is a fixed linear function of the state: the
    # refit learns it from the first 360 and its held-out cross entropy falls below the trained
    # (random) head's; with 0 steps the trained head comes back unchanged.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, states.shape[1])).astype(np.float32)
    y = 2 + np.argmax(x @ rng.normal(size=(x.shape[1], 4)), axis=1)
    holdout = item_head_refit.tail_holdout(400)
    assert holdout.sum() == 40 and holdout[-40:].all()
    head, report = item_head_refit.fit_item_head(
        model, params, x, y, holdout, steps=100, learning_rate=3e-2
    )
    assert report["heldout_ce"] < report["heldout_ce_start"] - 0.3, report
    assert report["train_ce"] < report["train_ce_start"] - 0.3, report
    held = item_head_refit.head_scores(model, params, head, x[holdout])
    ce = np.mean(jax.nn.logsumexp(held, -1) - held[np.arange(40), y[holdout]])
    np.testing.assert_allclose(ce, report["heldout_ce"], rtol=1e-4)  # the head it reports
    same, start = item_head_refit.fit_item_head(model, params, x, y, holdout, steps=0)
    assert start["step"] == 0
    assert list(same) == ["item_head"]
    for a, b in zip(
        jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(params["item_head"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="both train and held-out rows"):
        item_head_refit.fit_item_head(model, params, x, y, np.zeros(400, bool))
    # From zero the head scores every item alike: its start is the uniform cross entropy.
    zero, zero_report = item_head_refit.fit_item_head(
        model, params, x, y, holdout, steps=0, from_scratch=True
    )
    num_items = item_head_refit.head_scores(model, params, zero, x[:1]).shape[1]
    np.testing.assert_allclose(zero_report["heldout_ce"], np.log(num_items), rtol=1e-5)
    # A learning curve's fewer train rows fit the held-out users less well.
    few, few_report = item_head_refit.fit_item_head(
        model, params, x, y, holdout, steps=100, learning_rate=3e-2, train_rows=np.arange(400) < 40
    )
    assert few_report["heldout_ce"] > report["heldout_ce"] + 0.1, (few_report, report)
    # A next item that depends on the state's square, which no linear head can read: the
    # residual MLP starts exactly at the linear head and ends well below it on held-out users.
    y_sq = 2 + np.argmax((x @ rng.normal(size=(x.shape[1], 4))) ** 2, axis=1)
    mlp, start = item_head_refit.fit_item_head(
        model, params, x, y_sq, holdout, mlp_hidden=64, steps=0
    )
    np.testing.assert_allclose(
        item_head_refit.head_scores(model, params, mlp, x),
        item_head_refit.head_scores(model, params, {"item_head": params["item_head"]}, x),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    _, linear = item_head_refit.fit_item_head(
        model, params, x, y_sq, holdout, steps=200, learning_rate=3e-2
    )
    _, nonlinear = item_head_refit.fit_item_head(
        model, params, x, y_sq, holdout, steps=200, learning_rate=3e-2, mlp_hidden=64
    )
    assert nonlinear["heldout_ce"] < linear["heldout_ce"] - 0.1, (nonlinear, linear)
    ids = {
        "candidate_item_ids": np.array([[5, 9, 7], [3, 4, 6]]),
        "candidate_label": np.array([1, 2]),
    }
    np.testing.assert_array_equal(item_head_refit.next_item_ids(ids), [9, 6])


def test_item_head_configs_that_cannot_work_are_named():
    with pytest.raises(ValueError, match="item_head needs the AR encoder"):
        IntegrationConfig(item_head=True, encoder_kind="dual")
    with pytest.raises(ValueError, match="distils into the item head: set item_head"):
        IntegrationConfig(item_distill_weight=1.0)
    with pytest.raises(ValueError, match="item_distill_weight must be >= 0"):
        IntegrationConfig(item_head=True, item_distill_weight=-1.0)
    with pytest.raises(ValueError, match="'user_ratings' has no next-value head"):
        _item_head_llm(item_feature="user_ratings")
    model, params, batch = _item_head_llm()
    without = {k: v for k, v in batch.items() if k != "item_target_id"}
    with pytest.raises(ValueError, match="needs 'item_target_id' in the batch"):
        model.loss_terms(params, without, None)
