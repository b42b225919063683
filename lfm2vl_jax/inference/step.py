"""The decoding core: the device programs under every driver. `engine.py` runs them for `generate` (all
rows start together), `batching.py` for the batch engine (slots refilled over time) and the server on it.

A `Rows` state holds B rows of one cache, each with its own decoding state (latest token, tokens produced,
limit, stop ids, done flag) and sampling options. Rows never interact: every write a row's step makes
depends on that row only (`cache.append`), so a NaN in one row leaves the others bit-identical.

Two ways to sample, fixed per program:
- uniform (`Rows.do_sample` is None): every row has the same static options and the batch draws from one
  PRNG stream, (B, V) at once: `generate`'s semantics (a batch of one draws as a request alone does);
- per row: options as (B,) arrays, one PRNG stream per row, each row drawing with the (1, V) shape of a
  request alone, so a request gets the same tokens whatever shares the batch (the batch engine).

The step pays only for what its rows ask: greedy uniform rows split no key; without a repetition penalty
(`sampling.repetition_penalty` None) no (B, V) table of seen tokens exists in the program.

Programs (jitted here; drivers only call them):
    prefill          `generate`: images, embeddings and text tower over B prompts into a fresh state
    encode_images    the engine's prefill in three programs, so that each compiles per its own bucket
    embed_prompts      (image count; rows and prompt length), not per combination:
    prefill_rows       ... each row's first token, ready for `insert_rows`
    init_rows, insert_rows, release_rows, grow_capacity, set_penalty_table: the engine's slots
    decode_step      one token for every row (donated state, updated in place)
    decode_steps     decode steps in a `lax.while_loop` until a step budget is spent, every row is done,
                     or enough rows are free to be refilled
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from ..config import Lfm2VlConfig
from ..nn.model import embed_inputs, embed_with_features, image_features
from ..nn.params import Params
from ..nn.text import embed_tokens, lm_logits, text_forward
from ..parallel.sharding import batch_sharding
from .buckets import MIN_STOP_WIDTH
from .cache import Cache, append, cache_layout, cache_shardings, init_cache, is_layout
from .sampling import SamplingParams, next_token, next_token_rows


@flax.struct.dataclass
class Rows:
    """Everything a decode step reads and writes, per row (B rows, vocabulary V)."""

    cache: Cache  # B rows of `cache.capacity` positions
    last: jax.Array  # (B,) int32: the row's latest token, fed to its next step
    generated: jax.Array  # (B,) int32: tokens it has produced
    limit: jax.Array  # (B,) int32: its max_new_tokens
    done: jax.Array  # (B,) bool: finished (stop token or limit), or a free / padding row
    stop_ids: jax.Array  # (B, W) int32, -1 where unused
    seen: jax.Array | None  # (B, V) bool: prompt and generated tokens; only with a repetition penalty
    keys: jax.Array  # key data: (B, K) one PRNG stream per row, or (K,) one for the batch (uniform)
    sampling: SamplingParams  # uniform: scalars; per row: (B,) floats (static do_sample, top_k shared)
    do_sample: jax.Array | None  # (B,) bool per row; None: uniform, `sampling.do_sample` for every row


@flax.struct.dataclass
class PrefilledRows:
    """A prefilled group of R prompt rows: their cache entries and first tokens."""

    entries: list  # per-layer cache entries (conv states; K/V over the padded prompt length)
    lengths: jax.Array  # (R,) prompt tokens
    token: jax.Array  # (R,) first generated token
    keys: jax.Array  # key data after the first draw
    seen: jax.Array | None  # (R, V) bool, with a repetition penalty


def _split(keys: jax.Array, per_row: bool) -> tuple[jax.Array, jax.Array]:
    """(next key data, this step's keys): one split per row, or one for the batch."""
    if per_row:
        split = jax.vmap(jax.random.split)(jax.random.wrap_key_data(keys))  # (B, 2) keys
        return jax.random.key_data(split[:, 0]), split[:, 1]
    key, subkey = jax.random.split(jax.random.wrap_key_data(keys))
    return jax.random.key_data(key), subkey


def _sample(
    logits: jax.Array,
    seen: jax.Array | None,
    keys: jax.Array,
    sampling: SamplingParams,
    do_sample: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """(B,) tokens and the next key data. Uniform greedy rows draw nothing (no key split)."""
    if do_sample is None:
        if not sampling.do_sample:
            return next_token(logits, seen, None, sampling), keys
        keys, subkey = _split(keys, per_row=False)
        return next_token(logits, seen, subkey, sampling), keys
    keys, subkeys = _split(keys, per_row=True)
    return next_token_rows(logits, seen, subkeys, sampling, do_sample), keys


def _mark_seen(seen: jax.Array | None, token: jax.Array, live: jax.Array) -> jax.Array | None:
    if seen is None:
        return None
    at = jnp.where(live, token, seen.shape[1])  # out of range: dropped
    return seen.at[jnp.arange(token.shape[0]), at].set(True, mode="drop")


def _constrain(config: Lfm2VlConfig, state: Rows) -> Rows:
    """Every per-row array over the mesh's batch axes, the cache's heads over `tensor` (a no-op without a
    mesh). Fixed shardings, so that a program's output state is a valid input of the next: the decode
    programs never recompile for a new layout."""
    if config.runtime.mesh is None:
        return state
    rows = state.last.shape[0]
    cache = state.cache
    blocks = jax.lax.with_sharding_constraint(cache.blocks, cache_shardings(config, rows, cache.capacity))

    def per_row(x: jax.Array) -> jax.Array:
        if x.ndim == 0 or x.shape[0] != rows:
            return x
        return jax.lax.with_sharding_constraint(x, batch_sharding(config, x.shape))

    keys = state.keys if state.do_sample is None else per_row(state.keys)  # uniform: one stream
    constrained = jax.tree.map(per_row, state.replace(cache=None, keys=None))
    return constrained.replace(cache=cache.replace(blocks=blocks, lengths=per_row(cache.lengths)), keys=keys)


# ---------------------------------------------------------------------------------------------------------
# Prefill


def prompt_pass(
    params: Params, config: Lfm2VlConfig, embeds: jax.Array, mask: jax.Array, any_mask: bool
) -> tuple[jax.Array, list, jax.Array]:
    """The text tower over prompt embeddings (B, T, D), each row's tokens first (`engine.prepare_batch`):
    the final hidden state at each row's last token (B, D), the cache entries and each row's token count.

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


def _first_tokens(
    params: Params,
    config: Lfm2VlConfig,
    embeds: jax.Array,
    prompt_ids: jax.Array | None,
    mask: jax.Array,
    any_mask: bool,
    keys: jax.Array,
    sampling: SamplingParams,
    do_sample: jax.Array | None,
) -> PrefilledRows:
    """The text tower over the prompts and each row's first token. `prompt_ids` (None: the prompt came as
    embeddings) are the tokens a repetition penalty counts as seen, as in transformers."""
    batch = embeds.shape[0]
    last, entries, lengths = prompt_pass(params, config, embeds, mask, any_mask)
    logits = lm_logits(params["text"], last)
    seen = None
    if sampling.repetition_penalty is not None:
        seen = jnp.zeros((batch, config.text.vocab_size), bool)
        if prompt_ids is not None:
            seen = seen.at[jnp.arange(batch)[:, None], prompt_ids].max(mask)
    token, keys = _sample(logits, seen, keys, sampling, do_sample)
    seen = _mark_seen(seen, token, jnp.ones((batch,), bool))
    return PrefilledRows(entries=entries, lengths=lengths, token=token, keys=keys, seen=seen)


def _stopped(token: jax.Array, stop_ids: jax.Array) -> jax.Array:
    return jnp.any(token[:, None] == stop_ids, axis=1)


@functools.partial(jax.jit, static_argnames=("config", "capacity", "any_mask"))
def prefill(
    params: Params,
    config: Lfm2VlConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    pixel_values: jax.Array | None,
    pixel_attention_mask: jax.Array | None,
    spatial_shapes: jax.Array | None,
    inputs_embeds: jax.Array | None,
    keys: jax.Array,
    sampling: SamplingParams,
    limit: jax.Array,
    stop_ids: jax.Array,
    padding: jax.Array,
    *,
    capacity: int,
    any_mask: bool = False,
) -> tuple[Rows, jax.Array]:
    """`generate`'s prefill: vision tower, projector and text tower over B prompts (each row's tokens
    first, `engine.prepare_batch`) into a fresh cache of `capacity` positions, one uniform PRNG stream
    (`keys` (K,)). `padding` (B,) marks inert rows (done from the start). Returns the state and the first
    tokens (B,). `inputs_embeds` (B, T, D) stand for the tokens of `input_ids` (then only pad ids)."""
    batch = input_ids.shape[0]
    mask = attention_mask.astype(bool)
    ids = None if inputs_embeds is not None else input_ids
    images = (pixel_values, pixel_attention_mask, spatial_shapes)
    embeds = embed_inputs(params, config, ids, *images, inputs_embeds)
    first = _first_tokens(params, config, embeds, ids, mask, any_mask, keys, sampling, None)
    state = Rows(
        cache=append(init_cache(config, batch, capacity), first.entries, first.lengths),
        last=first.token,
        generated=jnp.ones((batch,), jnp.int32),
        limit=limit,
        done=padding | _stopped(first.token, stop_ids) | (limit <= 1),
        stop_ids=stop_ids,
        seen=first.seen,
        keys=first.keys,
        sampling=sampling,
        do_sample=None,
    )
    return _constrain(config, state), first.token


@functools.partial(jax.jit, static_argnames=("config",))
def encode_images(
    params: Params,
    config: Lfm2VlConfig,
    pixel_values: jax.Array,
    pixel_attention_mask: jax.Array,
    spatial_shapes: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Vision tower + projector: each image's tokens (I, N, D) and which are real (I, N)."""
    return image_features(params, config, pixel_values, pixel_attention_mask, spatial_shapes)


@functools.partial(jax.jit, static_argnames=("config",))
def embed_prompts(
    params: Params,
    config: Lfm2VlConfig,
    input_ids: jax.Array,
    features: jax.Array | None,
    valid: jax.Array | None,
) -> jax.Array:
    """Token embeddings with the images' tokens at the `<image>` positions (`nn.model.embed_inputs`)."""
    return embed_with_features(params, config, input_ids, features, valid)


@functools.partial(jax.jit, static_argnames=("config", "any_mask"))
def prefill_rows(
    params: Params,
    config: Lfm2VlConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    embeds: jax.Array,
    keys: jax.Array,
    sampling: SamplingParams,
    do_sample: jax.Array,
    any_mask: bool = False,
) -> PrefilledRows:
    """The text tower over a group of prompts with per-row options (their embeddings from `embed_prompts`),
    each row's first token drawn from its own stream (`keys` (R, K))."""
    mask = attention_mask.astype(bool)
    return _first_tokens(params, config, embeds, input_ids, mask, any_mask, keys, sampling, do_sample)


# ---------------------------------------------------------------------------------------------------------
# Slots of the batch engine


def empty_rows(
    config: Lfm2VlConfig,
    rows: int,
    capacity: int,
    sampling: SamplingParams,
    key_shape: tuple[int, ...],
    per_row: bool,
) -> Rows:
    """Every row free (done). `per_row`: options as (B,) arrays (`sampling`'s floats broadcast) and one
    PRNG stream per row; else uniform. A table of seen tokens exactly when `sampling` has a penalty."""
    zeros = jnp.zeros((rows,), jnp.int32)
    seen = None
    if sampling.repetition_penalty is not None:
        seen = jnp.zeros((rows, config.text.vocab_size), bool)
    if per_row:
        sampling = jax.tree.map(lambda x: jnp.full((rows,), x, jnp.float32), sampling)
    return Rows(
        cache=init_cache(config, rows, capacity),
        last=zeros,
        generated=zeros,
        limit=zeros,
        done=jnp.ones((rows,), bool),
        stop_ids=jnp.full((rows, MIN_STOP_WIDTH), -1, jnp.int32),
        seen=seen,
        keys=jnp.zeros((rows, *key_shape) if per_row else key_shape, jnp.uint32),
        sampling=sampling,
        do_sample=jnp.zeros((rows,), bool) if per_row else None,
    )


@functools.partial(jax.jit, static_argnames=("config", "slots", "capacity", "top_k", "key_shape"))
def init_rows(config: Lfm2VlConfig, slots: int, capacity: int, top_k: int, key_shape: tuple) -> Rows:
    """The engine's slots: every row free, per-row options, no table of seen tokens."""
    sampling = SamplingParams(do_sample=True, top_k=top_k)
    return _constrain(config, empty_rows(config, slots, capacity, sampling, key_shape, per_row=True))


@functools.partial(jax.jit, static_argnames=("config", "penalty"), donate_argnames=("state",))
def set_penalty_table(config: Lfm2VlConfig, state: Rows, penalty: bool) -> Rows:
    """The state with (penalty) or without a table of seen tokens and per-row penalties: the step program
    the rows need. A table starts empty: only rows inserted after it exist can ask for a penalty."""
    if not penalty:
        state = state.replace(seen=None, sampling=state.sampling.replace(repetition_penalty=None))
    else:
        rows = state.last.shape[0]
        state = state.replace(
            seen=jnp.zeros((rows, config.text.vocab_size), bool),
            sampling=state.sampling.replace(repetition_penalty=jnp.ones((rows,), jnp.float32)),
        )
    return _constrain(config, state)


@functools.partial(jax.jit, static_argnames=("config", "capacity"), donate_argnames=("rest",))
def _grown(config: Lfm2VlConfig, blocks: list, rest: Rows, capacity: int) -> Rows:
    rows = rest.last.shape[0]

    def grow(spec: tuple, held: jax.Array, new: jax.Array) -> jax.Array:
        if "cache_seq" not in spec[1]:
            return held
        return jax.lax.dynamic_update_slice(new, held, (0,) * held.ndim)

    fresh = init_cache(config, rows, capacity)
    layout = cache_layout(config, rows, capacity)
    blocks = jax.tree.map(grow, layout, blocks, fresh.blocks, is_leaf=is_layout)
    cache = Cache(blocks=blocks, lengths=rest.cache.lengths, capacity=capacity)
    return _constrain(config, rest.replace(cache=cache))


def grow_capacity(config: Lfm2VlConfig, state: Rows, capacity: int) -> Rows:
    """The same rows with room for `capacity` positions each: the cache copied into a larger one, every
    other array kept in place (donated; the old cache's buffers fit nothing new, so they are not donated
    and are freed once the copy is made): the peak is the old cache plus the new one."""
    rest = state.replace(cache=state.cache.replace(blocks=None))
    return _grown(config, state.cache.blocks, rest, capacity)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def insert_rows(
    config: Lfm2VlConfig,
    state: Rows,
    rows: PrefilledRows,
    slots: jax.Array,
    limit: jax.Array,
    stop_ids: jax.Array,
    sampling: SamplingParams,
    do_sample: jax.Array,
) -> Rows:
    """Row r of `rows` into slot `slots[r]` (in place); a slot index out of range drops the row (padding).
    Cached positions past a row's prompt keep stale values, which its length masks. `rows.seen` exists
    exactly when the state has a table."""
    num_slots = state.last.shape[0]

    def write(spec: tuple, held: jax.Array, new: jax.Array) -> jax.Array:
        axes = spec[1]
        index: list[Any] = [slice(None)] * held.ndim
        index[axes.index("batch")] = slots
        if "cache_seq" in axes:
            seq = axes.index("cache_seq")
            index[seq] = slice(0, new.shape[seq])
        return held.at[tuple(index)].set(new.astype(held.dtype), mode="drop")

    layout = cache_layout(config, num_slots, state.cache.capacity)
    blocks = jax.tree.map(write, layout, state.cache.blocks, rows.entries, is_leaf=is_layout)

    def put(held: jax.Array, new: jax.Array) -> jax.Array:
        return held.at[slots].set(new.astype(held.dtype), mode="drop")

    cache = state.cache.replace(blocks=blocks, lengths=put(state.cache.lengths, rows.lengths))
    state = state.replace(
        cache=cache,
        last=put(state.last, rows.token),
        generated=put(state.generated, jnp.ones_like(limit)),
        limit=put(state.limit, limit),
        done=put(state.done, _stopped(rows.token, stop_ids) | (limit <= 1)),
        stop_ids=put(state.stop_ids, stop_ids),
        seen=None if state.seen is None else put(state.seen, rows.seen),
        keys=put(state.keys, rows.keys),
        sampling=jax.tree.map(put, state.sampling, sampling),
        do_sample=put(state.do_sample, do_sample),
    )
    return _constrain(config, state)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def release_rows(config: Lfm2VlConfig, state: Rows, released: jax.Array) -> Rows:
    """Rows where `released` (B,) is true stop decoding and count as free (cancelled requests)."""
    return _constrain(config, state.replace(done=state.done | released))


# ---------------------------------------------------------------------------------------------------------
# Decoding


def _step(params: Params, config: Lfm2VlConfig, state: Rows) -> tuple[Rows, jax.Array]:
    """One token for every live row: (state, tokens (B,), -1 for rows already done). Done rows compute
    and discard one (their lengths do not advance)."""
    rows = state.last.shape[0]
    live = ~state.done
    embeds = embed_tokens(params["text"], state.last[:, None], config.runtime)
    hidden, entries = text_forward(
        params["text"], config.text, config.runtime, embeds, jnp.ones((rows, 1), bool), cache=state.cache
    )
    cache = append(state.cache, entries, live.astype(jnp.int32), after=hidden)
    logits = lm_logits(params["text"], hidden[:, 0])
    token, keys = _sample(logits, state.seen, state.keys, state.sampling, state.do_sample)
    token = jnp.where(live, token, -1)
    generated = state.generated + live
    state = state.replace(
        cache=cache,
        keys=keys,
        last=jnp.where(live, token, state.last),
        generated=generated,
        done=state.done | _stopped(token, state.stop_ids) | (generated >= state.limit),
        seen=_mark_seen(state.seen, token, live),
    )
    return state, token


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def decode_step(params: Params, config: Lfm2VlConfig, state: Rows) -> tuple[Rows, jax.Array]:
    """One new token per row (-1 for rows already done); the state is donated and updated in place."""
    state, token = _step(params, config, state)
    return _constrain(config, state), token


def _decode_loop(
    params: Params,
    config: Lfm2VlConfig,
    state: Rows,
    max_steps: jax.Array,
    return_at_free: jax.Array,
    chunk: int,
) -> tuple[Rows, jax.Array, jax.Array]:
    rows = state.last.shape[0]

    def running(carry: tuple) -> jax.Array:
        state, _, step = carry
        free = jnp.sum(state.done)
        return (step < max_steps) & (free < rows) & (free < return_at_free)

    def step(carry: tuple) -> tuple:
        state, tokens, index = carry
        state, token = _step(params, config, state)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], index, axis=1)
        return state, tokens, index + 1

    tokens = jnp.full((rows, chunk), -1, jnp.int32)
    return jax.lax.while_loop(running, step, (state, tokens, jnp.zeros((), jnp.int32)))


@functools.partial(jax.jit, static_argnames=("config", "chunk"), donate_argnames=("state",))
def decode_steps(
    params: Params,
    config: Lfm2VlConfig,
    state: Rows,
    max_steps: jax.Array,
    return_at_free: jax.Array,
    *,
    chunk: int,
) -> tuple[Rows, jax.Array, jax.Array]:
    """Decode steps until `max_steps` (<= chunk) are done, every row is done, or `return_at_free` rows are
    (to be refilled). Returns the state, the tokens (B, chunk) each row produced at each step (-1 where
    none) and the number of steps run."""
    state, tokens, steps = _decode_loop(params, config, state, max_steps, return_at_free, chunk)
    return _constrain(config, state), tokens, steps


def _rows_of(config: Lfm2VlConfig, state: Rows, rows: jax.Array) -> Rows:
    """The sub-state of rows `rows` (R,): every per-row array gathered along its batch axis."""
    layout = cache_layout(config, state.last.shape[0], state.cache.capacity)
    blocks = jax.tree.map(
        lambda spec, x: jnp.take(x, rows, axis=spec[1].index("batch")),
        layout,
        state.cache.blocks,
        is_leaf=is_layout,
    )
    rest = jax.tree.map(lambda x: x[rows], state.replace(cache=None))
    return rest.replace(cache=state.cache.replace(blocks=blocks, lengths=state.cache.lengths[rows]))


def _put_rows(config: Lfm2VlConfig, state: Rows, rows: jax.Array, sub: Rows) -> Rows:
    """`state` with rows `rows` (R,) replaced by those of `sub` (R rows), in place."""
    layout = cache_layout(config, state.last.shape[0], state.cache.capacity)

    def put(spec: tuple, held: jax.Array, new: jax.Array) -> jax.Array:
        index: list[Any] = [slice(None)] * held.ndim
        index[spec[1].index("batch")] = rows
        return held.at[tuple(index)].set(new)

    blocks = jax.tree.map(put, layout, state.cache.blocks, sub.cache.blocks, is_leaf=is_layout)
    rest = jax.tree.map(
        lambda held, new: held.at[rows].set(new), state.replace(cache=None), sub.replace(cache=None)
    )
    lengths = state.cache.lengths.at[rows].set(sub.cache.lengths)
    return rest.replace(cache=state.cache.replace(blocks=blocks, lengths=lengths))


@functools.partial(jax.jit, static_argnames=("config", "chunk"), donate_argnames=("state",))
def decode_steps_on(
    params: Params,
    config: Lfm2VlConfig,
    state: Rows,
    rows: jax.Array,
    max_steps: jax.Array,
    return_at_free: jax.Array,
    *,
    chunk: int,
) -> tuple[Rows, jax.Array, jax.Array]:
    """`decode_steps` over rows `rows` (R,) of the state only (the busy slots, padded with distinct free
    ones): they are gathered once, decoded, and written back, so that a step computes R rows, not every
    slot. `return_at_free` counts the free rows among them. Returns the state and the tokens (R, chunk)."""
    sub, tokens, steps = _decode_loop(
        params, config, _rows_of(config, state, rows), max_steps, return_at_free, chunk
    )
    return _constrain(config, _put_rows(config, state, rows, sub)), tokens, steps
