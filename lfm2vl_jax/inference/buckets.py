"""Padded shapes: every size a program is compiled for goes through `bucket`, so that a stream of varied
requests compiles a bounded number of programs."""

from __future__ import annotations

import math

MIN_STOP_WIDTH = 8  # stop ids per row are padded (with -1) to this many, or the next power of two


def bucket(n: int, minimum: int = 1, per_doubling: int = 4) -> int:
    """The one bucketing rule of every padded shape: the smallest size >= max(n, minimum) of the form
    2**k * (1 + i / per_doubling), rounded up. With 4 (the default; 1..8 are all sizes, then 10, 12, 14,
    16, 20, ...) at most 25% padding, four shapes per doubling; with 1, powers of two."""
    n = max(n, minimum)
    power = 1 << (n.bit_length() - 1)
    sizes = (math.ceil(power * (per_doubling + i) / per_doubling) for i in range(per_doubling + 1))
    return next(size for size in sizes if size >= n)


def cache_capacity(prompt_length: int, max_new_tokens: int) -> tuple[int, int]:
    """(cache positions, token-buffer length) of a request: its bucketed prompt length plus the bucketed
    number of new tokens (the same programs serve every `max_new_tokens` of a bucket)."""
    new_bucket = bucket(max_new_tokens, minimum=16)
    return prompt_length + new_bucket, new_bucket


def stop_width(count: int) -> int:
    """Columns of a stop-id table for `count` ids: a new count compiles nothing new until it passes 8."""
    return bucket(count, minimum=MIN_STOP_WIDTH, per_doubling=1)
