"""The whole LFM2-VL forward pass: vision tower -> projector -> image tokens merged into the text
embeddings at the `<image>` positions -> LFM2 text tower -> logits.

Plain functions over the params pytree and a frozen config, not jitted: each caller (`api.py`, the
inference engine, the train step) applies `jax.jit` with its own donation and shardings.
`Lfm2VlForConditionalGeneration` (in `api.py`) wraps them in Hugging Face's vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..config import Lfm2VlConfig
from .params import Params
from .projector import image_tokens_per_image, project
from .text import embed_tokens, lm_logits, text_forward
from .vision import vision_tower


def image_features(
    params: Params,
    config: Lfm2VlConfig,
    pixel_values: jax.Array,
    pixel_attention_mask: jax.Array,
    spatial_shapes: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Image token embeddings (I, T, D) and which of the T slots are real tokens (I, T)."""
    features = vision_tower(
        params["vision"], config.vision, config.runtime, pixel_values, pixel_attention_mask, spatial_shapes
    )
    tokens = project(params["projector"], features, spatial_shapes, config.downsample_factor)
    counts = image_tokens_per_image(spatial_shapes, config.downsample_factor)
    valid = jnp.arange(tokens.shape[1])[None, :] < counts[:, None]
    return tokens, valid


def merge_image_features(
    embeds: jax.Array, input_ids: jax.Array, image_token_id: int, features: jax.Array, valid: jax.Array
) -> jax.Array:
    """Puts the images' tokens, in order, at the `<image>` positions (row-major over the batch), as the
    reference's `masked_scatter` does. The counts must match (checked on the host by
    `inputs.check_inputs`)."""
    num_slots = features.shape[0] * features.shape[1]
    flat, flat_valid = features.reshape(num_slots, -1), valid.reshape(-1)
    destination = jnp.where(flat_valid, jnp.cumsum(flat_valid) - 1, num_slots)
    compact = jnp.zeros_like(flat).at[destination].set(flat, mode="drop")
    is_image = input_ids == image_token_id
    rank = jnp.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1
    gathered = jnp.take(compact, jnp.clip(rank, 0, num_slots - 1), axis=0)
    return jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds)


def embed_inputs(
    params: Params,
    config: Lfm2VlConfig,
    input_ids: jax.Array,
    pixel_values: jax.Array | None = None,
    pixel_attention_mask: jax.Array | None = None,
    spatial_shapes: jax.Array | None = None,
) -> jax.Array:
    features = valid = None
    if pixel_values is not None:
        features, valid = image_features(params, config, pixel_values, pixel_attention_mask, spatial_shapes)
    return embed_with_features(params, config, input_ids, features, valid)


def embed_with_features(
    params: Params,
    config: Lfm2VlConfig,
    input_ids: jax.Array,
    features: jax.Array | None,
    valid: jax.Array | None,
) -> jax.Array:
    """Token embeddings with already computed image tokens (`image_features`) at the `<image>` positions."""
    embeds = embed_tokens(params["text"], input_ids, config.runtime)
    if features is None:
        return embeds
    return merge_image_features(embeds, input_ids, config.image_token_id, features, valid)


def hidden_states(
    params: Params,
    config: Lfm2VlConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    pixel_values: jax.Array | None = None,
    pixel_attention_mask: jax.Array | None = None,
    spatial_shapes: jax.Array | None = None,
) -> jax.Array:
    """Final-normed hidden states (B, S, D) of right-padded inputs, before the LM head (training computes
    its loss from these in chunks, never holding every token's logits)."""
    embeds = embed_inputs(params, config, input_ids, pixel_values, pixel_attention_mask, spatial_shapes)
    hidden, _ = text_forward(params["text"], config.text, config.runtime, embeds, attention_mask)
    return hidden


def forward(
    params: Params,
    config: Lfm2VlConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    pixel_values: jax.Array | None = None,
    pixel_attention_mask: jax.Array | None = None,
    spatial_shapes: jax.Array | None = None,
) -> jax.Array:
    """Logits (B, S, V) in float32 for right-padded `input_ids` (B, S); the reference's plain forward."""
    hidden = hidden_states(
        params, config, input_ids, attention_mask, pixel_values, pixel_attention_mask, spatial_shapes
    )
    return lm_logits(params["text"], hidden)
