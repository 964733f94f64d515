"""User-LLM: a user encoder's embeddings contextualize a decoder (phase 2 of the method).

``encode_user`` runs encoder -> [Perceiver] -> projection to the LLM width, once per example
(``keep_encoder_states``: the Perceiver's latents and the uncompressed states side by side);
the decoder then reads the result either through the gated cross-attention blocks in its
user-context slots (``mode='cross_attention'``, Flamingo-style, an exact identity at step 0)
or as a soft prompt prepended to the token embeddings (``mode='soft_prompt'``).

With ``belief_top_k`` (an extension, not in the paper) the context also gets K *belief tokens*:
the AR encoder head's K most likely next items (history excluded), each as its frozen title
vector (``item_text_table.py``: the mean of the LLM's own token embeddings over the title) plus a
learned rank embedding, projected to the LLM width. Why: the encoder ranks the next item far
better than User-LLM does (results/phase2_recipe.md); its item-level states leave the LLM to learn
the map from ~9,700 item ids to titles out of ~1,200 examples, while a title vector lives in the
LLM's own embedding space, and with tied input/output embeddings a block that copies it into the
residual stream raises the logits of that title's tokens.

With ``item_head`` (an extension, not in the paper; E4SRec-style) the LLM also answers in item
space: its final hidden state at the answer position, mapped to the encoder's width, is scored by
the phase-1 encoder's own next-item head against every item, and training adds that
full-catalogue cross entropy to the title loss. Why: a title's likelihood is the LLM's prior over
text, and the encoder's knowledge of the next item is collaborative, in its item-id embeddings
(results/phase2_recipe_belief450.md), which no title carries; the item loss also gives the
cross-attention blocks a direct, per-example gradient towards what the user will do next.

Parameter tree: ``user_encoder/``, ``recency/``, ``perceiver/``, ``projector/``, ``belief/``,
``item_head/`` and ``decoder/``
(the LLM's own tree, so a pretrained LLM loads with the assignment map
``('decoder/(.*)', r'\\1')``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from user_llm.decoder import Decoder, DecoderConfig
from user_llm.layers import Array, DenseGeneral, Embed, distance_from_last
from user_llm.perceiver import PerceiverConfig, PerceiverResampler
from user_llm.user_encoder import (
    DualEncoder,
    UserEncoder,
    UserEncoderConfig,
    last_position,
    load_item_text_table,
)

MODES = ("cross_attention", "soft_prompt")
ENCODERS = ("ar", "dual")


@dataclasses.dataclass(frozen=True)
class IntegrationConfig:
    mode: str = "cross_attention"
    encoder_kind: str = "ar"
    use_perceiver: bool = False
    perceiver: PerceiverConfig = PerceiverConfig()
    # True (with the Perceiver): the LLM reads the encoder's uncompressed states next to the
    # latents, so compression adds a summary without taking the per-item detail away.
    keep_encoder_states: bool = False
    # 0: a single linear map to the LLM width; otherwise a 2-layer MLP with this hidden width.
    projector_hidden_dim: int = 0
    # True: each projected user vector is RMS-normalized and rescaled to the RMS of the LLM's
    # token embeddings (times a learned scalar starting at 1), so a soft prompt looks like
    # tokens to the frozen LLM instead of ~1/RMS(embeddings) times larger.
    match_token_embedding_scale: bool = False
    # > 0: append the encoder head's top-k next items as belief tokens (module docstring).
    belief_top_k: int = 0
    # The .npy [item vocabulary, D] of frozen title vectors the belief tokens read.
    belief_text_table: str = ""
    # The encoder feature whose next-value head ranks the items (belief tokens, item head).
    item_feature: str = "user_item_ids"
    # True: an item head (module docstring) scores every item from the LLM's final hidden
    # state at the answer position, and training adds its full-catalogue cross entropy.
    item_head: bool = False
    # Weight of the item head's cross entropy (one term per example) in the token-summed loss.
    item_loss_weight: float = 1.0
    # > 0: also distil the encoder head into the item head: this weight times, per next-item
    # example, KL(encoder head's next-item distribution || item head's), the teacher read from
    # the encoder's last state with the history excluded and no gradient. Why: the one-hot item
    # loss tells the LLM one item per example; the encoder head's distribution over ~9,700 items
    # says what the encoder knows about this user, which is what the item head falls short of
    # (results/phase2_recipe.md, row 15). The LLM still reaches it only through its context.
    item_distill_weight: float = 0.0
    # > 0: add a learned embedding of each encoder state's distance from the user's last
    # interaction (0 = the last; farther ones share slot recency_positions - 1) before the
    # Perceiver and the projection; zero at initialization, so the model starts unchanged. Why:
    # the cross-attention keys carry no position (the encoder's RoPE stays inside it), so an
    # answer position cannot tell the last state, which alone predicts the next item, from the
    # other 49 except by content (results/phase2_recipe.md, row 12).
    recency_positions: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.encoder_kind not in ENCODERS:
            raise ValueError(f"encoder_kind must be one of {ENCODERS}, got {self.encoder_kind!r}")
        if self.belief_top_k < 0:
            raise ValueError(f"belief_top_k must be >= 0, got {self.belief_top_k}")
        if self.belief_top_k and self.encoder_kind != "ar":
            raise ValueError("belief_top_k needs the AR encoder (its next-item head ranks items)")
        if self.belief_top_k and not self.belief_text_table:
            raise ValueError("belief_top_k > 0 needs belief_text_table (a .npy of title vectors)")
        if self.item_head and self.encoder_kind != "ar":
            raise ValueError("item_head needs the AR encoder (it scores items with its head)")
        if self.keep_encoder_states and not self.use_perceiver:
            raise ValueError(
                "keep_encoder_states keeps the encoder states next to the Perceiver latents: "
                "it needs use_perceiver=True (without it the LLM reads the states alone already)"
            )
        if self.item_loss_weight < 0:
            raise ValueError(f"item_loss_weight must be >= 0, got {self.item_loss_weight}")
        if self.item_distill_weight < 0:
            raise ValueError(f"item_distill_weight must be >= 0, got {self.item_distill_weight}")
        if self.item_distill_weight and not self.item_head:
            raise ValueError("item_distill_weight > 0 distils into the item head: set item_head")
        if self.recency_positions < 0:
            raise ValueError(f"recency_positions must be >= 0, got {self.recency_positions}")
        if self.recency_positions and self.encoder_kind != "ar":
            raise ValueError(
                "recency_positions needs the AR encoder (the dual encoder gives one user vector, "
                "with no positions to tell apart)"
            )


def recency_distance(mask: Array, num_positions: int) -> Array:
    """[b, L] int32: each position's distance from its row's last valid one (right-padded
    histories), clipped to [0, num_positions - 1]; padding after the last reads 0."""
    return jnp.minimum(distance_from_last(mask), num_positions - 1)


def every_kth_layer(num_layers: int, k: int) -> tuple[int, ...]:
    """Layers k-1, 2k-1, ... (k=1: all): where cross-attention blocks go."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return tuple(i for i in range(num_layers) if (i + 1) % k == 0)


class Projector(nn.Module):
    """Encoder width -> LLM width; with ``target_rms``, each output vector is RMS-normalized
    and rescaled to it (times a learned ``context_scale`` starting at 1)."""

    out_dim: int
    hidden_dim: int = 0

    @nn.compact
    def __call__(self, x: Array, target_rms: Array | None = None) -> Array:
        if self.hidden_dim:
            x = nn.gelu(DenseGeneral((self.hidden_dim,), ("embed", "mlp"), name="hidden")(x))
        y = DenseGeneral((self.out_dim,), ("mlp", "embed"), name="out")(x)
        if target_rms is None:
            return y
        y32 = y.astype(jnp.float32)
        unit = y32 * jax.lax.rsqrt(jnp.mean(jnp.square(y32), axis=-1, keepdims=True) + 1e-6)
        scale = self.param("context_scale", nn.initializers.ones, ())
        return (unit * target_rms * scale).astype(y.dtype)


class BeliefTokens(nn.Module):
    """[b, k, out_dim] context slots from item scores [b, V]: the title vectors of the k best
    items (``-inf`` scores are never picked), plus a learned embedding of their rank.

    The choice of items carries no gradient (top-k is discrete, and the encoder head is the
    phase-1 encoder's); the projection and rank embedding train with the integration. The table
    is a ``frozen_`` parameter: no strategy trains it, and the checkpoint keeps a copy.
    """

    top_k: int
    text_table: str
    num_items: int
    out_dim: int
    hidden_dim: int = 0

    @nn.compact
    def __call__(self, item_scores: Array, target_rms: Array | None = None) -> Array:
        table = self.param(
            "frozen_item_text",
            nn.with_logical_partitioning(
                lambda _: jnp.asarray(load_item_text_table(self.text_table, self.num_items)),
                ("vocab", "mlp"),
            ),
        )
        _, ids = jax.lax.top_k(jax.lax.stop_gradient(item_scores), self.top_k)
        vectors = jnp.take(jax.lax.stop_gradient(table), ids, axis=0)  # [b, k, D]
        rank = self.param(
            "rank_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "mlp")),
            (self.top_k, table.shape[-1]),
        )
        projector = Projector(self.out_dim, self.hidden_dim, name="projector")
        return projector(vectors + rank.astype(vectors.dtype), target_rms)


def belief_scores(
    encoder: UserEncoder, hidden: Array, features: Mapping[str, Array], feature: str
) -> Array:
    """The encoder head's next-``feature`` scores [b, V] after each history; ids already in the
    history, padding (0) and out-of-vocabulary (1) are ``-inf`` (the next item is a new one)."""
    mask = features[encoder.config.mask_feature].astype(bool)
    scores = encoder.feature_logits(last_position(hidden, mask), feature).astype(jnp.float32)
    seen = jnp.where(mask, features[feature], 0)
    rows = jnp.arange(scores.shape[0])[:, None]
    scores = scores.at[rows, seen].set(-jnp.inf)
    return scores.at[:, :2].set(-jnp.inf)


class UserLLM(nn.Module):
    decoder_config: DecoderConfig
    encoder_config: UserEncoderConfig
    integration: IntegrationConfig = IntegrationConfig()

    def setup(self) -> None:
        cfg = self.integration
        if cfg.mode == "cross_attention" and not self.decoder_config.cross_attention_layers:
            raise ValueError(
                "mode='cross_attention' needs DecoderConfig.cross_attention_layers (e.g. every "
                "k-th layer); none are set"
            )
        if cfg.mode == "soft_prompt" and self.decoder_config.cross_attention_layers:
            raise ValueError("mode='soft_prompt' takes no cross_attention_layers in the decoder")
        if self.decoder_config.cross_attention_recency_bias and (
            cfg.encoder_kind != "ar" or cfg.use_perceiver or cfg.belief_top_k
        ):
            raise ValueError(
                "cross_attention_recency_bias reads the context as a history (oldest first): it "
                "needs the AR encoder's states alone, without the Perceiver or belief tokens"
            )
        if cfg.encoder_kind == "ar":
            self.user_encoder = UserEncoder(self.encoder_config)
        else:
            self.user_encoder = DualEncoder(self.encoder_config)
        if cfg.recency_positions:
            self.recency = Embed(
                cfg.recency_positions,
                self.encoder_config.embed_dim,
                axes=("length", "embed"),
                init_stddev=0.0,
            )
        if cfg.use_perceiver:
            self.perceiver = PerceiverResampler(cfg.perceiver)
        self.projector = Projector(self.decoder_config.embed_dim, cfg.projector_hidden_dim)
        if (cfg.belief_top_k or cfg.item_head) and (
            cfg.item_feature not in self.encoder_config.predict_features
        ):
            raise ValueError(
                f"item_feature {cfg.item_feature!r} has no next-value head in the "
                f"encoder (predict_features: {list(self.encoder_config.predict_features)})"
            )
        if cfg.item_head:
            self.item_head = DenseGeneral((self.encoder_config.embed_dim,), ("embed", "mlp"))
        if cfg.belief_top_k:
            self.belief = BeliefTokens(
                cfg.belief_top_k,
                cfg.belief_text_table,
                self.encoder_config.vocab_sizes[cfg.item_feature],
                self.decoder_config.embed_dim,
                cfg.projector_hidden_dim,
            )
        self.decoder = Decoder(self.decoder_config)

    @property
    def config(self) -> DecoderConfig:
        """The decoder's config (what decoding needs for its cache)."""
        return self.decoder_config

    def encode_user(
        self, user_features: Mapping[str, Array], deterministic: bool = True
    ) -> tuple[Array, Array]:
        """(context [b, n, llm_width], context_mask [b, n]) for the decoder."""
        hidden = self.user_encoder(user_features, deterministic)
        scores = None
        if self.integration.belief_top_k:
            feature = self.integration.item_feature
            scores = belief_scores(self.user_encoder, hidden, user_features, feature)
        history_mask = user_features[self.encoder_config.mask_feature].astype(bool)
        has_history = jnp.any(history_mask, axis=1, keepdims=True)
        if self.integration.encoder_kind == "ar":
            mask = history_mask
            if self.integration.recency_positions:
                distance = recency_distance(history_mask, self.integration.recency_positions)
                hidden = hidden + self.recency(distance).astype(hidden.dtype)
        else:  # one user vector, present when the user has any history
            mask = jnp.broadcast_to(has_history, hidden.shape[:2])
        if self.integration.use_perceiver:
            latents = self.perceiver(hidden, mask)
            latent_mask = jnp.broadcast_to(has_history, latents.shape[:2])
            if self.integration.keep_encoder_states:
                hidden = jnp.concatenate([latents, hidden.astype(latents.dtype)], axis=1)
                mask = jnp.concatenate([latent_mask, mask], axis=1)
            else:
                hidden, mask = latents, latent_mask
        target_rms = None
        if self.integration.match_token_embedding_scale:
            table = self.decoder.token_embedder.embedding.astype(jnp.float32)
            target_rms = jax.lax.stop_gradient(jnp.sqrt(jnp.mean(jnp.square(table))))
        context = self.projector(hidden, target_rms)
        if scores is None:
            return context, mask
        beliefs = self.belief(scores, target_rms).astype(context.dtype)
        belief_mask = jnp.broadcast_to(has_history, beliefs.shape[:2])
        return (
            jnp.concatenate([context, beliefs], axis=1),
            jnp.concatenate([mask, belief_mask], axis=1),
        )

    def __call__(
        self,
        tokens: Array,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        prefix_mask: Array | None = None,
        input_mask: Array | None = None,
        user_features: Mapping[str, Array] | None = None,
        context: Array | None = None,
        context_mask: Array | None = None,
        prepend_soft_prompt: bool = True,
        decode: bool = False,
        deterministic: bool = True,
        logits_index: Array | None = None,
        return_hidden: bool = False,
    ) -> Array:
        """Logits [b, L, vocab] for ``tokens``, conditioned on the user (only at the token
        positions ``logits_index`` [b, n] if given, as ``Decoder`` does; the final hidden
        states instead with ``return_hidden``, for ``token_logits`` / ``item_logits``).

        Pass ``user_features`` (the encoder runs), or a precomputed ``context`` from
        ``encode_user`` (decoding reuses it at every step). In soft-prompt decoding the prompt
        is prepended only by the prefill call (``prepend_soft_prompt``).
        """
        if context is None:
            if user_features is None:
                raise ValueError("UserLLM needs user_features or a precomputed context")
            context, context_mask = self.encode_user(user_features, deterministic)
        if self.integration.item_head and self.is_initializing():  # create its parameters
            self.item_logits(jnp.zeros((1, self.decoder_config.embed_dim), context.dtype))
        token_inputs = {
            "positions": positions,
            "segment_ids": segment_ids,
            "prefix_mask": prefix_mask,
            "input_mask": input_mask,
            "logits_index": logits_index,
            "decode": decode,
            "deterministic": deterministic,
            "return_hidden": return_hidden,
        }
        if self.integration.mode == "soft_prompt":
            return self._soft_prompt(
                tokens, context, context_mask, prepend_soft_prompt, **token_inputs
            )
        return self.decoder(
            tokens, user_context=context, user_context_mask=context_mask, **token_inputs
        )

    def token_logits(self, hidden: Array) -> Array:
        """The LLM's vocabulary logits of final hidden states (``return_hidden``'s output)."""
        return self.decoder.output_logits(hidden)

    def item_logits(self, hidden: Array) -> Array:
        """[b, V] scores of every item from the LLM's final hidden state [b, D] (item head).

        The head maps the LLM state into the encoder's hidden space; the phase-1 encoder's own
        next-item head (its query map and output table, frozen with the encoder) scores it. So
        the LLM reaches the encoder's ranking exactly when its state carries what the encoder's
        last state does; with a generic question and frozen LLM weights, only cross-attention
        to the user context can put it there.
        """
        query = self.item_head(hidden)
        return self.user_encoder.feature_logits(query, self.integration.item_feature)

    def encoder_item_scores(self, user_features: Mapping[str, Array]) -> Array:
        """[b, V] the encoder head's next-item scores after each history (``belief_scores``:
        history, padding and OOV at ``-inf``), without gradient: the item head's teacher."""
        hidden = self.user_encoder(user_features, True)
        feature = self.integration.item_feature
        return jax.lax.stop_gradient(
            belief_scores(self.user_encoder, hidden, user_features, feature)
        )

    def _soft_prompt(
        self,
        tokens: Array,
        context: Array,
        context_mask: Array,
        prepend: bool,
        *,
        positions: Array | None,
        segment_ids: Array | None,
        prefix_mask: Array | None,
        input_mask: Array | None,
        logits_index: Array | None,
        **run: bool,
    ) -> Array:
        """The decoder over [the context as n soft-prompt slots; the tokens] (``prepend``), or
        over the tokens alone at positions after the slots (cached decoding steps).
        ``run``: ``decode``, ``deterministic``, ``return_hidden``, passed on."""
        decode = run["decode"]
        if segment_ids is not None and (prepend or not decode):
            raise ValueError("soft_prompt mode does not support packed batches (segment ids)")
        batch, length = tokens.shape
        n = context.shape[1]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        positions = positions + n  # token positions follow the n soft-prompt slots
        token_mask = jnp.ones((batch, length), bool) if input_mask is None else input_mask
        embeddings = self.decoder.embed(tokens)
        if not prepend:
            return self.decoder(
                tokens,
                positions=positions,
                segment_ids=segment_ids,
                input_mask=token_mask,
                input_embeddings=embeddings,
                logits_index=logits_index,
                **run,
            )
        soft_positions = jnp.broadcast_to(jnp.arange(n), (batch, n))
        full_prefix = None
        if prefix_mask is not None:
            full_prefix = jnp.concatenate([jnp.ones((batch, n), prefix_mask.dtype), prefix_mask], 1)
        logits = self.decoder(
            jnp.concatenate([jnp.zeros((batch, n), tokens.dtype), tokens], axis=1),
            positions=jnp.concatenate([soft_positions, positions], axis=1),
            prefix_mask=full_prefix,
            input_mask=jnp.concatenate([context_mask.astype(bool), token_mask.astype(bool)], 1),
            input_embeddings=jnp.concatenate([context.astype(embeddings.dtype), embeddings], 1),
            logits_index=None if logits_index is None else logits_index + n,
            **run,
        )
        return logits if logits_index is not None else logits[:, n:]
