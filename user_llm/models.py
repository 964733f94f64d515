"""Model wrappers, after T5X's ``DecoderOnlyModel``: loss, scoring, prediction, initialization.

A wrapper owns a Flax module and speaks the batch keys of SeqIO's decoder feature converters:
``decoder_input_tokens``, ``decoder_target_tokens``, ``decoder_loss_weights``, and for packed
batches ``decoder_segment_ids`` / ``decoder_positions``; ``decoder_causal_attention`` marks a
prefix-LM prompt (bidirectional, and the part ``predict_batch`` conditions on).

Subclasses (User-LLM) add inputs to the module through ``module_inputs``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from user_llm import decoding
from user_llm.decoder import Decoder, init_cache

Array = jax.Array
Batch = Mapping[str, Array]
Params = Any


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


class DecoderOnlyModel:
    """Decoder-only LM: ``loss_fn``, ``score_batch``, ``predict_batch[_with_aux]``, init."""

    def __init__(
        self,
        module: Decoder,
        *,
        z_loss: float = 0.0,
        eos_id: int | None = 1,
        max_decode_length: int = 32,
    ) -> None:
        self.module = module
        self.z_loss = z_loss
        self.eos_id = eos_id
        self.max_decode_length = max_decode_length

    # -- inputs ---------------------------------------------------------------------------
    def module_inputs(self, batch: Batch) -> dict[str, Array]:
        """Extra keyword inputs to the module beyond tokens and masks (none for a plain LM)."""
        del batch
        return {}

    def _forward(
        self, params: Params, batch: Batch, dropout_rng: Array | None, deterministic: bool
    ) -> Array:
        rngs = None if dropout_rng is None else {"dropout": dropout_rng}
        return self.module.apply(
            {"params": params},
            batch["decoder_input_tokens"],
            positions=batch.get("decoder_positions"),
            segment_ids=batch.get("decoder_segment_ids"),
            prefix_mask=batch.get("decoder_causal_attention"),
            deterministic=deterministic,
            rngs=rngs,
            **self.module_inputs(batch),
        )

    # -- training -------------------------------------------------------------------------
    def loss_terms(
        self, params: Params, batch: Batch, dropout_rng: Array | None
    ) -> tuple[Array, Array, dict[str, Array]]:
        """(summed loss, summed weights, summed metrics): the accumulation-friendly form."""
        logits = self._forward(params, batch, dropout_rng, deterministic=dropout_rng is None)
        return cross_entropy_terms(
            logits,
            batch["decoder_target_tokens"],
            batch["decoder_loss_weights"],
            self.z_loss,
        )

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
    ) -> tuple[Array, dict[str, Array]]:
        """Continues each prompt; returns (tokens [b, max_decode_length], {"scores": ...}).

        The prompt is the ``decoder_causal_attention`` part of ``decoder_input_tokens`` (the
        shifted BOS plus the inputs, as SeqIO's prefix-LM converter lays them out); without it
        the prompt is the BOS alone.
        """
        tokens = batch["decoder_input_tokens"]
        max_decode_length = max_decode_length or self.max_decode_length
        if "decoder_causal_attention" in batch:
            lengths = jnp.maximum(jnp.sum(batch["decoder_causal_attention"], axis=-1), 1)
            prompt_len = tokens.shape[1]
        else:
            lengths = jnp.ones((tokens.shape[0],), jnp.int32)
            prompt_len = 1
        prompts = tokens[:, :prompt_len]
        prompt_prefix = batch.get("decoder_causal_attention")
        extra = self.module_inputs(batch)
        cache = init_cache(self.module.config, tokens.shape[0], prompt_len + max_decode_length)

        def step_fn(step_tokens, input_mask, positions, cache):
            # The prefill call sees the prompt bidirectionally, as prefix-LM training did.
            is_prefill = step_tokens.shape[1] == prompt_len and prompt_len > 1
            logits, mutated = self.module.apply(
                {"params": params, "cache": cache},
                step_tokens,
                positions=positions,
                input_mask=input_mask,
                prefix_mask=prompt_prefix if is_prefill else None,
                decode=True,
                mutable=["cache"],
                **extra,
            )
            return logits, mutated["cache"]

        out, logprobs = decoding.decode(
            step_fn,
            prompts,
            lengths,
            cache,
            max_decode_length=max_decode_length,
            eos_id=self.eos_id,
            rng=rng,
            temperature=temperature,
            top_k=top_k,
        )
        return out, {"scores": jnp.sum(logprobs, axis=-1)}

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
