"""Attention implementations beyond the reference einsum in `nn/attention.py`, chosen by name through
`RuntimeConfig.attention`. Each takes the reference's arguments (queries, head-major keys and values,
`kv_lengths`, `q_positions`, `causal`, `new_k`/`new_v`) and must equal it within rounding; the tests hold
every registered implementation to the reference.

"auto" resolves, per call, to the best implementation for the backend and shapes; until kernels are
registered, that is the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import Lfm2VlError

REGISTRY: dict[str, Callable[..., Any]] = {}


class UnknownImplementationError(Lfm2VlError):
    pass


def names() -> tuple[str, ...]:
    return ("auto", "reference", *sorted(REGISTRY))


def get(name: str) -> Callable[..., Any]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownImplementationError(
            f"attention implementation {name!r} is not one of {', '.join(names())}"
        ) from None


def choose(implementation: str, **facts: Any) -> str:
    """The implementation to run for `implementation` ("auto" picks from `facts`: q, k, causal, cached)."""
    if implementation == "auto":
        return "reference"
    if implementation != "reference":
        get(implementation)  # a clear error for an unknown name
    return implementation
