"""Choosing the next token: transformers' logits processors and warpers, in its order and with its
semantics, as one jittable function.

Order (as `GenerationMixin._get_logits_processor`): repetition penalty (greedy too), then, when sampling,
temperature -> top-k -> top-p -> min-p, then a categorical draw. Removed tokens get -inf.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ..errors import Lfm2VlError

SEED_RANGE = (-(2**63), 2**64 - 1)  # 64-bit seeds, signed or unsigned
# Smallest sampling temperature taken: float32 logits divided by less can overflow (and a subnormal one is
# flushed to zero on some backends), which turns the draw into garbage. Smaller ones are refused, not
# rounded: `do_sample=False` is the way to get the most likely token.
MIN_TEMPERATURE = 1e-5


def seed_key(seed: int) -> jax.Array:
    """The PRNG key of a 64-bit seed (in SEED_RANGE; a negative one counts as its two's complement, seed
    mod 2**64). `jax.random.key(seed)` keeps only the low 32 bits without `jax_enable_x64` (0 and 2**32
    would sample alike), so the low 32 bits seed the key and the high 32 bits, where not zero, are folded
    in: seeds in [0, 2**32) keep `jax.random.key(seed)`'s stream, with or without x64."""
    value = int(seed) % 2**64
    key = jax.random.key(np.uint32(value & 0xFFFFFFFF))
    return key if value < 2**32 else jax.random.fold_in(key, np.uint32(value >> 32))


@flax.struct.dataclass
class SamplingParams:
    """Static fields pick the program (greedy or sampling, top-k width); the floats are traced, so
    changing them does not recompile. Defaults are transformers' `GenerationConfig` defaults; the model
    card recommends `temperature=0.1, min_p=0.15, repetition_penalty=1.05`.

    `repetition_penalty=None` (no penalty; `Lfm2VlForConditionalGeneration` maps transformers' 1.0 to it)
    is part of the program too: the decoder then keeps no (batch, vocab) record of the tokens seen.
    """

    do_sample: bool = flax.struct.field(pytree_node=False, default=False)
    top_k: int = flax.struct.field(pytree_node=False, default=50)  # 0: off
    temperature: float = 1.0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float | None = None

    def __post_init__(self):
        valid = {
            "temperature": lambda x: x >= MIN_TEMPERATURE,
            "top_k": lambda x: x >= 0,
            "top_p": lambda x: 0 < x <= 1,
            "min_p": lambda x: 0 <= x <= 1,
            "repetition_penalty": lambda x: x > 0,
        }
        for name, ok in valid.items():
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not ok(value):  # not when traced (nor None)
                raise Lfm2VlError(f"invalid sampling parameter {name}={value}")


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array | float) -> jax.Array:
    """Tokens already in the sequence (seen: (B, V) bool) are made less likely: positive logits divided,
    negative ones multiplied by the penalty (transformers' `RepetitionPenaltyLogitsProcessor`)."""
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def _top_p_min_p(logits: jax.Array, top_p: jax.Array | float, min_p: jax.Array | float) -> jax.Array:
    """top-p then min-p over the last axis (the whole vocabulary, or top-k candidates)."""
    # top-p: drop the lowest-probability tokens whose cumulative mass stays <= 1 - top_p (keep >= 1).
    order = jnp.argsort(logits, axis=-1)  # ascending
    ascending = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    drop_sorted = (cumulative <= 1 - top_p).at[..., -1].set(False)
    rows = jnp.arange(logits.shape[0])[:, None]
    drop = jnp.zeros_like(drop_sorted).at[rows, order].set(drop_sorted)
    logits = jnp.where(drop, -jnp.inf, logits)
    # min-p: drop tokens less likely than min_p times the most likely one.
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(probs < min_p * jnp.max(probs, axis=-1, keepdims=True), -jnp.inf, logits)


def _penalised(logits: jax.Array, seen: jax.Array | None, params: SamplingParams) -> jax.Array:
    if params.repetition_penalty is None:
        return logits
    return apply_repetition_penalty(logits, seen, params.repetition_penalty)


def process_logits(logits: jax.Array, seen: jax.Array | None, params: SamplingParams) -> jax.Array:
    """The full-vocabulary logits a sampling step draws from (B, V); -inf where removed. `seen` (B, V)
    may be None without a repetition penalty."""
    logits = _penalised(logits, seen, params) / params.temperature
    if params.top_k:
        kth = jax.lax.top_k(logits, min(params.top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return _top_p_min_p(logits, params.top_p, params.min_p)


def next_token(
    logits: jax.Array, seen: jax.Array | None, key: jax.Array | None, params: SamplingParams
) -> jax.Array:
    """(B, V) float32 logits -> (B,) int32 tokens. `seen` may be None without a repetition penalty, `key`
    when greedy.

    With top-k on, top-p and min-p run on the k candidates rather than sorting the whole vocabulary: the
    same distribution as `process_logits` (tokens tied with the k-th are not kept, a measure-zero case).
    """
    logits = _penalised(logits, seen, params)
    if not params.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / params.temperature
    if not params.top_k:
        return jax.random.categorical(key, _top_p_min_p(logits, params.top_p, params.min_p)).astype(jnp.int32)
    values, ids = jax.lax.top_k(logits, min(params.top_k, logits.shape[-1]))
    choice = jax.random.categorical(key, _top_p_min_p(values, params.top_p, params.min_p))
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def next_token_rows(
    logits: jax.Array, seen: jax.Array | None, keys: jax.Array, params: SamplingParams, do_sample: jax.Array
) -> jax.Array:
    """`next_token` with options per row: `params`' floats are (B,) arrays (its static `top_k` is shared),
    `do_sample` (B,) bool, `keys` (B,) one PRNG key per row; `seen` and the penalty None together.

    Row b gets exactly the token `next_token` gives it alone, as a batch of one: the sampling rows are
    vmapped, so each draws from its own key with the (1, V) (or (1, k)) shape of a single request.
    Rows that do not sample take the (penalised) argmax; the sampling branch runs only when a row samples.
    """
    penalty = params.repetition_penalty
    greedy = next_token(
        logits, seen, None, SamplingParams(repetition_penalty=None if penalty is None else penalty[:, None])
    )
    sampled = params.replace(do_sample=True)

    def alone(row: jax.Array, row_seen: jax.Array | None, key: jax.Array, p: SamplingParams) -> jax.Array:
        return next_token(row[None], None if row_seen is None else row_seen[None], key, p)[0]

    def draw(_: None) -> jax.Array:
        return jnp.where(do_sample, jax.vmap(alone)(logits, seen, keys, sampled), greedy)

    return jax.lax.cond(jnp.any(do_sample), draw, lambda _: greedy, None)
