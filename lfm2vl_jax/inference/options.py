"""Generation options and budgets, checked once for every driver (`generate`, the batch engine, the
server): the decoding options (transformers' names, filled from generation_config.json, then transformers'
defaults), the number of new tokens, and whether a request's cache fits the model's positions and the
memory available. Each error names the option and where its value came from."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ..config import Lfm2VlConfig
from ..inputs import (
    INT32_MAX,
    OptionError,
    UnknownOptionError,
    available_memory,
    check_int,
    check_token_ids,
    is_int,
    is_real,
)
from ..memory import gigabytes
from .buckets import MIN_STOP_WIDTH, cache_capacity
from .cache import cache_layout, is_layout
from .engine import PreparedBatch
from .sampling import MIN_TEMPERATURE, SamplingParams


def generation_length(value: Any, defaults: dict[str, Any], prompt_length: int, fallback: int) -> int:
    """How many new tokens to generate, as transformers decides: `value` (the caller's; None: unset), else
    generation_config.json's (`defaults`) max_new_tokens, else its max_length (prompt and new tokens)
    minus `prompt_length`, else `fallback`; each checked, the error naming where the value came from."""
    if value is not None:
        return check_int("max_new_tokens", value, 1, INT32_MAX)
    where = "generation_config.json: "
    if defaults.get("max_new_tokens") is not None:
        return check_int("max_new_tokens", defaults["max_new_tokens"], 1, INT32_MAX, where)
    if defaults.get("max_length") is not None:
        total = check_int("max_length", defaults["max_length"], 1, INT32_MAX, where)
        if total <= prompt_length:
            raise OptionError(
                f"{where}max_length={total} (prompt and new tokens) leaves no room after the prompt's "
                f"{prompt_length} tokens; pass max_new_tokens"
            )
        return total - prompt_length
    return fallback


# Sampling options: what each must be (for the message) and the test its value must pass.
SAMPLING_RANGES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "temperature": (
        f"a finite number >= {MIN_TEMPERATURE:g} (below it float32 logits can overflow; do_sample=False "
        "gives the most likely token)",
        lambda x: x >= MIN_TEMPERATURE,
    ),
    "top_p": ("a number in (0, 1]", lambda x: 0 < x <= 1),
    "min_p": ("a number in [0, 1]", lambda x: 0 <= x <= 1),
    "repetition_penalty": ("a positive finite number", lambda x: x > 0),
}
SAMPLING_DEFAULTS = {  # transformers' GenerationConfig defaults
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}
TOKEN_OPTIONS = ("eos_token_id", "pad_token_id", "stop_token_ids")
GENERATE_OPTIONS = (*SAMPLING_DEFAULTS, *TOKEN_OPTIONS)
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p")  # what greedy decoding ignores


WARNED_IGNORED: set[tuple[str, ...]] = set()  # sets of ignored sampling options warned about, once each


def warn_ignored_sampling_options(
    values: dict[str, Any], given: dict[str, Any], defaults: dict[str, Any]
) -> None:
    """Greedy decoding with sampling options set: warned once per set of options, as transformers'
    `GenerationConfig.validate` does (its conditions: a value other than transformers' default, given by
    the caller, or read from generation_config.json when the caller did not choose do_sample either)."""
    chose_greedy = given.get("do_sample") is not None
    ignored = [
        name
        for name in SAMPLING_ONLY
        if values[name] != SAMPLING_DEFAULTS[name]
        and (given.get(name) is not None or (not chose_greedy and defaults.get(name) is not None))
    ]
    if ignored and tuple(ignored) not in WARNED_IGNORED:
        WARNED_IGNORED.add(tuple(ignored))
        shown = ", ".join(f"{name}={values[name]!r}" for name in ignored)
        warnings.warn(
            f"do_sample is not set to True, so {shown} will be ignored: "
            f"{'it applies' if len(ignored) == 1 else 'they apply'} to sampling only (greedy decoding picks "
            f"the most likely token). Set do_sample=True or unset {', '.join(ignored)}.",
            UserWarning,
            stacklevel=6,  # generate(...) or stream(...)'s caller
        )


def resolve_generation_options(
    config: Lfm2VlConfig, options: dict[str, Any], defaults: dict[str, Any]
) -> tuple[SamplingParams, tuple[int, ...], int]:
    """(sampling parameters, stop ids, pad id) from the options given (None: unset), else the checkpoint's
    generation_config.json (`defaults`), else the config and transformers' defaults; every value checked
    for type and range, the error naming the option and where it came from."""
    unknown = sorted(set(options) - set(GENERATE_OPTIONS))
    if unknown:
        raise UnknownOptionError(
            f"generate() got unexpected arguments {unknown}; it takes {list(GENERATE_OPTIONS)}"
        )
    vocab = config.text.vocab_size

    def pick(key: str, fallback: Any) -> tuple[Any, str]:
        if options.get(key) is not None:
            return options[key], "generate(): "
        if defaults.get(key) is not None:
            return defaults[key], "generation_config.json: "
        return fallback, ""

    values: dict[str, Any] = {}
    do_sample, where = pick("do_sample", SAMPLING_DEFAULTS["do_sample"])
    if not isinstance(do_sample, (bool, np.bool_)):
        raise OptionError(f"{where}do_sample must be True or False, got {do_sample!r}")
    top_k, where = pick("top_k", SAMPLING_DEFAULTS["top_k"])
    values["top_k"] = check_int("top_k", top_k, 0, where=where)
    for name, (description, accepts) in SAMPLING_RANGES.items():
        value, where = pick(name, SAMPLING_DEFAULTS[name])
        if not is_real(value) or not math.isfinite(value) or not accepts(value):
            raise OptionError(f"{where}{name} must be {description}, got {value!r}")
        values[name] = float(value)
    if values["repetition_penalty"] == 1.0:  # transformers applies none; None keeps no (B, V) seen record
        values["repetition_penalty"] = None
    if not do_sample:  # greedy decoding reads only the repetition penalty: one program for any others
        warn_ignored_sampling_options(values, options, defaults)
        values = {"repetition_penalty": values["repetition_penalty"]}
    sampling = SamplingParams(do_sample=bool(do_sample), **values)

    eos, where = pick("eos_token_id", config.eos_token_id)
    stop = [] if eos is None else check_token_ids("eos_token_id", eos, vocab, where)
    extra = options.get("stop_token_ids")
    if extra is not None:
        stop += check_token_ids("stop_token_ids", extra, vocab, "generate(): ")
    pad, where = pick("pad_token_id", config.pad_token_id)
    if pad is None:
        pad = stop[0] if stop else 0
    if not is_int(pad) or not 0 <= pad < vocab:
        raise OptionError(
            f"{where}pad_token_id must be a token id, an integer in [0, {vocab}) (the vocabulary), "
            f"got {pad!r}"
        )
    return sampling, tuple(stop), int(pad)


def decoding_bytes(config: Lfm2VlConfig, rows: int, capacity: int, penalty: bool = True) -> int:
    """Device bytes of a decoding state (`step.Rows`) of `rows` rows and `capacity` positions: the cache,
    the per-row vectors and stop table, and with `penalty` the (rows, vocab) table of seen tokens. The one
    memory estimate of `generate`, the batch engine and the server."""
    shapes = jax.tree.leaves(cache_layout(config, rows, capacity), is_leaf=is_layout)
    cache = sum(math.prod(shape) for shape, _ in shapes) * np.dtype(config.runtime.dtypes.cache).itemsize
    per_row = 4 * (8 + MIN_STOP_WIDTH)  # tokens, counts, limits, flags, keys, options, stop ids
    return cache + rows * per_row + (rows * config.text.vocab_size if penalty else 0)


def check_decoding_fits(config: Lfm2VlConfig, rows: int, capacity: int, what: str, advice: str) -> None:
    """Refuses, before anything is allocated, a decoding state that exceeds the memory available; the
    error starts with `what` (the option the user set) and ends with `advice`."""
    needed = decoding_bytes(config, rows, capacity)
    available = available_memory(config)
    if available is not None and needed > available[0]:
        raise OptionError(
            f"{what}: decoding {rows} row(s) to {capacity} positions needs {gigabytes(needed)} for its "
            f"cache and buffers, more than the {gigabytes(available[0])} of {available[1]}; {advice}"
        )


def check_positions(config: Lfm2VlConfig, prompt: int, max_new_tokens: int) -> None:
    """Refuses a prompt plus `max_new_tokens` beyond the model's positions."""
    limit = config.text.max_position_embeddings
    if prompt + max_new_tokens > limit:
        room = f"at most {limit - prompt} new tokens fit" if prompt < limit else "the prompt alone fills them"
        raise OptionError(
            f"max_new_tokens={max_new_tokens}: the prompt's {prompt} tokens plus {max_new_tokens} new ones "
            f"exceed the model's {limit} positions (text_config.max_position_embeddings); {room}"
        )


def check_generation_fits(config: Lfm2VlConfig, batch: PreparedBatch, max_new_tokens: int) -> None:
    """Refuses, before anything is allocated, a `generate` call whose prompt plus `max_new_tokens` exceeds
    the model's positions, or whose decoding state exceeds the memory available."""
    check_positions(config, int(batch.attention_mask.sum(axis=1).max()), max_new_tokens)
    rows, seq = batch.input_ids.shape
    capacity, _ = cache_capacity(seq, max_new_tokens)
    check_decoding_fits(
        config, rows, capacity, f"max_new_tokens={max_new_tokens}", "lower max_new_tokens or the batch size"
    )
