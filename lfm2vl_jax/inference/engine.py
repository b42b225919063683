"""Generation: a jitted prefill, then a jitted decode step that takes and returns a `DecodeState` pytree
(cache donated, so it is updated in place).

Two drivers run the same step. `loop="device"` (the default without streaming) runs it inside one
`lax.while_loop`: measured 12-18% faster than the host loop on a 2-core CPU (no per-step dispatch from
Python competing with the compute threads), and the loop the H200 numbers were taken with. `loop="host"`
(needed to stream tokens) dispatches jitted steps asynchronously and looks at the `done` flags only every
few steps, so the device never waits on Python. `benchmarks/bench_generate.py --loops device host`
reports both.

The step is kept lean (see `tests/unit/test_decode_step.py`): greedy decoding splits no random key and,
without a repetition penalty, `DecodeState.seen` is None (no (B, V) array carried or updated).

Shapes are bucketed (batch rows, prompt length, image count, cache length) so that a stream of varied
requests compiles a bounded number of programs; padding rows and images are dropped from the output.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ..config import Lfm2VlConfig
from ..errors import Lfm2VlError
from ..nn.model import embed_inputs
from ..nn.params import Params
from ..nn.text import embed_tokens, lm_logits, text_forward
from ..parallel.sharding import cache_shardings
from .cache import Cache, append, init_cache
from .sampling import SamplingParams, next_token, seed_key

HOST_CHECK_EVERY = 8  # host loop: decode steps dispatched between looks at the `done` flags


@flax.struct.dataclass
class DecodeState:
    """Everything a decode step reads and writes; donated to the step, which updates it in place."""

    cache: Cache
    tokens: jax.Array  # (B, max_new) generated tokens, pad after a row's stop token
    num_generated: jax.Array  # () int32
    done: jax.Array  # (B,) bool: the row has emitted a stop token
    # (B, V) bool: tokens of the prompt or generated so far; None unless a repetition penalty is applied
    # (`SamplingParams.repetition_penalty`), so that the common case updates no (B, V) array per step.
    seen: jax.Array | None
    key: jax.Array  # split per step only when sampling


def _record(state: DecodeState, token: jax.Array, stop_ids: jax.Array, pad_id: int) -> DecodeState:
    token = jnp.where(state.done, pad_id, token)
    seen = state.seen
    if seen is not None:
        seen = seen.at[jnp.arange(token.shape[0]), token].set(True)
    return state.replace(
        tokens=state.tokens.at[:, state.num_generated].set(token),
        num_generated=state.num_generated + 1,
        done=state.done | jnp.isin(token, stop_ids),
        seen=seen,
    )


def _split(key: jax.Array, sampling: SamplingParams) -> tuple[jax.Array, jax.Array | None]:
    """The state's next key and this step's sampling key (greedy decoding draws nothing)."""
    if not sampling.do_sample:
        return key, None
    key, subkey = jax.random.split(key)
    return key, subkey


def prompt_pass(
    params: Params, config: Lfm2VlConfig, embeds: jax.Array, mask: jax.Array, any_mask: bool
) -> tuple[jax.Array, list, jax.Array]:
    """The text tower over prompt embeddings (B, T, D), each row's tokens first (`prepare_batch`): the final
    hidden state at each row's last token (B, D), the cache entries and each row's token count.

    `any_mask` (static): rows hold zeros inside (holes). Then, as transformers' `generate`, a token's position
    counts the tokens before it (a hole takes none), a hole is no key and feeds the convolutions a zero, and
    the attention entries hold each row's tokens first, so a cache filled from them holds the count."""
    positions = None
    if any_mask:
        positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
    hidden, entries = text_forward(
        params["text"], config.text, config.runtime, embeds, mask, positions=positions, any_mask=any_mask
    )
    lengths = mask.sum(axis=1).astype(jnp.int32)
    end = jnp.max(jnp.where(mask, jnp.arange(mask.shape[1], dtype=jnp.int32) + 1, 0), axis=1)
    last = jnp.take_along_axis(hidden, (end - 1)[:, None, None], axis=1)[:, 0]
    return last, entries, lengths


@functools.partial(jax.jit, static_argnames=("config", "max_len", "max_new_tokens", "pad_id", "any_mask"))
def prefill(
    params: Params,
    config: Lfm2VlConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    pixel_values: jax.Array | None,
    pixel_attention_mask: jax.Array | None,
    spatial_shapes: jax.Array | None,
    key: jax.Array,
    sampling: SamplingParams,
    stop_ids: jax.Array,
    done: jax.Array,
    *,
    max_len: int,
    max_new_tokens: int,
    pad_id: int,
    inputs_embeds: jax.Array | None = None,
    any_mask: bool = False,
) -> DecodeState:
    """Vision tower + projector + text tower over prompts (each row's tokens first, `prepare_batch`); fills a
    fresh cache of `max_len` positions and samples each row's first token from the logits at its last prompt
    token. `inputs_embeds` (B, T, D) stand for the tokens of `input_ids` (then only pad ids; no prompt token
    counts as seen by a repetition penalty, as in transformers). With a mesh (`config.runtime.mesh`), the
    cache is laid out by the logical sharding rules (rows over the batch axes, heads over `tensor`)."""
    batch = input_ids.shape[0]
    mask = attention_mask.astype(bool)
    embeds = embed_inputs(
        params,
        config,
        None if inputs_embeds is not None else input_ids,
        pixel_values,
        pixel_attention_mask,
        spatial_shapes,
        inputs_embeds,
    )
    last, entries, lengths = prompt_pass(params, config, embeds, mask, any_mask)
    cache = append(init_cache(config, batch, max_len), entries, lengths)
    if config.runtime.mesh is not None:
        blocks = jax.lax.with_sharding_constraint(cache.blocks, cache_shardings(config, batch, max_len))
        cache = cache.replace(blocks=blocks)
    logits = lm_logits(params["text"], last)
    seen = None
    if sampling.repetition_penalty is not None:
        seen = jnp.zeros((batch, config.text.vocab_size), bool)
        if inputs_embeds is None:
            seen = seen.at[jnp.arange(batch)[:, None], input_ids].max(mask)
    key, subkey = _split(key, sampling)
    state = DecodeState(
        cache=cache,
        tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        num_generated=jnp.zeros((), jnp.int32),
        done=done,
        seen=seen,
        key=key,
    )
    return _record(state, next_token(logits, seen, subkey, sampling), stop_ids, pad_id)


def _decode(
    params: Params,
    config: Lfm2VlConfig,
    state: DecodeState,
    sampling: SamplingParams,
    stop_ids: jax.Array,
    pad_id: int,
) -> DecodeState:
    batch = state.tokens.shape[0]
    last = jax.lax.dynamic_index_in_dim(state.tokens, state.num_generated - 1, axis=1)  # (B, 1)
    new = jnp.ones((batch, 1), bool)
    embeds = embed_tokens(params["text"], last, config.runtime)
    hidden, entries = text_forward(
        params["text"], config.text, config.runtime, embeds, new, cache=state.cache
    )
    cache = append(state.cache, entries, jnp.ones((batch,), jnp.int32), after=hidden)
    logits = lm_logits(params["text"], hidden[:, 0])
    key, subkey = _split(state.key, sampling)
    token = next_token(logits, state.seen, subkey, sampling)
    return _record(state.replace(cache=cache, key=key), token, stop_ids, pad_id)


@functools.partial(jax.jit, static_argnames=("config", "pad_id"), donate_argnames=("state",))
def decode_step(
    params: Params,
    config: Lfm2VlConfig,
    state: DecodeState,
    sampling: SamplingParams,
    stop_ids: jax.Array,
    pad_id: int,
) -> DecodeState:
    """One new token per row; the state (and its cache) is donated and updated in place."""
    return _decode(params, config, state, sampling, stop_ids, pad_id)


@functools.partial(jax.jit, static_argnames=("config", "pad_id"), donate_argnames=("state",))
def decode_loop(
    params: Params,
    config: Lfm2VlConfig,
    state: DecodeState,
    sampling: SamplingParams,
    stop_ids: jax.Array,
    limit: jax.Array,
    pad_id: int,
) -> DecodeState:
    """Decode steps on the device until every row is done or `limit` tokens exist."""

    def running(s: DecodeState) -> jax.Array:
        return ~jnp.all(s.done) & (s.num_generated < limit)

    return jax.lax.while_loop(
        running, lambda s: _decode(params, config, s, sampling, stop_ids, pad_id), state
    )


# ---------------------------------------------------------------------------------------------------------
# Host side: validation, bucketing, the loop.


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest size >= n of the form 2**k * (1, 1.25, 1.5 or 1.75), rounded up (1..8 are all sizes; then
    10, 12, 14, 16, 20, 24, 28, 32, ...): at most 25% padding, four shapes per doubling."""
    n = max(n, minimum)
    power = 1 << (n.bit_length() - 1)
    return next(size for size in (math.ceil(power * q / 4) for q in (4, 5, 6, 7, 8)) if size >= n)


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


def cache_capacity(prompt_length: int, max_new_tokens: int) -> tuple[int, int]:
    """(cache positions, token-buffer length) of a request: its bucketed prompt length plus the bucketed
    number of new tokens (the same programs serve every `max_new_tokens` of a bucket)."""
    new_bucket = bucket(max_new_tokens, minimum=16)
    return prompt_length + new_bucket, new_bucket


@dataclasses.dataclass(frozen=True)
class Request:
    """Everything one generation call needs besides the model: prepared inputs and decoding options."""

    batch: PreparedBatch
    sampling: SamplingParams
    stop_ids: tuple[int, ...]
    pad_id: int
    max_new_tokens: int
    seed: int = 0  # 64 bits (`sampling.seed_key`)


def run(params: Params, config: Lfm2VlConfig, request: Request, loop: str = "host") -> Iterator[DecodeState]:
    """Prefill then decode; yields the state after prefill, then after every token (host loop) or once at
    the end (device loop), so that callers can stream.

    Cache capacity and the token buffer are bucketed; the loop stops at `max_new_tokens` or when every
    real row is done.
    """
    if loop not in ("host", "device"):
        raise Lfm2VlError(f"loop must be 'host' or 'device', got {loop!r}")
    if request.max_new_tokens < 1:
        raise Lfm2VlError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
    batch, sampling, pad_id = request.batch, request.sampling, request.pad_id
    rows, seq = batch.input_ids.shape
    capacity, new_bucket = cache_capacity(seq, request.max_new_tokens)
    stop = jnp.asarray(sorted(set(request.stop_ids)), jnp.int32)
    done = jnp.asarray(np.arange(rows) >= batch.num_rows)
    state = prefill(
        params,
        config,
        batch.input_ids,
        batch.attention_mask,
        batch.pixel_values,
        batch.pixel_attention_mask,
        batch.spatial_shapes,
        seed_key(request.seed),
        sampling,
        stop,
        done,
        max_len=capacity,
        max_new_tokens=new_bucket,
        pad_id=pad_id,
        inputs_embeds=batch.inputs_embeds,
        any_mask=batch.holes,
    )
    yield state
    if loop == "device":
        yield decode_loop(params, config, state, sampling, stop, jnp.int32(request.max_new_tokens), pad_id)
        return
    for generated in range(1, request.max_new_tokens):
        if generated % HOST_CHECK_EVERY == 0 and np.asarray(state.done).all():
            return
        state = decode_step(params, config, state, sampling, stop, pad_id)
        yield state


def latest_tokens(state: DecodeState, num_rows: int) -> np.ndarray:
    """The token each real row produced in the last step (pad for rows already done)."""
    return np.asarray(state.tokens)[:num_rows, int(state.num_generated) - 1]


def generate(
    params: Params,
    config: Lfm2VlConfig,
    request: Request,
    loop: str | None = None,
    streamer: Callable[[np.ndarray], Any] | None = None,
) -> np.ndarray:
    """New tokens (num_rows, n), pad after each row's stop token; n <= max_new_tokens is the longest row.

    `streamer`, if given, is called after every step with the new token of each real row (pad for rows
    already done); it needs the host loop and makes the host wait for each step.
    """
    if loop is None:
        loop = "device" if streamer is None else "host"
    if streamer is not None and loop == "device":
        raise Lfm2VlError("streaming needs the host loop (loop='host')")
    num_rows = request.batch.num_rows
    state = None
    for state in run(params, config, request, loop):
        if streamer is not None:
            streamer(latest_tokens(state, num_rows))
    # Slicing on the host: a device-side slice would compile a program per output length.
    tokens = np.asarray(state.tokens)[:num_rows, : int(state.num_generated)]
    stopped = np.isin(tokens, request.stop_ids)
    if stopped.any(axis=1).all():  # trim to the longest row
        tokens = tokens[:, : int(stopped.argmax(axis=1).max()) + 1]
    return tokens
