"""User encoders: turn an interaction history into embeddings (phase 1 of User-LLM).

- ``UserEncoder``: autoregressive Transformer over interactions. Each interaction has several
  features (item id, rating bucket, time bucket, multi-valued genres, an optional precomputed
  dense item-text embedding). *Early fusion* combines the feature embeddings of an interaction
  and runs one causal Transformer; *late fusion* runs one Transformer per feature and fuses the
  outputs. Pretraining predicts the next interaction's features (full or sampled softmax).
- *Item titles* (``item_text_table``): an item feature's embedding adds a projection of a frozen
  per-item text vector (e.g. the mean of the LLM's own token embeddings of the item's title, as
  written by ``python -m user_llm.item_text_table``). The tied next-item head scores through the
  same projection, so the encoder's states live partly in a space the LLM already reads: an
  LLM that learns one shared map from it can name items it never saw in phase 2.
- ``DualEncoder``: a user tower (the same Transformer, pooled at the last interaction) and an
  item tower, trained with in-batch softmax; it yields one user vector.

Histories are right-padded (most recent interaction last, then padding) with a boolean mask;
attention is causal, so padding never reaches a real position.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from user_llm.decoder import DecoderConfig, DecoderLayer, attention_mask
from user_llm.layers import Array, DenseGeneral, Embed, RMSNorm, constrain

FeatureSizes = tuple[tuple[str, int], ...]


def _as_pairs(value: Mapping[str, int] | FeatureSizes) -> FeatureSizes:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple((str(k), int(v)) for k, v in items)


@dataclasses.dataclass(frozen=True)
class UserEncoderConfig:
    """Features are named by their batch keys; sizes are vocabulary sizes (pad 0 included)
    for categorical and multi-valued features and the width for dense ones."""

    categorical_features: FeatureSizes = (("user_item_ids", 1000),)
    multivalued_features: FeatureSizes = ()
    dense_features: FeatureSizes = ()
    mask_feature: str = "user_mask"
    fusion: str = "early"
    embed_dim: int = 64
    feature_embed_dim: int = 32
    num_layers: int = 2
    num_heads: int = 4
    head_dim: int = 16
    mlp_dim: int = 128
    dropout_rate: float = 0.0
    # Pretraining targets: categorical or multi-valued feature names.
    predict_features: tuple[str, ...] = ("user_item_ids",)
    # 0: full softmax over a feature's vocabulary; N > 0: N shared uniform negatives.
    sampled_softmax_negatives: int = 0
    # A .npy [vocabulary size of item_text_feature, D] of frozen per-item text vectors ("": none).
    item_text_table: str = ""
    item_text_feature: str = "user_item_ids"

    def __post_init__(self) -> None:
        for name in ("categorical_features", "multivalued_features", "dense_features"):
            object.__setattr__(self, name, _as_pairs(getattr(self, name)))
        object.__setattr__(self, "predict_features", tuple(self.predict_features))
        if self.fusion not in ("early", "late"):
            raise ValueError(f"fusion must be 'early' or 'late', got {self.fusion!r}")
        known = {k for k, _ in self.categorical_features + self.multivalued_features}
        unknown = [f for f in self.predict_features if f not in known]
        if unknown:
            raise ValueError(
                f"predict_features {unknown} are not categorical/multi-valued features"
            )
        if not self.categorical_features + self.multivalued_features + self.dense_features:
            raise ValueError("UserEncoderConfig needs at least one feature")
        if self.item_text_table and self.item_text_feature not in dict(self.categorical_features):
            raise ValueError(
                f"item_text_feature {self.item_text_feature!r} is not a categorical feature "
                f"(have {[k for k, _ in self.categorical_features]})"
            )

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(
            k
            for k, _ in self.categorical_features + self.multivalued_features + self.dense_features
        )

    @property
    def batch_features(self) -> frozenset[str]:
        """Every batch feature the encoder reads: its input features and the mask."""
        return frozenset(self.feature_names + (self.mask_feature,))

    @property
    def vocab_sizes(self) -> dict[str, int]:
        return dict(self.categorical_features + self.multivalued_features)

    def transformer_config(self) -> DecoderConfig:
        return DecoderConfig(
            vocab_size=1,
            embed_dim=self.embed_dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_heads,
            head_dim=self.head_dim,
            mlp_dim=self.mlp_dim,
            dropout_rate=self.dropout_rate,
        )


class FeatureEmbedder(nn.Module):
    """One embedding per feature: lookup, masked mean over multi-values, or a projection."""

    config: UserEncoderConfig

    def setup(self) -> None:
        cfg = self.config
        width = cfg.feature_embed_dim
        self.tables = {
            name: Embed(size, width, init_stddev=0.02)
            for name, size in cfg.categorical_features + cfg.multivalued_features
        }
        self.projections = {
            name: DenseGeneral((width,), ("mlp", "embed")) for name, _ in cfg.dense_features
        }
        if cfg.item_text_table:
            rows = dict(cfg.categorical_features)[cfg.item_text_feature]
            # "frozen_": no strategy trains it (strategies.py); the checkpoint keeps a copy.
            self.item_text = self.param(
                "frozen_item_text",
                nn.with_logical_partitioning(
                    lambda _: jnp.asarray(load_item_text_table(cfg.item_text_table, rows)),
                    ("vocab", "mlp"),
                ),
            )
            self.item_text_projection = DenseGeneral((width,), ("mlp", "embed"))

    def _item_text(self, ids: Array | None = None) -> Array:
        """Projected text vectors of ``ids`` (every item when None)."""
        table = jax.lax.stop_gradient(self.item_text)
        return self.item_text_projection(table if ids is None else jnp.take(table, ids, axis=0))

    def __call__(self, features: Mapping[str, Array]) -> dict[str, Array]:
        cfg = self.config
        out = {}
        for name, _ in cfg.categorical_features:
            out[name] = self.tables[name](features[name])
            if cfg.item_text_table and name == cfg.item_text_feature:
                out[name] = out[name] + self._item_text(features[name])
        for name, _ in cfg.multivalued_features:
            ids = features[name]  # [b, L, G], 0 = no value
            valid = (ids > 0).astype(jnp.float32)[..., None]
            summed = jnp.sum(self.tables[name](ids) * valid, axis=-2)
            out[name] = summed / jnp.maximum(jnp.sum(valid, axis=-2), 1.0)
        for name, _ in cfg.dense_features:
            out[name] = self.projections[name](features[name].astype(jnp.float32))
        return out

    def output_table(self, name: str) -> Array:
        table = self.tables[name].embedding
        if self.config.item_text_table and name == self.config.item_text_feature:
            table = table + self._item_text()
        return table


def load_item_text_table(path: str, rows: int) -> np.ndarray:
    """The [rows, D] float32 table at ``path``; a clear error when it is not one (another
    dataset's or history length's table has another number of rows)."""
    try:
        table = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"item_text_table {path}: cannot read it as a .npy array: {e}") from e
    if table.ndim != 2 or table.shape[0] != rows or not np.issubdtype(table.dtype, np.floating):
        raise ValueError(
            f"item_text_table {path}: expected a float [{rows}, D] table (one row per id of the "
            f"item vocabulary), got {table.dtype} {list(table.shape)}; it was built for another "
            "dataset or history length"
        )
    if not np.all(np.isfinite(table)):
        raise ValueError(f"item_text_table {path}: has non-finite values")
    return table.astype(np.float32)


class TransformerStack(nn.Module):
    """Causal pre-norm Transformer (the decoder's layers) over [b, L, d] with a key mask."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool = True) -> Array:
        batch, length, _ = x.shape
        attn = attention_mask(None, None, mask, length)
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        for i in range(self.config.num_layers):
            x = DecoderLayer(self.config, name=f"layers_{i}")(
                x, attn, positions, None, None, False, deterministic, None
            )
        return RMSNorm(name="final_norm")(x)


class UserEncoder(nn.Module):
    """Autoregressive user encoder: features [b, L, ...] -> embeddings [b, L, embed_dim]."""

    config: UserEncoderConfig

    def setup(self) -> None:
        cfg = self.config
        self.embedder = FeatureEmbedder(cfg)
        tcfg = cfg.transformer_config()
        if cfg.fusion == "early":
            self.early_fusion = DenseGeneral((cfg.embed_dim,), ("mlp", "embed"))
            self.transformer = TransformerStack(tcfg)
        else:
            self.inputs = {
                n: DenseGeneral((cfg.embed_dim,), ("mlp", "embed")) for n in cfg.feature_names
            }
            self.transformers = {n: TransformerStack(tcfg) for n in cfg.feature_names}
            self.late_fusion = DenseGeneral((cfg.embed_dim,), ("mlp", "embed"))
        self.heads = {
            n: DenseGeneral((cfg.feature_embed_dim,), ("embed", "mlp"))
            for n in cfg.predict_features
        }

    def __call__(self, features: Mapping[str, Array], deterministic: bool = True) -> Array:
        cfg = self.config
        mask = features[cfg.mask_feature].astype(bool)
        embedded = self.embedder(features)
        if cfg.fusion == "early":
            x = self.early_fusion(jnp.concatenate([embedded[n] for n in cfg.feature_names], -1))
            out = self.transformer(x, mask, deterministic)
        else:
            per_feature = [
                self.transformers[n](self.inputs[n](embedded[n]), mask, deterministic)
                for n in cfg.feature_names
            ]
            out = self.late_fusion(jnp.concatenate(per_feature, axis=-1))
        out = out * mask[..., None].astype(out.dtype)
        return constrain(out, ("batch", "length", "embed"))

    def feature_logits(self, hidden: Array, name: str) -> Array:
        """Scores of every value of ``name`` for the next interaction (tied output table)."""
        query = self.heads[name](hidden)
        return jnp.einsum("...d,vd->...v", query, self.embedder.output_table(name))

    def feature_query(self, hidden: Array, name: str) -> tuple[Array, Array]:
        """(query [.., d], output table [V, d]) for sampled-softmax scoring."""
        return self.heads[name](hidden), self.embedder.output_table(name)


def last_index(mask: Array) -> Array:
    """[b] int32: each row's last valid position (right-padded histories; 0 for an empty row)."""
    return jnp.maximum(jnp.sum(mask.astype(jnp.int32), axis=1) - 1, 0)


def last_position(values: Array, mask: Array) -> Array:
    """values [b, L, ...] at each row's last valid position (right-padded histories)."""
    idx = last_index(mask)
    return jnp.take_along_axis(values, idx.reshape((-1,) + (1,) * (values.ndim - 1)), axis=1)[:, 0]


POOLINGS = ("last", "mean")


def pool_states(hidden: Array, mask: Array, pooling: str = "last") -> Array:
    """[b, D] one state per row: the last valid position's (``"last"``, what the next-item head
    is trained on) or the mean over valid positions (``"mean"``). The mean is a diagnostic:
    it is what a reader that mixes the states without telling them apart gets
    (results/phase2_recipe.md, row 12)."""
    if pooling == "last":
        return last_position(hidden, mask)
    if pooling == "mean":
        weights = mask.astype(hidden.dtype)[..., None]
        return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def next_feature_loss(
    encoder: UserEncoder,
    hidden: Array,
    features: Mapping[str, Array],
    rng: Array | None,
) -> tuple[Array, Array, dict[str, Array]]:
    """Sum over positions of the next-interaction losses, the number of predicted positions,
    and summed metrics (``correct_sum`` counts top-1 hits on the first predicted feature)."""
    cfg = encoder.config
    mask = features[cfg.mask_feature].astype(bool)
    weight = (mask[:, 1:] & mask[:, :-1]).astype(jnp.float32)
    h = hidden[:, :-1]
    total = jnp.zeros((), jnp.float32)
    metrics: dict[str, Array] = {}
    multivalued = dict(cfg.multivalued_features)
    for i, name in enumerate(cfg.predict_features):
        target = features[name][:, 1:]
        if name in multivalued:
            logits = encoder.feature_logits(h, name).astype(jnp.float32)
            labels = jnp.zeros(logits.shape, jnp.float32)
            labels = jax.vmap(jax.vmap(lambda lab, ids: lab.at[ids].set(1.0)))(labels, target)
            labels = labels.at[..., 0].set(0.0)
            bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)
            loss = jnp.sum(bce * weight)
            correct = jnp.zeros(())
        elif cfg.sampled_softmax_negatives and rng is not None:
            query, table = encoder.feature_query(h, name)
            negatives = jax.random.randint(
                jax.random.fold_in(rng, i), (cfg.sampled_softmax_negatives,), 1, table.shape[0]
            )
            pos = jnp.einsum("bld,bld->bl", query, table[target])
            neg = jnp.einsum("bld,nd->bln", query, table[negatives])
            neg = jnp.where(negatives[None, None, :] == target[..., None], -1e9, neg)
            logits = jnp.concatenate([pos[..., None], neg], axis=-1).astype(jnp.float32)
            nll = jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]
            loss = jnp.sum(nll * weight)
            correct = jnp.sum((jnp.argmax(logits, -1) == 0) * weight)
        else:
            logits = encoder.feature_logits(h, name).astype(jnp.float32)
            nll = (
                jax.nn.logsumexp(logits, axis=-1)
                - jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
            )
            loss = jnp.sum(nll * weight)
            correct = jnp.sum((jnp.argmax(logits, -1) == target) * weight)
        metrics[f"{name}_loss_sum"] = loss
        if i == 0:
            metrics["correct_sum"] = correct
        total = total + loss
    metrics["cross_entropy_sum"] = total
    return total, jnp.sum(weight), metrics


class DualEncoder(nn.Module):
    """User tower (AR Transformer pooled at the last interaction) and item tower, one vector each.

    ``__call__`` returns the user vector [b, 1, embed_dim] so it plugs into User-LLM like an
    encoder output of length 1.
    """

    config: UserEncoderConfig
    item_feature: str = "user_item_ids"

    def setup(self) -> None:
        cfg = self.config
        self.user_tower = UserEncoder(cfg)
        self.user_head = DenseGeneral((cfg.embed_dim,), ("embed", "mlp"))
        num_items = dict(cfg.categorical_features)[self.item_feature]
        self.item_table = Embed(num_items, cfg.embed_dim, init_stddev=0.02)
        self.item_head = DenseGeneral((cfg.embed_dim,), ("embed", "mlp"))

    def user_vector(self, features: Mapping[str, Array], deterministic: bool = True) -> Array:
        hidden = self.user_tower(features, deterministic)
        pooled = last_position(hidden, features[self.config.mask_feature])
        return _normalize(self.user_head(pooled))

    def item_vector(self, item_ids: Array) -> Array:
        return _normalize(self.item_head(self.item_table(item_ids)))

    def __call__(self, features: Mapping[str, Array], deterministic: bool = True) -> Array:
        return self.user_vector(features, deterministic)[:, None, :]


def _normalize(x: Array) -> Array:
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-6)


def split_last_interaction(features: Mapping[str, Any], mask_feature: str) -> tuple[dict, Array]:
    """(history without each row's last interaction, that last interaction's position)."""
    mask = features[mask_feature].astype(bool)
    last = last_index(mask)
    keep = mask & (jnp.arange(mask.shape[1])[None, :] < last[:, None])
    history = dict(features)
    history[mask_feature] = keep
    return history, last
