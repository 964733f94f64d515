"""Model wrappers, after T5X's ``DecoderOnlyModel``: loss, scoring, prediction, initialization.

A wrapper owns a Flax module and speaks the batch keys of SeqIO's decoder feature converters:
``decoder_input_tokens``, ``decoder_target_tokens``, ``decoder_loss_weights``, and for packed
batches ``decoder_segment_ids`` / ``decoder_positions``; ``decoder_causal_attention`` marks a
prefix-LM prompt (bidirectional, and the part ``predict_batch`` conditions on).

Subclasses (User-LLM) add inputs to the module through ``module_inputs``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from user_llm import decoding
from user_llm import user_encoder as ue
from user_llm.decoder import Decoder, module_cache
from user_llm.errors import ConfigError
from user_llm.feature_names import FIRST_ITEM_ID, ITEM_TARGET, USER_PREFIX

Array = jax.Array
Batch = Mapping[str, Array]
Params = Any


@runtime_checkable
class TrainableModel(Protocol):
    """What ``user_llm.train`` and ``train_step`` need of a model, whatever it is (T5X's
    ``BaseModel``, trimmed): the decoder LMs, User-LLM and the phase-1 encoders all satisfy it.
    Evaluation needs more of each kind (``score_candidates`` / ``predict_batch`` of an LLM,
    ``score_next_items`` of an encoder)."""

    module: nn.Module

    def loss_terms(
        self, params: Params, batch: Batch, dropout_rng: Array | None
    ) -> tuple[Array, Array, dict[str, Array]]:
        """(summed loss, summed weight, summed metrics): sums, so accumulation is exact."""
        ...

    def loss_fn(
        self, params: Params, batch: Batch, dropout_rng: Array | None
    ) -> tuple[Array, dict[str, Array]]:
        """(mean loss, metrics) of one batch."""
        ...

    def diagnostics(self, params: Params, batch: Batch) -> dict[str, Array]:
        """Scalars to log next to the loss (gates, norms); {} when there are none."""
        ...

    def input_features(self) -> frozenset[str]:
        """The batch features the model reads: a dataset lacking one is refused before any
        step (``check_input_features``), not met as a KeyError inside a traced function."""
        ...

    def get_initial_variables(
        self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]], input_types: Any = None
    ) -> Any:
        """Every variable of ``module`` (boxed with their logical axes) for these inputs."""
        ...


@runtime_checkable
class LanguageModel(TrainableModel, Protocol):
    """A trainable model that reads and writes text (the decoder LMs and User-LLM): what
    evaluation and generation call (T5X's ``score_batch`` / ``predict_batch_with_aux``)."""

    def score_batch(self, params: Params, batch: Batch) -> Array:
        """Per-example log-likelihood [b] of the targets."""
        ...

    def score_candidates(self, params: Params, batch: Batch, candidates: Array) -> Array:
        """Log-likelihood [b, C] of each of C candidate continuations of each prompt."""
        ...

    def predict_batch_with_aux(
        self, params: Params, batch: Batch, rng: Array | None = None, **kw: Any
    ) -> tuple[Array, dict[str, Array]]:
        """(continuation tokens [b, T], {"scores": [b], "logprobs": [b, T]})."""
        ...


@runtime_checkable
class NextItemRanker(TrainableModel, Protocol):
    """A trainable model that ranks the catalogue for a user's next item without text (the
    phase-1 user encoders): what ``encoder_eval`` and the evaluation of encoder heads call."""

    def score_next_items(
        self, params: Params, batch: Batch, item_feature: str = ..., pooling: str = ...
    ) -> Array:
        """Scores [b, num_items] for the item after each row's last interaction."""
        ...


def cross_entropy_terms(
    logits: Array, targets: Array, weights: Array, z_loss: float = 0.0
) -> tuple[Array, Array, dict[str, Array]]:
    """Token-summed cross entropy (plus optional z-loss) and its normalizer (sum of weights).

    Returning sums rather than a mean lets gradient accumulation reproduce the large-batch loss
    exactly: the train step divides the summed gradients by the summed weights once.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    weights = weights.astype(jnp.float32)
    loss = jnp.sum(nll * weights)
    z_term = jnp.sum(z_loss * jnp.square(log_z) * weights)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    metrics = {
        "cross_entropy_sum": loss,
        "z_loss_sum": z_term,
        "correct_sum": jnp.sum(correct * weights),
    }
    return loss + z_term, jnp.sum(weights), metrics


def distillation_kl(teacher_logits: Array, student_logits: Array, weights: Array) -> Array:
    """Summed KL(softmax(teacher) || softmax(student)) over rows [b, V], weighted per row [b].

    Teacher logits may be ``-inf`` (items the teacher rules out): those terms are 0.
    """
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(log_p)
    terms = jnp.where(p > 0, p * (jnp.where(p > 0, log_p, 0.0) - log_q), 0.0)
    return jnp.sum(jnp.sum(terms, axis=-1) * weights.astype(jnp.float32))


def check_input_features(model: TrainableModel, available: Iterable[str], source: str) -> None:
    """Raises ``ConfigError`` naming the features ``model`` reads that ``source`` (a mixture or
    task, as the error should name it) does not give."""
    available = set(available)
    missing = sorted(model.input_features() - available)
    if missing:
        raise ConfigError(
            f"{type(model).__name__} reads {missing}, which {source} does not give (it gives "
            f"{sorted(available)}); check the task's output features and the model's gin "
            "(encoder features, DatasetConfig.passthrough_features)"
        )


@dataclasses.dataclass(frozen=True)
class DecodeInputs:
    """What each cached call of one batch adds to the module's inputs, computed once per batch
    before the loop (User-LLM encodes the user here)."""

    prefill: Mapping[str, Any]  # keyword inputs of the call that reads the prompts
    step: Mapping[str, Any]  # ... of every later call (decoding steps, candidates)
    extra_slots: int = 0  # cache slots the prefill fills beyond the prompt (a soft prompt)


@dataclasses.dataclass(frozen=True)
class CachedDecoding:
    """One batch's cached decoding, the single path that generation, candidate scoring and the
    benchmarks share.

    ``cache`` starts empty. ``prefill`` reads the prompts into it and returns the logits of each
    prompt's last real token ([b, 1, V]); the prompt is bidirectional unless the model reads it
    causally (as training did). ``append`` adds tokens after what is cached: one decoding step,
    or candidate continuations as ``segment_ids`` >= 1 that each see the prompt and their own
    tokens only. Both map (tokens, input_mask, positions, cache) to (logits, cache), the
    ``decoding.StepFn`` that ``decoding.decode`` takes.
    """

    module: nn.Module
    params: Params
    inputs: DecodeInputs
    prompt_prefix: Array | None
    cache: Any

    def prefill(
        self, tokens: Array, input_mask: Array, positions: Array, cache: Any
    ) -> tuple[Array, Any]:
        last = jnp.sum(input_mask, axis=-1, keepdims=True) - 1
        return self._call(
            tokens,
            input_mask,
            positions,
            cache,
            self.inputs.prefill,
            prefix_mask=self.prompt_prefix,
            logits_index=last,
        )

    def append(
        self,
        tokens: Array,
        input_mask: Array,
        positions: Array,
        cache: Any,
        segment_ids: Array | None = None,
    ) -> tuple[Array, Any]:
        return self._call(
            tokens, input_mask, positions, cache, self.inputs.step, segment_ids=segment_ids
        )

    def _call(self, tokens, input_mask, positions, cache, inputs, **kwargs):
        """One ``decode=True`` apply that appends ``tokens`` to ``cache``; ``kwargs`` are the
        call's own module inputs (``prefix_mask``, ``segment_ids``, ``logits_index``)."""
        logits, mutated = self.module.apply(
            {"params": self.params, "cache": cache},
            tokens,
            positions=positions,
            input_mask=input_mask,
            decode=True,
            mutable=["cache"],
            **inputs,
            **kwargs,
        )
        return logits, mutated["cache"]


class DecoderOnlyModel:
    """Decoder-only LM: ``loss_fn``, ``score_batch``, ``predict_batch[_with_aux]``, init."""

    def __init__(
        self,
        module: Decoder,
        *,
        z_loss: float = 0.0,
        eos_id: int | None = 1,
        max_decode_length: int = 32,
        causal_prompt: bool = False,
        loss_positions: int | None = None,
    ) -> None:
        if loss_positions is not None and loss_positions < 1:
            raise ValueError(f"loss_positions must be at least 1 (or None), got {loss_positions}")
        self.module = module
        self.z_loss = z_loss
        self.eos_id = eos_id
        self.max_decode_length = max_decode_length
        # True: the prompt (``decoder_causal_attention`` part) is read causally, as a pretrained
        # causal LLM was trained to read it, instead of bidirectionally (prefix LM). The loss
        # still covers the targets only (``decoder_loss_weights``).
        self.causal_prompt = causal_prompt
        # N: the training loss computes logits at only the first N loss-bearing positions of a
        # row, not at all of them. Unpacked prefix-LM batches carry loss on the targets alone
        # (SeqIO trims them to the targets length), so with N = that length the loss is the same
        # while a long text prompt no longer pays the vocabulary projection (49,152 x 576 for
        # SmolLM2) and its [length, vocab] logits at every prompt token. A row with more loss
        # tokens than N makes the loss NaN (the run stops, naming it), never silently smaller.
        self.loss_positions = loss_positions

    def input_features(self) -> frozenset[str]:
        """SeqIO's decoder batch keys that training reads (the rest are optional)."""
        return frozenset(("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"))

    def prefix_mask(self, batch: Batch) -> Array | None:
        """The bidirectional-prompt mask the module gets (None when prompts are causal)."""
        return None if self.causal_prompt else batch.get("decoder_causal_attention")

    # -- inputs ---------------------------------------------------------------------------
    def module_inputs(self, batch: Batch) -> dict[str, Array]:
        """Extra keyword inputs to the module beyond tokens and masks (none for a plain LM)."""
        del batch
        return {}

    def _forward(
        self,
        params: Params,
        batch: Batch,
        dropout_rng: Array | None,
        deterministic: bool,
        logits_index: Array | None = None,
        **kwargs: Any,
    ) -> Array:
        rngs = None if dropout_rng is None else {"dropout": dropout_rng}
        return self.module.apply(
            {"params": params},
            batch["decoder_input_tokens"],
            positions=batch.get("decoder_positions"),
            segment_ids=batch.get("decoder_segment_ids"),
            prefix_mask=self.prefix_mask(batch),
            deterministic=deterministic,
            rngs=rngs,
            logits_index=logits_index,
            **self.module_inputs(batch),
            **kwargs,
        )

    # -- training -------------------------------------------------------------------------
    def loss_terms(
        self, params: Params, batch: Batch, dropout_rng: Array | None
    ) -> tuple[Array, Array, dict[str, Array]]:
        """(summed loss, summed weights, summed metrics): the accumulation-friendly form."""
        targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
        n = self.loss_positions
        if n is None or n >= targets.shape[1]:
            logits = self._forward(params, batch, dropout_rng, deterministic=dropout_rng is None)
            return cross_entropy_terms(logits, targets, weights, self.z_loss)
        index = loss_position_index(weights, n)
        logits = self._forward(params, batch, dropout_rng, dropout_rng is None, logits_index=index)
        return self._indexed_cross_entropy(logits, batch, index)

    def _indexed_cross_entropy(
        self, logits: Array, batch: Batch, index: Array
    ) -> tuple[Array, Array, dict[str, Array]]:
        """``cross_entropy_terms`` of logits taken at ``index`` (``loss_position_index``); NaN
        when a row has more loss-bearing positions than ``index`` covers."""
        targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
        loss, weight, metrics = cross_entropy_terms(
            logits,
            jnp.take_along_axis(targets, index, axis=1),
            jnp.take_along_axis(weights, index, axis=1),
            self.z_loss,
        )
        dropped = jnp.sum(jnp.maximum(jnp.sum(weights > 0, axis=1) - index.shape[1], 0))
        loss = jnp.where(dropped > 0, jnp.nan, loss)
        return loss, weight, {**metrics, "dropped_loss_tokens_sum": dropped.astype(jnp.float32)}

    def loss_fn(
        self, params: Params, batch: Batch, dropout_rng: Array | None
    ) -> tuple[Array, dict[str, Array]]:
        """Mean loss per target token, and metrics (T5X signature)."""
        loss, weight, metrics = self.loss_terms(params, batch, dropout_rng)
        denom = jnp.maximum(weight, 1.0)
        return loss / denom, {
            "loss": loss / denom,
            "accuracy": metrics["correct_sum"] / denom,
            "num_tokens": weight,
        }

    # -- evaluation -----------------------------------------------------------------------
    def score_batch(self, params: Params, batch: Batch) -> Array:
        """Per-example log-likelihood of the targets (weighted by ``decoder_loss_weights``)."""
        logits = self._forward(params, batch, None, deterministic=True)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        token_logp = jnp.take_along_axis(logp, batch["decoder_target_tokens"][..., None], -1)[
            ..., 0
        ]
        return jnp.sum(token_logp * batch["decoder_loss_weights"].astype(jnp.float32), axis=-1)

    def predict_batch(
        self, params: Params, batch: Batch, rng: Array | None = None, **kw: Any
    ) -> Array:
        return self.predict_batch_with_aux(params, batch, rng, **kw)[0]

    def predict_batch_with_aux(
        self,
        params: Params,
        batch: Batch,
        rng: Array | None = None,
        *,
        max_decode_length: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        suppress_ids: Sequence[int] = (),
    ) -> tuple[Array, dict[str, Array]]:
        """Continues each prompt; returns (tokens [b, max_decode_length], {"scores": summed
        log-probability of the tokens, "logprobs": each token's [b, max_decode_length]}).

        The prompt is the ``decoder_causal_attention`` part of ``decoder_input_tokens`` (the
        shifted BOS plus the inputs, as SeqIO's prefix-LM converter lays them out); without it
        the prompt is the BOS alone. ``suppress_ids`` are never generated.
        """
        max_decode_length = max_decode_length or self.max_decode_length
        prompts, lengths = self._prompts(batch)
        run = self.cached_decoding(params, batch, prompts.shape[1], max_decode_length)
        out, logprobs = decoding.decode(
            run.append,
            prompts,
            lengths,
            run.cache,
            max_decode_length=max_decode_length,
            eos_id=self.eos_id,
            rng=rng,
            temperature=temperature,
            top_k=top_k,
            prefill_fn=run.prefill,
            suppress_ids=suppress_ids,
        )
        return out, {"scores": jnp.sum(logprobs, axis=-1), "logprobs": logprobs}

    def _prompts(self, batch: Batch) -> tuple[Array, Array]:
        """(right-padded prompts [b, P], lengths [b]): the ``decoder_causal_attention`` part of
        ``decoder_input_tokens`` (the shifted BOS plus the inputs, as SeqIO's prefix-LM converter
        lays them out); without it the prompt is the BOS alone."""
        tokens = batch["decoder_input_tokens"]
        if "decoder_causal_attention" in batch:
            lengths = jnp.maximum(jnp.sum(batch["decoder_causal_attention"], axis=-1), 1)
            return tokens, lengths.astype(jnp.int32)
        return tokens[:, :1], jnp.ones((tokens.shape[0],), jnp.int32)

    def cached_decoding(
        self, params: Params, batch: Batch, prompt_len: int, new_tokens: int
    ) -> CachedDecoding:
        """The ``CachedDecoding`` of ``batch``: a cache with room for its prompts (padded to
        ``prompt_len``) and ``new_tokens`` more, and the calls that fill it."""
        inputs = self.decode_inputs(params, batch)
        batch_size = batch["decoder_input_tokens"].shape[0]
        cache = self.init_cache(batch_size, inputs.extra_slots + prompt_len + new_tokens)
        prefix = self.prefix_mask(batch) if prompt_len > 1 else None
        return CachedDecoding(self.module, params, inputs, prefix, cache)

    def score_candidates(self, params: Params, batch: Batch, candidates: Array) -> Array:
        """Log-likelihood [b, C] of each of C candidate continuations of each prompt.

        candidates: [b, C, Lc] token ids, right-padded with 0 (end them with EOS so a title is
        not credited for being a prefix of a longer one). The prompt is read once into the KV
        cache; all C candidates are then appended in one call as separate segments that share
        that cache (none sees another), so ranking 20 titles after a long text prompt costs
        little more than reading it once, and memory does not grow with a copy per candidate.
        """
        return self.score_and_predict(params, batch, candidates, max_decode_length=0)[0]

    def score_and_predict(
        self,
        params: Params,
        batch: Batch,
        candidates: Array,
        max_decode_length: int,
        packed_width: int | None = None,
    ) -> tuple[Array, Array]:
        """(``score_candidates``, greedy ``predict_batch`` tokens) from one prefill of the
        prompts (``max_decode_length`` 0: no generation, the tokens are empty).

        The candidates' real tokens are packed end to end, padding dropped, into one row of
        ``packed_width`` slots per prompt (default C * Lc; pass at least the most real tokens
        any row has, e.g. ``packed_candidate_width``): titles of ~10 tokens padded to 24 cost
        ~10 tokens each, not 24.
        """
        b, num, cand_len = candidates.shape
        width = packed_width or num * cand_len
        prompts, lengths = self._prompts(batch)
        run = self.cached_decoding(params, batch, prompts.shape[1], max(width, max_decode_length))
        prompt_mask = jnp.arange(prompts.shape[1])[None, :] < lengths[:, None]
        positions = jnp.broadcast_to(jnp.arange(prompts.shape[1]), prompts.shape)
        logits, cache = run.prefill(prompts, prompt_mask, positions, run.cache)
        first = logits[:, 0]  # [b, V]: the prefill returns the last prompt position's logits
        # Pack: token j of candidate c goes to slot offset[c] + j (padding to a dump slot),
        # as segment c + 1 at position length + j, so it sees the prompt and its own tokens.
        valid = candidates != 0
        count = jnp.sum(valid, axis=-1)
        slot = (jnp.cumsum(count, axis=1) - count)[..., None] + jnp.arange(cand_len)
        slot = jnp.where(valid, slot, width)  # [b, C, Lc]
        rows = jnp.arange(b)[:, None, None]

        def pack(values: Array) -> Array:
            return jnp.zeros((b, width + 1), jnp.int32).at[rows, slot].set(values)[:, :width]

        seg_ids = jnp.broadcast_to(jnp.arange(1, num + 1)[None, :, None], candidates.shape)
        pos = jnp.broadcast_to(lengths[:, None, None] + jnp.arange(cand_len), candidates.shape)
        packed = pack(candidates)
        cand_logits, _ = run.append(packed, packed != 0, pack(pos), cache, pack(seg_ids))
        # Token j of a candidate is predicted by the prompt's last logits (j = 0) or by the
        # candidate's own token j - 1 (the slot before it).
        cand_logits = cand_logits.astype(jnp.float32)
        lse = jax.nn.logsumexp(cand_logits, axis=-1)  # [b, width]
        prev = jnp.clip(slot - 1, 0, width - 1)
        from_packed = cand_logits[rows, prev, candidates] - lse[rows, prev]
        first = first.astype(jnp.float32)
        first_logp = jnp.take_along_axis(first, candidates[:, :, 0], axis=-1) - jax.nn.logsumexp(
            first, axis=-1, keepdims=True
        )
        token_logp = from_packed.at[:, :, 0].set(first_logp)
        scores = jnp.sum(token_logp * valid, axis=-1)
        # A row whose candidates do not fit the packed width would lose tokens: NaN, not a
        # silently wrong score.
        scores = jnp.where((jnp.sum(count, axis=1) > width)[:, None], jnp.nan, scores)
        if max_decode_length == 0:
            return scores, jnp.zeros((b, 0), jnp.int32)
        tokens, _ = decoding.decode(
            run.append,
            prompts,
            lengths,
            cache,
            max_decode_length=max_decode_length,
            eos_id=self.eos_id,
            prefill_fn=lambda *_: (logits, cache),  # the prompts are already in the cache
        )
        return scores, tokens

    def diagnostics(self, params: Params, batch: Batch) -> dict[str, Array]:
        """Scalars that show whether a model reads its extra context ({} for a plain LM)."""
        del params, batch
        return {}

    def decode_inputs(self, params: Params, batch: Batch) -> DecodeInputs:
        """The module inputs of cached decoding beyond tokens and masks (``module_inputs``)."""
        del params
        extra = self.module_inputs(batch)
        return DecodeInputs(prefill=extra, step=extra)

    def init_cache(self, batch_size: int, length: int) -> dict[str, Any]:
        """An empty cache of ``length`` slots, derived from the module (``module_cache``)."""
        return module_cache(self.module, batch_size, length)

    # -- initialization -------------------------------------------------------------------
    def get_initial_variables(
        self,
        rng: Array,
        input_shapes: Mapping[str, tuple[int, ...]],
        input_types: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Variables (boxed with logical axes) for batches of the given shapes."""
        input_types = input_types or {}
        dummy = {
            k: jnp.zeros(shape, input_types.get(k, jnp.int32)) for k, shape in input_shapes.items()
        }
        return self.module.init(
            {"params": rng, "dropout": rng},
            dummy["decoder_input_tokens"],
            **self.module_inputs(dummy),
        )


def packed_candidate_width(candidates: np.ndarray, multiple: int = 64) -> int:
    """The ``packed_width`` for ``score_and_predict``: the most real (non-0) candidate tokens
    of any row, rounded up to ``multiple`` so that a few widths cover every batch (each width
    compiles once)."""
    most = int(np.max(np.sum(np.asarray(candidates) != 0, axis=(1, 2)), initial=1))
    return -(-most // multiple) * multiple


def param_shapes_and_axes(variables: Mapping[str, Any]) -> dict[str, Any]:
    """{'path/to/param': {'shape': [...], 'axes': [...]}}: the parameter-tree golden format."""
    flat = {}
    specs = nn.get_partition_spec(variables)
    shapes = jax.tree_util.tree_map(np.shape, nn.unbox(variables))
    for (path, shape), (_, spec) in zip(
        jax.tree_util.tree_leaves_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple)),
        jax.tree_util.tree_leaves_with_path(
            specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
        ),
        strict=True,
    ):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        flat[name] = {"shape": list(shape), "axes": list(spec)}
    return flat


def loss_position_index(weights: Array, n: int) -> Array:
    """[b, n] int32: each row's loss-bearing positions first, in order (a stable sort), then
    the others; column 0 is the answer position (the one that predicts the first target)."""
    return jnp.argsort(weights <= 0, axis=1, stable=True)[:, :n].astype(jnp.int32)


def item_targets(batch: Batch) -> Array:
    """[b] the encoder vocabulary id of each example's next item (``ITEM_TARGET``; < 2 on
    examples of other tasks, so they add no item loss)."""
    if ITEM_TARGET not in batch:
        raise ValueError(
            f"the item head needs {ITEM_TARGET!r} in the batch: add it to the dataset's "
            "passthrough_features (models/integration/item_head.gin does)"
        )
    return batch[ITEM_TARGET].astype(jnp.int32)


def user_features(batch: Batch) -> dict[str, Array]:
    """The user-history arrays of a batch: every key that starts with ``USER_PREFIX``."""
    return {k: v for k, v in batch.items() if k.startswith(USER_PREFIX)}


class UserLLMModel(DecoderOnlyModel):
    """User-LLM (``integration.UserLLM``): decoder batches plus ``user_*`` history features.

    Decoding encodes each user once and reuses the context at every step.
    """

    def module_inputs(self, batch: Batch) -> dict[str, Any]:
        return {"user_features": user_features(batch)}

    def input_features(self) -> frozenset[str]:
        """The decoder keys, the encoder's history features and, with the item head, each
        example's next-item id."""
        item = {ITEM_TARGET} if self.has_item_head else set()
        return super().input_features() | self.module.encoder_config.batch_features | item

    @property
    def has_item_head(self) -> bool:
        return bool(self.module.integration.item_head)

    def loss_terms(
        self, params: Params, batch: Batch, dropout_rng: Array | None
    ) -> tuple[Array, Array, dict[str, Array]]:
        """The LM terms; with the item head, plus ``item_loss_weight`` times its summed
        full-catalogue cross entropy (one term per example with a known next item)."""
        if not self.has_item_head:
            return super().loss_terms(params, batch, dropout_rng)
        length = batch["decoder_target_tokens"].shape[1]
        index = loss_position_index(batch["decoder_loss_weights"], self.loss_positions or length)
        hidden = self._forward(
            params, batch, dropout_rng, dropout_rng is None, logits_index=index, return_hidden=True
        )
        variables = {"params": params}
        logits = self.module.apply(variables, hidden, method="token_logits")
        loss, weight, metrics = self._indexed_cross_entropy(logits, batch, index)
        item_logits = self.module.apply(variables, hidden[:, 0], method="item_logits")
        target = item_targets(batch)
        has_loss = jnp.any(batch["decoder_loss_weights"] > 0, axis=1)
        has_item = (target >= FIRST_ITEM_ID) & has_loss
        item_loss, items, item_metrics = cross_entropy_terms(item_logits, target, has_item)
        metrics = {
            **metrics,
            "item_cross_entropy_sum": item_metrics["cross_entropy_sum"],
            "item_correct_sum": item_metrics["correct_sum"],
            "item_examples_sum": items,
        }
        integration = self.module.integration
        loss = loss + integration.item_loss_weight * item_loss
        if integration.item_distill_weight:
            teacher = self.module.apply(
                variables, user_features(batch), method="encoder_item_scores"
            )
            kl = distillation_kl(teacher, item_logits, has_item)
            metrics["item_distill_kl_sum"] = kl
            loss = loss + integration.item_distill_weight * kl
        return loss, weight, metrics

    def answer_states(self, params: Params, batch: Batch) -> Array:
        """[b, D] the LLM's final hidden state at each example's answer position (the prompt
        only: the answer's own tokens come after it): what the item head reads."""
        answer = loss_position_index(batch["decoder_loss_weights"], 1)
        hidden = self._forward(params, batch, None, True, logits_index=answer, return_hidden=True)
        return hidden[:, 0]

    def item_scores(self, params: Params, batch: Batch) -> Array:
        """[b, V] the item head's score of every item at each example's answer position."""
        states = self.answer_states(params, batch)
        return self.module.apply({"params": params}, states, method="item_logits")

    def decode_inputs(self, params: Params, batch: Batch) -> DecodeInputs:
        """The user, encoded once per batch; a soft prompt is prepended by the prefill only."""
        context, context_mask = self.module.apply(
            {"params": params}, user_features(batch), method="encode_user"
        )
        user = {"context": context, "context_mask": context_mask}
        soft_prompt = self.module.integration.mode == "soft_prompt"
        return DecodeInputs(
            prefill={**user, "prepend_soft_prompt": True},
            step={**user, "prepend_soft_prompt": False},
            extra_slots=context.shape[1] if soft_prompt else 0,
        )

    def init_cache(self, batch_size: int, length: int) -> dict[str, Any]:
        """The decoder's empty cache, under the UserLLM module's own variable tree."""
        return module_cache(
            self.module, batch_size, length, method=lambda m, t: m.decoder(t, decode=True)
        )

    def diagnostics(self, params: Params, batch: Batch) -> dict[str, Array]:
        """Is the LLM reading the user? One forward pass on ``batch``, giving per cross-attention
        layer ``gate_tanh/layer_NN`` (tanh of its gate: ~0 means the frozen LLM ignores the
        block) and ``update_to_residual/layer_NN`` (||gated update|| / ||residual stream||, mean
        over tokens), and ``perceiver_entropy/layer_N`` (the latents' attention entropy over
        the user embeddings, 1 = uniform)."""
        _, state = self.module.apply(
            {"params": params},
            batch["decoder_input_tokens"],
            positions=batch.get("decoder_positions"),
            segment_ids=batch.get("decoder_segment_ids"),
            prefix_mask=self.prefix_mask(batch),
            mutable=["intermediates"],
            **self.module_inputs(batch),
        )
        out = {}
        layers = params.get("decoder", {})
        for name, layer in layers.items():
            if name.startswith("layers_") and "context_block" in layer:
                out[f"gate_tanh/layer_{int(name[7:]):02d}"] = jnp.tanh(
                    layer["context_block"]["gate"]
                )
        gates = [v for k, v in out.items() if k.startswith("gate_tanh/")]
        if gates:  # one number that says at a glance whether any gate opened
            out["gate_tanh/max_abs"] = jnp.max(jnp.abs(jnp.stack(gates)))
        sown = state.get("intermediates", {})
        for name, layer in sown.get("decoder", {}).items():
            if "context_block" in layer:
                value = layer["context_block"]["update_to_residual"][0]
                out[f"update_to_residual/layer_{int(name[7:]):02d}"] = value
        for name, block in sown.get("perceiver", {}).items():
            if "attention_entropy" in block:
                layer = name.removeprefix("layers_").split("_")[0]
                out[f"perceiver_entropy/layer_{layer}"] = block["attention_entropy"][0]
        return out


class UserEncoderModel:
    """Phase 1: next-interaction pretraining of a user encoder. ``ARUserEncoderModel`` and
    ``DualUserEncoderModel`` are the two kinds; this base holds what they share.

    Same interface as the LM wrappers (``loss_terms``, ``loss_fn``, ``get_initial_variables``)
    so ``user_llm.train`` trains it unchanged; ``score_next_items`` ranks items for eval.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def loss_terms(
        self, params: Params, batch: Batch, dropout_rng: Array | None
    ) -> tuple[Array, Array, dict[str, Array]]:
        raise NotImplementedError

    def score_next_items(
        self,
        params: Params,
        batch: Batch,
        item_feature: str = "user_item_ids",
        pooling: str = "last",
    ) -> Array:
        """Scores [b, num_items] for the item after each row's last interaction (``pooling``:
        which encoder states the head reads, ``user_encoder.pool_states``; AR encoders only)."""
        raise NotImplementedError

    def _touch_all_parameters(self, module: nn.Module, features: Batch) -> Any:
        """Runs every submodule once (``__call__`` alone leaves some uninitialized)."""
        raise NotImplementedError

    def diagnostics(self, params: Params, batch: Batch) -> dict[str, Array]:
        del params, batch
        return {}

    def input_features(self) -> frozenset[str]:
        """The encoder's history features (its config's)."""
        return self.module.config.batch_features

    def loss_fn(self, params, batch, dropout_rng):
        loss, weight, metrics = self.loss_terms(params, batch, dropout_rng)
        denom = jnp.maximum(weight, 1.0)
        return loss / denom, {"loss": loss / denom, "accuracy": metrics["correct_sum"] / denom}

    def get_initial_variables(self, rng, input_shapes, input_types=None):
        input_types = input_types or {}
        dummy = {k: jnp.zeros(s, input_types.get(k, jnp.int32)) for k, s in input_shapes.items()}
        return self.module.init(
            {"params": rng, "dropout": rng}, user_features(dummy), method=self._touch_all_parameters
        )


class ARUserEncoderModel(UserEncoderModel):
    """An autoregressive ``UserEncoder``: each position predicts the next interaction's
    features (``user_encoder.next_feature_loss``); items are scored by its next-item head."""

    def loss_terms(self, params, batch, dropout_rng):
        features = user_features(batch)
        rngs = None if dropout_rng is None else {"dropout": dropout_rng}

        def loss(module, features):
            hidden = module(features, deterministic=dropout_rng is None)
            return ue.next_feature_loss(module, hidden, features, dropout_rng)

        return self.module.apply({"params": params}, features, rngs=rngs, method=loss)

    def score_next_items(self, params, batch, item_feature="user_item_ids", pooling="last"):
        def score(module, features):
            hidden = module(features)
            pooled = ue.pool_states(hidden, features[module.config.mask_feature], pooling)
            return module.feature_logits(pooled, item_feature)

        return self.module.apply({"params": params}, user_features(batch), method=score)

    def _touch_all_parameters(self, module, features):
        hidden = module(features)  # the pretraining heads are not used by ``__call__``
        return [module.feature_logits(hidden, name) for name in module.config.predict_features]


class DualUserEncoderModel(UserEncoderModel):
    """A ``DualEncoder``: in-batch softmax of each user's history (minus its last item) against
    every row's last item, on cosine similarities divided by ``temperature`` (0.05: logits in
    [-20, 20], so the softmax can be sharp although both vectors have unit norm)."""

    def __init__(self, module: nn.Module, temperature: float = 0.05) -> None:
        super().__init__(module)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def loss_terms(self, params, batch, dropout_rng):
        del dropout_rng  # the dual encoder has no dropout
        return self.module.apply({"params": params}, user_features(batch), method=self._loss)

    def _loss(self, module, features):
        history, last = ue.split_last_interaction(features, module.config.mask_feature)
        user = module.user_vector(history)
        target = jnp.take_along_axis(features[module.item_feature], last[:, None], axis=1)[:, 0]
        items = module.item_vector(target)
        logits = (user @ items.T / self.temperature).astype(jnp.float32)
        valid = (jnp.sum(history[module.config.mask_feature], axis=1) > 0).astype(jnp.float32)
        same = target[:, None] == target[None, :]
        logits = jnp.where(same & ~jnp.eye(len(target), dtype=bool), -1e9, logits)
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.diagonal(logits)
        correct = (jnp.argmax(logits, axis=-1) == jnp.arange(len(target))).astype(jnp.float32)
        loss = jnp.sum(nll * valid)
        metrics = {"cross_entropy_sum": loss, "correct_sum": jnp.sum(correct * valid)}
        return loss, jnp.sum(valid), metrics

    def score_next_items(self, params, batch, item_feature="user_item_ids", pooling="last"):
        if pooling != "last":
            raise ValueError(
                f"pooling={pooling!r}: the dual encoder's user vector has its own pooling "
                "(its last position, through its user head); only 'last' applies"
            )

        def score(module, features):
            user = module.user_vector(features)
            return user @ module.item_vector(jnp.arange(module.item_table.num_embeddings)).T

        return self.module.apply({"params": params}, user_features(batch), method=score)

    def _touch_all_parameters(self, module, features):
        return module.user_vector(features), module.item_vector(features[module.item_feature])
