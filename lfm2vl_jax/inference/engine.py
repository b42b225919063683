"""`generate`'s driver: every row starts together. One prefill program fills a fresh state (`step.Rows`)
with B prompts, then the core's decode programs run until every row is done or has its tokens.

Two loops over the same programs. `loop="device"` (the default without streaming) runs the steps inside
one `lax.while_loop` (`step.decode_steps`): measured 12-18% faster than the host loop on a 2-core CPU (no
per-step dispatch from Python competing with the compute threads). `loop="host"` (streaming) dispatches
one `step.decode_step` at a time and reads step k's tokens only after step k+1 is dispatched, so the
device never waits on Python: one host sync per token, overlapped with the next step.

Shapes are bucketed (batch rows, prompt length, image count, cache length, stop ids) so that a stream of
varied requests compiles a bounded number of programs; padding rows and images are dropped from the output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from ..config import Lfm2VlConfig
from ..errors import Lfm2VlError
from ..nn.params import Params
from .buckets import bucket, cache_capacity, stop_width
from .sampling import SamplingParams, seed_key
from .step import Rows, decode_step, decode_steps, prefill

# ---------------------------------------------------------------------------------------------------------
# Host side: validation, bucketing, the loop.


@dataclasses.dataclass(frozen=True)
class PreparedBatch:
    """Bucketed inputs, each row's tokens first; rows past `num_rows` and the trailing padding images are
    inert. `holes`: some row's mask holds zeros between its tokens (the prefill then honours them)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    pixel_values: np.ndarray | None
    pixel_attention_mask: np.ndarray | None
    spatial_shapes: np.ndarray | None
    num_rows: int
    inputs_embeds: np.ndarray | None = None
    holes: bool = False


def prepare_batch(
    config: Lfm2VlConfig,
    input_ids: np.ndarray | None,
    attention_mask: np.ndarray | None = None,
    pixel_values: np.ndarray | None = None,
    pixel_attention_mask: np.ndarray | None = None,
    spatial_shapes: np.ndarray | None = None,
    *,
    pad_id: int,
    row_multiple: int = 1,
    inputs_embeds: np.ndarray | None = None,
) -> PreparedBatch:
    """Moves each row's tokens to the left (whatever side the processor padded: the padding before a row's
    first token and after its last is dropped, zeros between them kept), buckets the batch size (then
    rounds it up to `row_multiple`, e.g. the mesh's data-axis size), prompt length and image count, and pads
    with inert rows and images. `inputs_embeds` (B, S, D) stand for `input_ids`, moved the same way."""
    source = input_ids if inputs_embeds is None else inputs_embeds
    num_rows, width = source.shape[:2]
    mask = np.ones((num_rows, width), bool) if attention_mask is None else attention_mask.astype(bool)
    if not mask.any(axis=1).all():
        raise Lfm2VlError(f"rows {np.flatnonzero(~mask.any(axis=1)).tolist()} have no tokens")
    first = mask.argmax(axis=1)
    spans = width - mask[:, ::-1].argmax(axis=1) - first  # first token .. last token
    rows = -(-bucket(num_rows) // row_multiple) * row_multiple
    seq = bucket(int(spans.max()), minimum=16)
    ids = np.full((rows, seq), pad_id, np.int32)
    new_mask = np.zeros((rows, seq), np.int32)
    embeds = None if inputs_embeds is None else np.zeros((rows, seq, source.shape[2]), source.dtype)
    for i in range(num_rows):
        span = slice(first[i], first[i] + spans[i])
        new_mask[i, : spans[i]] = mask[i, span]
        if embeds is None:
            ids[i, : spans[i]] = input_ids[i, span]
        else:
            embeds[i, : spans[i]] = inputs_embeds[i, span]
    new_mask[num_rows:, 0] = 1  # padding rows: one pad token, finished from the start
    holes = bool((mask.sum(axis=1) != spans).any())
    common = dict(num_rows=num_rows, inputs_embeds=embeds, holes=holes)
    if pixel_values is None:
        return PreparedBatch(ids, new_mask, None, None, None, **common)

    images = len(pixel_values)
    slots = bucket(images)
    f = config.downsample_factor
    values = np.zeros((slots, *pixel_values.shape[1:]), pixel_values.dtype)
    values[:images] = pixel_values
    patch_mask = np.zeros((slots, pixel_values.shape[1]), np.int32)
    patch_mask[:images] = pixel_attention_mask
    patch_mask[images:, : f * f] = 1  # padding images: one f x f block, its token never placed
    shapes = np.full((slots, 2), f, np.int64)
    shapes[:images] = spatial_shapes
    return PreparedBatch(ids, new_mask, values, patch_mask, shapes, **common)


@dataclasses.dataclass(frozen=True)
class Request:
    """Everything one generation call needs besides the model: prepared inputs and decoding options."""

    batch: PreparedBatch
    sampling: SamplingParams
    stop_ids: tuple[int, ...]
    pad_id: int
    max_new_tokens: int
    seed: int = 0  # 64 bits (`sampling.seed_key`)


def stop_table(stop_ids: tuple[int, ...], rows: int) -> np.ndarray:
    """(rows, W) stop ids, -1 where unused; W bucketed (`step.stop_width`)."""
    ids = sorted(set(stop_ids))
    table = np.full((rows, stop_width(len(ids))), -1, np.int32)
    table[:, : len(ids)] = ids
    return table


def run(
    params: Params, config: Lfm2VlConfig, request: Request, loop: str = "host"
) -> Iterator[tuple[Rows, np.ndarray]]:
    """Prefill then decode. Yields (the latest state, new tokens (B, n)): the first tokens after prefill,
    then each step's (host loop, n = 1) or all the rest at once (device loop); -1 where a row is done.

    The host loop dispatches step k+1 before reading step k's tokens, and stops once every row is done
    (a stop token or `max_new_tokens`); the yielded state may be one (discarded) step ahead.
    """
    if loop not in ("host", "device"):
        raise Lfm2VlError(f"loop must be 'host' or 'device', got {loop!r}")
    if request.max_new_tokens < 1:
        raise Lfm2VlError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
    batch, max_new = request.batch, request.max_new_tokens
    rows, seq = batch.input_ids.shape
    capacity, new_bucket = cache_capacity(seq, max_new)
    stops = stop_table(request.stop_ids, rows)
    padding = np.arange(rows) >= batch.num_rows
    state, first = prefill(
        params,
        config,
        batch.input_ids,
        batch.attention_mask,
        batch.pixel_values,
        batch.pixel_attention_mask,
        batch.spatial_shapes,
        batch.inputs_embeds,
        np.asarray(jax.random.key_data(seed_key(request.seed))),
        request.sampling,
        np.full((rows,), max_new, np.int32),
        stops,
        padding,
        capacity=capacity,
        any_mask=batch.holes,
    )
    if loop == "device":
        yield state, np.asarray(first)[:, None]
        state, tokens, steps = decode_steps(
            params, config, state, np.int32(max_new - 1), np.int32(rows + 1), chunk=new_bucket
        )
        yield state, np.asarray(tokens)[:, : int(steps)]
        return
    done = padding.copy()
    pending, generated = first, 1
    while True:
        dispatched = None
        if generated < max_new:  # step k+1 goes to the device before step k's tokens are read
            state, dispatched = decode_step(params, config, state)
            generated += 1
        tokens = np.asarray(pending)
        done |= (tokens < 0) | (tokens[:, None] == stops).any(axis=1)
        yield state, tokens[:, None]
        if dispatched is None or done.all():
            return
        pending = dispatched


def generate(
    params: Params,
    config: Lfm2VlConfig,
    request: Request,
    loop: str | None = None,
    streamer: Callable[[np.ndarray], Any] | None = None,
) -> np.ndarray:
    """New tokens (num_rows, n), pad after each row's stop token; n <= max_new_tokens is the longest row.

    `streamer`, if given, is called after every step with the new token of each real row (pad for rows
    already done); it needs the host loop.
    """
    if loop is None:
        loop = "device" if streamer is None else "host"
    if streamer is not None and loop == "device":
        raise Lfm2VlError("streaming needs the host loop (loop='host')")
    num_rows, pad_id = request.batch.num_rows, request.pad_id
    columns = []
    for _, tokens in run(params, config, request, loop):
        tokens = tokens[:num_rows]
        if streamer is not None:
            streamer(np.where(tokens[:, 0] < 0, pad_id, tokens[:, 0]))
        columns.append(tokens)
    tokens = np.concatenate(columns, axis=1)
    length = int((tokens >= 0).sum(axis=1).max())  # the longest row (rows run to a stop token or the limit)
    return np.where(tokens[:, :length] < 0, pad_id, tokens[:, :length])
