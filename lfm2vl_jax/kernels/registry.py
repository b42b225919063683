"""The attention implementations' registry: what each states it can run (`Call`), and `choose`, which
picks one per call. The implementations (`blockwise.py`, `dot_product_attention.py`) register themselves;
`kernels/__init__.py` imports them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ..errors import Lfm2VlError

# Above this many bytes of float32 scores (batch x heads x queries x keys), "auto" leaves the reference
# for the blockwise kernel. On the CPU the reference is slower from about 256 tokens on (its score matrix
# leaves the caches: 95 ms against 13 ms for a 512-token causal prefill at the text tower's shapes,
# benchmarks/bench_attention.py); on accelerators XLA fuses the reference well and the blockwise loop
# costs launches, so it takes over only where the scores get large (not measured yet: run the benchmark
# there with --dtype float32; bfloat16 goes to cuDNN on NVIDIA GPUs). A 16k-token prompt's scores are
# 17 GB at 450M shapes, far above either.
REFERENCE_MAX_SCORE_BYTES = {"cpu": 2 * 2**20}
DEFAULT_REFERENCE_MAX_SCORE_BYTES = 64 * 2**20
# Cached decoding of up to this many tokens per row stays on the reference whatever the cache length: its
# one row of scores per query is a few percent of the cache it reads anyway, in one fused pass.
DECODE_MAX_QUERIES = 16


@dataclasses.dataclass(frozen=True)
class Call:
    """The static facts of one attention call that decide which implementation may and should run it."""

    backend: str  # `backend()`: "cpu", "cuda", "rocm", "tpu"
    dtype: np.dtype  # of the queries
    batch: int
    q_len: int
    kv_len: int  # keys of `k`/`v` (the cache's capacity when decoding)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    cached: bool  # new_k/new_v given: cached decoding
    default_positions: bool  # q_positions not given: queries at 0 .. T-1

    @property
    def score_bytes(self) -> int:
        keys = self.kv_len + (self.q_len if self.cached else 0)
        return 4 * self.batch * self.num_heads * self.q_len * keys


@dataclasses.dataclass(frozen=True)
class Kernel:
    fn: Callable[..., Any]
    unsupported: Callable[[Call], str | None]  # why it cannot run a call, or None


REGISTRY: dict[str, Kernel] = {}


class UnknownImplementationError(Lfm2VlError):
    pass


class UnsupportedAttentionError(Lfm2VlError):
    """A named attention implementation cannot run this call (backend, dtype, shape or masking)."""


class KernelUnavailableError(UnsupportedAttentionError):
    """Raised by a kernel while tracing when the backend lacks what it needs (e.g. a usable cuDNN); "auto"
    then falls back to the next choice, a named implementation fails with it."""


def backend() -> str:
    """The default backend, GPUs told apart by vendor (cuDNN exists on CUDA only)."""
    name = jax.default_backend()
    if name == "gpu":
        return "rocm" if "rocm" in jax.devices()[0].client.platform_version.lower() else "cuda"
    return name


def register(name: str, fn: Callable[..., Any], unsupported: Callable[[Call], str | None]) -> None:
    REGISTRY[name] = Kernel(fn, unsupported)


def names() -> tuple[str, ...]:
    return ("auto", "reference", *sorted(REGISTRY))


def get(name: str) -> Callable[..., Any]:
    try:
        return REGISTRY[name].fn
    except KeyError:
        raise UnknownImplementationError(
            f"attention implementation {name!r} is not one of {', '.join(names())}"
        ) from None


def choose(implementation: str, call: Call, exclude: tuple[str, ...] = ()) -> str:
    """The implementation to run: `implementation` itself (an error if it cannot run `call`), or for
    "auto" the best one that can, other than those in `exclude`."""
    if implementation == "reference":
        return implementation
    if implementation != "auto":
        get(implementation)  # a clear error for an unknown name
        reason = REGISTRY[implementation].unsupported(call)
        if reason:
            raise UnsupportedAttentionError(f"attention implementation {implementation!r}: {reason}")
        return implementation
    if "cudnn" not in exclude and REGISTRY["cudnn"].unsupported(call) is None:
        return "cudnn"
    if call.cached and call.q_len <= DECODE_MAX_QUERIES:
        return "reference"
    if call.score_bytes > REFERENCE_MAX_SCORE_BYTES.get(call.backend, DEFAULT_REFERENCE_MAX_SCORE_BYTES):
        return "blockwise"
    return "reference"
