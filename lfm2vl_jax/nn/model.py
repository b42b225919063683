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
from .quant import take_rows
from .text import embed_tokens, lm_logits, text_forward, text_hidden_states
from .vision import vision_tower


def image_features(
    params: Params,
    config: Lfm2VlConfig,
    pixel_values: jax.Array,
    pixel_attention_mask: jax.Array,
    spatial_shapes: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Image token embeddings (I, T, D) and which of the T slots are real tokens (I, T)."""
    _, tokens, valid = vision_and_image_features(
        params, config, pixel_values, pixel_attention_mask, spatial_shapes
    )
    return tokens, valid


def merge_image_features(
    embeds: jax.Array, is_image: jax.Array, features: jax.Array, valid: jax.Array
) -> jax.Array:
    """Puts the images' tokens, in order, at the `is_image` positions (B, S) (row-major over the batch), as
    the reference's `masked_scatter` does. The counts must match (checked on the host by
    `inputs.check_inputs`)."""
    num_slots = features.shape[0] * features.shape[1]
    flat, flat_valid = features.reshape(num_slots, -1), valid.reshape(-1)
    destination = jnp.where(flat_valid, jnp.cumsum(flat_valid) - 1, num_slots)
    compact = jnp.zeros_like(flat).at[destination].set(flat, mode="drop")
    rank = jnp.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1
    gathered = jnp.take(compact, jnp.clip(rank, 0, num_slots - 1), axis=0)
    return jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds)


def image_token_embedding(params: Params, config: Lfm2VlConfig) -> jax.Array:
    """The `<image>` token's row of the embedding table (D,)."""
    return take_rows(params["text"]["embed"], jnp.asarray(config.image_token_id))


def image_positions(
    params: Params, config: Lfm2VlConfig, input_ids: jax.Array | None, inputs_embeds: jax.Array | None
) -> jax.Array:
    """(B, S) True where image tokens go: the `<image>` ids, or without ids (transformers'
    `get_placeholder_mask`) the positions whose embedding equals the `<image>` token's."""
    if input_ids is not None:
        return input_ids == config.image_token_id
    image = image_token_embedding(params, config).astype(inputs_embeds.dtype)
    return jnp.all(inputs_embeds == image, axis=-1)


def embed_inputs(
    params: Params,
    config: Lfm2VlConfig,
    input_ids: jax.Array | None,
    pixel_values: jax.Array | None = None,
    pixel_attention_mask: jax.Array | None = None,
    spatial_shapes: jax.Array | None = None,
    inputs_embeds: jax.Array | None = None,
) -> jax.Array:
    """(B, S, D) input embeddings: of `input_ids`, or `inputs_embeds` as given, with the images' tokens
    placed."""
    features = valid = None
    if pixel_values is not None:
        features, valid = image_features(params, config, pixel_values, pixel_attention_mask, spatial_shapes)
    return embed_with_features(params, config, input_ids, features, valid, inputs_embeds)


def embed_with_features(
    params: Params,
    config: Lfm2VlConfig,
    input_ids: jax.Array | None,
    features: jax.Array | None,
    valid: jax.Array | None,
    inputs_embeds: jax.Array | None = None,
) -> jax.Array:
    """Token embeddings (of `input_ids`, or `inputs_embeds` as given) with already computed image tokens
    (`image_features`) at the image positions (`image_positions`)."""
    if inputs_embeds is None:
        embeds = embed_tokens(params["text"], input_ids, config.runtime)
    else:
        embeds = inputs_embeds.astype(config.runtime.dtypes.compute)
    if features is None:
        return embeds
    is_image = image_positions(params, config, input_ids, inputs_embeds)
    return merge_image_features(embeds, is_image, features, valid)


def hidden_states(
    params: Params,
    config: Lfm2VlConfig,
    input_ids: jax.Array | None,
    attention_mask: jax.Array,
    pixel_values: jax.Array | None = None,
    pixel_attention_mask: jax.Array | None = None,
    spatial_shapes: jax.Array | None = None,
    *,
    inputs_embeds: jax.Array | None = None,
    position_ids: jax.Array | None = None,
    any_mask: bool = False,
) -> jax.Array:
    """Final-normed hidden states (B, S, D), before the LM head (training computes its loss from these in
    chunks, never holding every token's logits).

    Rows are right-padded unless `any_mask` (static): then `attention_mask` may hold zeros anywhere (left
    padding, holes), honoured as transformers' forward does (`text.any_mask_context`). `position_ids`
    (B, S): rotary positions (default 0 .. S-1 whatever the padding, as transformers). `inputs_embeds`
    (B, S, D) instead of `input_ids`."""
    embeds = embed_inputs(
        params, config, input_ids, pixel_values, pixel_attention_mask, spatial_shapes, inputs_embeds
    )
    hidden, _ = text_forward(
        params["text"],
        config.text,
        config.runtime,
        embeds,
        attention_mask,
        positions=position_ids,
        any_mask=any_mask,
    )
    return hidden


def forward(
    params: Params,
    config: Lfm2VlConfig,
    input_ids: jax.Array | None,
    attention_mask: jax.Array,
    pixel_values: jax.Array | None = None,
    pixel_attention_mask: jax.Array | None = None,
    spatial_shapes: jax.Array | None = None,
    *,
    inputs_embeds: jax.Array | None = None,
    position_ids: jax.Array | None = None,
    any_mask: bool = False,
) -> jax.Array:
    """Logits (B, S, V) in float32; the reference's plain forward (arguments as `hidden_states`)."""
    hidden = hidden_states(
        params,
        config,
        input_ids,
        attention_mask,
        pixel_values,
        pixel_attention_mask,
        spatial_shapes,
        inputs_embeds=inputs_embeds,
        position_ids=position_ids,
        any_mask=any_mask,
    )
    return lm_logits(params["text"], hidden)


def forward_with_hidden_states(
    params: Params,
    config: Lfm2VlConfig,
    input_ids: jax.Array | None,
    attention_mask: jax.Array,
    pixel_values: jax.Array | None = None,
    pixel_attention_mask: jax.Array | None = None,
    spatial_shapes: jax.Array | None = None,
    *,
    inputs_embeds: jax.Array | None = None,
    position_ids: jax.Array | None = None,
    any_mask: bool = False,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """`forward`'s logits and transformers' `output_hidden_states`: the input embeddings, then every text
    layer's output, the last one final-normed (`text.text_hidden_states`)."""
    embeds = embed_inputs(
        params, config, input_ids, pixel_values, pixel_attention_mask, spatial_shapes, inputs_embeds
    )
    states = text_hidden_states(
        params["text"],
        config.text,
        config.runtime,
        embeds,
        attention_mask,
        positions=position_ids,
        any_mask=any_mask,
    )
    return lm_logits(params["text"], states[-1]), states


def vision_and_image_features(
    params: Params,
    config: Lfm2VlConfig,
    pixel_values: jax.Array,
    pixel_attention_mask: jax.Array,
    spatial_shapes: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The vision tower's output (I, P, E) and `image_features`' (tokens (I, T, D), valid (I, T))."""
    features = vision_tower(
        params["vision"], config.vision, config.runtime, pixel_values, pixel_attention_mask, spatial_shapes
    )
    tokens = project(params["projector"], features, spatial_shapes, config.downsample_factor)
    counts = image_tokens_per_image(spatial_shapes, config.downsample_factor)
    return features, tokens, jnp.arange(tokens.shape[1])[None, :] < counts[:, None]


IGNORE_INDEX = -100  # transformers' label for positions without a loss


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """transformers' causal-LM loss: position t predicts `labels[:, t + 1]`; the mean cross-entropy (float32)
    over the shifted labels that are not `IGNORE_INDEX`."""
    shifted = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
    counted = shifted != IGNORE_INDEX
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target = jnp.take_along_axis(log_probs, jnp.where(counted, shifted, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(counted, target, 0.0)) / jnp.sum(counted)
