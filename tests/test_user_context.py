"""Does the LLM read the user? Controls, answer ranking, diagnostics and the recipe levers
(gate init, residual-scaled blocks, token-scaled soft prompts, per-part learning rates)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_user_llm import VARIANTS, build, user_batch
from test_user_llm import _open_gates as set_gates

from user_llm import evaluate, optimizers, strategies
from user_llm.integration import UserLLM
from user_llm.models import UserLLMModel


def _open_gates(params, value):
    """Every cross-attention gate set so that tanh(gate) = value."""
    return set_gates(params, float(np.arctanh(value)))


def _examples(n=6):
    rng = np.random.default_rng(0)
    return {
        "user_item_ids": rng.integers(2, 50, (n, 5)),
        "user_mask": np.ones((n, 5), bool),
        "inputs_tokens": rng.integers(2, 50, (n, 4)),
        "candidate_label": rng.integers(0, 3, (n,)),
    }


def test_shuffled_user_pairs_every_example_with_another_users_history():
    ex = _examples(7)
    shuffled = evaluate.with_control(ex, "shuffled_user")
    for i in range(7):
        # Another example's user arrays, and its own prompt and label.
        j = [
            k
            for k in range(7)
            if np.array_equal(shuffled["user_item_ids"][i], ex["user_item_ids"][k])
        ]
        assert j and i not in j
        assert np.array_equal(shuffled["inputs_tokens"][i], ex["inputs_tokens"][i])
    assert np.array_equal(shuffled["candidate_label"], ex["candidate_label"])
    # A permutation: every history is used exactly once.
    assert sorted(map(tuple, shuffled["user_item_ids"])) == sorted(map(tuple, ex["user_item_ids"]))
    no_user = evaluate.with_control(ex, "no_user")
    assert not no_user["user_mask"].any() and np.array_equal(
        no_user["inputs_tokens"], ex["inputs_tokens"]
    )
    with pytest.raises(ValueError, match="control"):
        evaluate.with_control(ex, "other_user")
    with pytest.raises(ValueError, match="at least 2"):
        evaluate.with_control({k: v[:1] for k, v in ex.items()}, "shuffled_user")


@pytest.mark.parametrize("variant", ["xattn_ar_early", "xattn_dual", "soft_prompt_perceiver"])
def test_no_user_control_is_the_bare_llm(variant):
    """With an empty history the user context is masked out everywhere: User-LLM's logits are
    the LLM's own, whatever the gates (dual encoders and soft prompts included)."""
    model, variables, batch = build(variant)
    params = _open_gates(nn.unbox(variables)["params"], 0.8)
    empty = evaluate.with_control({k: np.asarray(v) for k, v in user_batch().items()}, "no_user")
    tokens = batch["decoder_input_tokens"]
    got = model.module.apply({"params": params}, tokens, user_features=empty)
    ref = model.module.apply({"params": params}, tokens, method=lambda m, t: m.decoder(t))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    real = model.module.apply({"params": params}, tokens, user_features=user_batch())
    assert not np.allclose(real, ref, atol=1e-4)  # the real user does change the logits


def test_length_normalized_score_is_the_mean_token_log_probability():
    """By hand: a candidate's summed log-likelihood from the full forward pass, over its
    number of tokens (EOS included), equals ``length_normalized`` of the cached scores."""
    model, variables, _ = build("xattn_ar_early")
    model.causal_prompt = True  # as for a pretrained LLM: the hand computation is all causal
    params = _open_gates(nn.unbox(variables)["params"], 0.6)
    features = user_batch()
    tokens = np.array([[0, 5, 9, 0], [0, 7, 0, 0]], np.int32)
    causal = (np.arange(4)[None] < np.array([[3], [2]])).astype(np.int32)
    batch = {"decoder_input_tokens": tokens, "decoder_causal_attention": causal, **features}
    cands = np.zeros((2, 2, 4), np.int32)
    cands[0, 0, :3], cands[0, 1, :2], cands[1, 0, :4], cands[1, 1, :1] = (
        [4, 6, 1],
        [8, 1],
        [3, 3, 9, 1],
        [1],
    )
    scores = np.asarray(model.score_candidates(params, batch, jnp.asarray(cands)))
    norm = evaluate.length_normalized(scores, cands)
    prompts = [[0, 5, 9], [0, 7]]
    for b, p in enumerate(prompts):
        for c in range(2):
            cand = [int(t) for t in cands[b, c] if t]
            seq = np.array([p + cand])
            logits = model.module.apply(
                {"params": params}, jnp.asarray(seq[:, :-1]),
                user_features={k: v[b : b + 1] for k, v in features.items()},
            )  # fmt: skip
            logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
            by_hand = [float(logp[len(p) - 1 + j, t]) for j, t in enumerate(cand)]
            assert norm[b, c] == pytest.approx(np.mean(by_hand), rel=1e-4, abs=1e-4)
            # The true answer's geometric-mean token probability, for label c.
            prob = evaluate.target_token_prob(norm, np.array([c, c]))[b]
            assert prob == pytest.approx(np.exp(np.mean(by_hand)), rel=1e-4)


def test_genre_ranking_scores_equal_full_forward_likelihoods():
    """Each genre name is scored after the prompt exactly as ``score_batch`` scores it as the
    target of the prompt: ranking answers never depends on phrasing."""
    model, variables, _ = build("xattn_ar_early")
    params = _open_gates(nn.unbox(variables)["params"], 0.5)
    names = np.array(["Drama", "Sci-Fi", "War"], dtype=object)
    encode = lambda s: [2 + (ord(ch) % 60) for ch in s]  # noqa: E731
    index = np.broadcast_to(np.arange(3), (2, 3))
    answers = evaluate.candidate_tokens(names, index, encode, eos_id=1, width=8)
    features = user_batch()
    prompt = [0, 11, 12]
    batch = {
        "decoder_input_tokens": np.array([prompt + [0]] * 2, np.int32),
        "decoder_causal_attention": np.array([[1, 1, 1, 0]] * 2, np.int32),
        **features,
    }
    scores = np.asarray(model.score_candidates(params, batch, jnp.asarray(answers)))
    for b in range(2):
        for g, name in enumerate(names):
            target = encode(name) + [1]
            seq = prompt + target
            row = {
                "decoder_input_tokens": jnp.asarray([seq[:-1]]),
                "decoder_target_tokens": jnp.asarray([seq[1:]]),
                "decoder_loss_weights": jnp.asarray([[0] * (len(prompt) - 1) + [1] * len(target)]),
                "decoder_causal_attention": jnp.asarray(
                    [[1] * len(prompt) + [0] * (len(target) - 1)]
                ),
                **{k: v[b : b + 1] for k, v in features.items()},
            }
            assert scores[b, g] == pytest.approx(float(model.score_batch(params, row)[0]), abs=1e-4)
    assert evaluate._answer_index(names, ["sci fi", "Drama", "Horror"]).tolist() == [1, 0, -1]


def test_paired_differences_and_full_catalogue_ranking():
    real = {"acc": np.array([1.0, 1.0, 0.0, 1.0] * 10)}
    same = evaluate.paired_differences(real, real)["acc"]
    assert same == [0.0, 0.0, 0.0]
    worse = evaluate.paired_differences(real, {"acc": np.zeros(40)})["acc"]
    assert worse[0] == pytest.approx(75.0) and worse[1] > 0
    scores = np.array([[0, 9, 7.5, 8, 1, 7.0]])
    # Target 5 (score 7): ids 0/1 and the history item 3 (score 8) do not count, item 2 (7.5)
    # does -> rank 1.
    out = evaluate.full_catalogue_metrics(scores, np.array([5]), np.array([[3, 0]]))
    assert out["full_recall@10"][0] == 1 and out["full_ndcg@10"][0] == pytest.approx(1 / np.log2(3))
    oov = evaluate.full_catalogue_metrics(scores, np.array([1]), np.array([[3]]))
    assert oov["full_recall@10"][0] == 0


def test_window_rule_counts_genres_with_alphabetical_ties():
    names = np.array(["<pad>", "<oov>", "Drama", "Action", "War"], dtype=object)
    genres = np.array([[[2, 3], [3, 0], [2, 4]],   # Drama 2, Action 2 -> Action (alphabetical)
                       [[4, 0], [4, 2], [1, 1]],   # War 2 (unknown ids ignored)
                       [[0, 0], [0, 0], [0, 0]]])  # fmt: skip
    mask = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 1]], bool)
    assert evaluate.window_favorite(genres, mask, names).tolist() == ["Action", "War", ""]
    mask[0, 1] = False  # Drama 2, Action 1
    assert evaluate.window_favorite(genres, mask, names)[0] == "Drama"


def test_diagnostics_report_gates_update_ratio_and_perceiver_entropy():
    model, variables, batch = build("xattn_ar_late_perceiver")
    params = _open_gates(nn.unbox(variables)["params"], 0.3)
    d = jax.device_get(model.diagnostics(params, batch))
    assert d["gate_tanh/layer_00"] == pytest.approx(0.3, abs=1e-6)
    assert d["gate_tanh/max_abs"] == pytest.approx(0.3, abs=1e-6)
    assert 0 < d["update_to_residual/layer_01"] < 10
    assert 0.0 < d["perceiver_entropy/layer_0"] <= 1.0 + 1e-6
    closed = jax.device_get(model.diagnostics(_open_gates(params, 0.0), batch))
    assert closed["update_to_residual/layer_00"] == 0.0


def test_residual_scaled_blocks_make_tanh_gate_the_update_ratio():
    integration = VARIANTS["xattn_ar_early"][2]
    model, variables, batch = build("xattn_ar_early")
    cfg = dataclasses.replace(model.module.decoder_config, cross_attention_residual_scale=True,
                              cross_attention_gate_init=0.2)  # fmt: skip
    module = UserLLM(cfg, model.module.encoder_config, integration)
    scaled = UserLLMModel(module, eos_id=1)
    params = nn.unbox(scaled.get_initial_variables(
        jax.random.PRNGKey(0), {k: v.shape for k, v in batch.items()}))["params"]  # fmt: skip
    assert float(params["decoder"]["layers_1"]["context_block"]["gate"]) == pytest.approx(0.2)
    d = jax.device_get(scaled.diagnostics(params, batch))
    assert d["update_to_residual/layer_01"] == pytest.approx(np.tanh(0.2), rel=1e-3)


def test_token_scaled_soft_prompt_matches_the_embedding_rms():
    model, variables, batch = build("soft_prompt_perceiver")
    integration = dataclasses.replace(model.module.integration, match_token_embedding_scale=True)
    module = UserLLM(model.module.decoder_config, model.module.encoder_config, integration)
    params = nn.unbox(UserLLMModel(module).get_initial_variables(
        jax.random.PRNGKey(0), {k: v.shape for k, v in batch.items()}))["params"]  # fmt: skip
    context, _ = module.apply({"params": params}, user_batch(), method="encode_user")
    table = params["decoder"]["token_embedder"]["embedding"]
    rms = np.sqrt(np.mean(np.square(np.asarray(context)), axis=-1))
    np.testing.assert_allclose(rms, np.sqrt(np.mean(np.square(table))), rtol=1e-3)
    assert "context_scale" in params["projector"]
    assert strategies.trainable_mask(params, "proj")["projector"]["context_scale"]


def test_scale_by_path_is_a_higher_learning_rate_for_matching_parameters():
    params = {"projector": {"w": jnp.ones(3)}, "decoder": {"w": jnp.ones(3)}}
    grads = {
        "projector": {"w": jnp.array([1.0, -2.0, 3.0])},
        "decoder": {"w": jnp.array([1.0, 2.0, 3.0])},
    }
    fast = optax.chain(optax.adam(1e-2), optimizers.scale_by_path([(r"projector/.*", 10.0)]))
    ref = optax.adam(1e-1)
    up, _ = fast.update(grads, fast.init(params), params)
    ref_up, _ = ref.update(grads, ref.init(params), params)
    np.testing.assert_allclose(up["projector"]["w"], ref_up["projector"]["w"], rtol=1e-6)
    base_up, _ = optax.adam(1e-2).update(grads, optax.adam(1e-2).init(params), params)
    np.testing.assert_allclose(up["decoder"]["w"], base_up["decoder"]["w"], rtol=1e-6)
    pairs = optimizers.user_llm_multipliers(integration=10.0, encoder=0.5)
    assert dict(pairs)[strategies.INTEGRATION] == 10.0 and dict(pairs)[r"user_encoder/.*"] == 0.5


def test_chat_template_text_prompts_and_candidate_sets_from_the_task():
    """``tpchat`` tasks wrap the same text prompt in SmolLM2's chat template (the prompt ends
    with the assistant header, no EOS after it); ``load_examples`` picks a candidate set."""
    import tasks.smollm2 as smollm2

    lengths = {"inputs": 1024, "targets": 8}
    chat = evaluate.load_examples("movielens_favorite_genre_tpchat_h20_smollm2", lengths, "test", 2)
    raw = evaluate.load_examples("movielens_favorite_genre_tp_h20_smollm2", lengths, "test", 2)
    tok = smollm2.VOCABULARY.tokenizer
    for i in range(2):
        n = int(chat["decoder_causal_attention"][i].sum())
        prompt = tok.decode(
            chat["decoder_input_tokens"][i, 1:n].tolist(), skip_special_tokens=False
        )
        assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(
            "<|im_start|>assistant\n"
        )
        m = int(raw["decoder_causal_attention"][i].sum())
        raw_prompt = tok.decode(raw["decoder_input_tokens"][i, 1 : m - 1].tolist())
        assert raw_prompt in prompt
        weights = chat["decoder_loss_weights"][i] > 0
        target = chat["decoder_target_tokens"][i][weights].tolist()
        assert target[-1] == smollm2.VOCABULARY.eos_id  # <|im_end|> closes the answer
        assert (
            target == raw["decoder_target_tokens"][i][raw["decoder_loss_weights"][i] > 0].tolist()
        )
    task = "movielens_next_item_userllm_h20_smollm2"
    pop = evaluate.load_examples(task, {"inputs": 32, "targets": 8}, "test", 4, "popularity")
    uni = evaluate.load_examples(task, {"inputs": 32, "targets": 8}, "test", 4, "uniform")
    assert not np.array_equal(pop["candidate_item_index"], uni["candidate_item_index"])
    rows = np.arange(4)
    target_pop = pop["candidate_item_index"][rows, pop["candidate_label"]]
    assert np.array_equal(target_pop, uni["candidate_item_index"][rows, uni["candidate_label"]])
    assert not any(k.startswith("uniform_") for k in pop)


def test_linear_probe_reads_a_planted_class_and_pools_only_valid_context():
    from user_llm import probe

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = rng.normal(size=(300, 8)) + 3.0 * np.eye(8)[y]  # class k shifts feature k
    w, b = probe.fit_linear_probe(x[:200], y[:200], 3, steps=300)
    assert np.mean(np.argmax(x[200:] @ w + b, 1) == y[200:]) > 0.9
    shuffled = rng.permutation(y[:200])  # no signal: near chance on held-out rows
    w, b = probe.fit_linear_probe(x[:200], shuffled, 3, steps=300)
    assert np.mean(np.argmax(x[200:] @ w + b, 1) == y[200:]) < 0.6
    model, variables, _ = build("xattn_ar_early")
    params = nn.unbox(variables)["params"]
    users = {k: np.asarray(v) for k, v in user_batch().items()}
    pooled = probe.pooled_contexts(model, params, users, batch_size=1)
    context, mask = model.module.apply({"params": params}, users, method="encode_user")
    want = np.asarray(context)[1][np.asarray(mask)[1]].mean(0)  # row 1 has 3 valid positions
    np.testing.assert_allclose(pooled[1], want, rtol=1e-5, atol=1e-6)


def test_recency_bias_puts_the_first_head_on_the_last_state_and_changes_nothing_at_gate_zero():
    """``cross_attention_recency_bias``: head 0 (slope 4) gives ~98% of its weight to each
    row's last valid state; the last head (slope 1/64) stays near uniform; with the gates at 0
    the model still equals the bias-free one, and opened, the bias changes what the LLM reads."""
    from user_llm.decoder import recency_bias, recency_slopes
    from user_llm.layers import attention_weights

    slopes = recency_slopes(4)
    np.testing.assert_allclose(slopes, 4.0 * 256.0 ** -(np.arange(4) / 3), rtol=1e-6)  # 4 .. 1/64
    mask = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], bool)
    bias = recency_bias(mask, 4)
    np.testing.assert_allclose(bias[1, 0], [-8.0, -4.0, 0.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(bias[0, 3], -np.arange(5, -1, -1) / 64, rtol=1e-6)
    # Equal queries and keys (no content preference): the weights are the prior alone.
    q = jnp.zeros((2, 1, 4, 8))
    k = jnp.zeros((2, 6, 2, 8))  # grouped query: 2 KV heads, 2 query heads each
    w = attention_weights(q, k, mask[:, None, :], bias)  # [b, kv, groups, q, k]
    first, last = w[:, 0, 0, 0], w[:, 1, 1, 0]
    assert float(first[0, 5]) > 0.98 and float(first[1, 2]) > 0.98
    assert float(first[1, 3:].sum()) == 0.0  # padding stays masked
    assert float(last[0].max() - last[0].min()) < 0.02

    model, variables, batch = build("xattn_ar_early")
    cfg = dataclasses.replace(model.module.decoder_config, cross_attention_recency_bias=True)
    biased = UserLLMModel(UserLLM(cfg, model.module.encoder_config, model.module.integration))
    params = nn.unbox(variables)["params"]
    tokens = batch["decoder_input_tokens"]

    def logits(m, p):
        return m.module.apply({"params": p}, tokens, user_features=user_batch())

    np.testing.assert_array_equal(logits(biased, params), logits(model, params))
    opened = _open_gates(params, 0.5)
    assert not np.allclose(logits(biased, opened), logits(model, opened), atol=1e-5)


def test_recency_bias_refuses_contexts_that_are_not_a_history():
    model, variables, batch = build("xattn_ar_late_perceiver")
    cfg = dataclasses.replace(model.module.decoder_config, cross_attention_recency_bias=True)
    module = UserLLM(cfg, model.module.encoder_config, model.module.integration)
    with pytest.raises(ValueError, match="needs the AR encoder's states alone"):
        module.init(
            jax.random.PRNGKey(0), batch["decoder_input_tokens"], user_features=user_batch()
        )
