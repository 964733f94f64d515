"""Model configs shared by the tests and benchmarks (T5X's ``test_utils``).

One place for them, so a tiny config is never re-typed with a silently different value, and a
benchmark times the very model its gin file trains (``gin_decoder_config``).
"""

from __future__ import annotations

from typing import Any

import gin

from user_llm.decoder import DecoderConfig
from user_llm.perceiver import PerceiverConfig
from user_llm.user_encoder import UserEncoderConfig

# A 2-layer decoder with grouped-query attention (4 query heads, 2 KV heads) and a 64-token
# vocabulary: every code path of the real LLMs at a size that compiles in seconds.
TINY_DECODER: dict[str, Any] = dict(
    vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)
# A 1-layer AR encoder over items, ratings and multi-valued genres.
TINY_ENCODER: dict[str, Any] = dict(
    categorical_features={"user_item_ids": 50, "user_ratings": 12},
    multivalued_features={"user_genres": 20},
    embed_dim=16,
    feature_embed_dim=8,
    num_layers=1,
    num_heads=2,
    head_dim=8,
    mlp_dim=32,
)
TINY_PERCEIVER: dict[str, Any] = dict(
    num_latents=4, num_layers=1, num_heads=2, head_dim=8, mlp_dim=32
)


def tiny_decoder_config(**overrides: Any) -> DecoderConfig:
    """``TINY_DECODER`` with ``overrides`` (e.g. ``cross_attention_layers=(1,)``)."""
    return DecoderConfig(**{**TINY_DECODER, **overrides})


def tiny_encoder_config(**overrides: Any) -> UserEncoderConfig:
    """``TINY_ENCODER`` with ``overrides`` (e.g. ``predict_features=(...)``)."""
    return UserEncoderConfig(**{**TINY_ENCODER, **overrides})


def tiny_perceiver_config(**overrides: Any) -> PerceiverConfig:
    return PerceiverConfig(**{**TINY_PERCEIVER, **overrides})


def gin_decoder_config(gin_file: str, **overrides: Any) -> DecoderConfig:
    """The ``DecoderConfig`` a model gin file binds (``models/llm/decoder_100m.gin``), with
    ``overrides``. Parses the file on its own and clears gin's state afterwards."""
    from user_llm import gin_utils

    gin_utils.parse_gin([gin_file], finalize=False)
    try:
        config = gin.get_configurable(DecoderConfig)()
    finally:
        gin.clear_config()
    return DecoderConfig(**{**config.__dict__, **overrides})
