"""Attention implementations beyond the reference einsum in `nn/attention.py`, chosen by name through
`RuntimeConfig.attention`. Each takes the reference's arguments (queries, head-major keys and values,
`kv_lengths`, `q_positions`, `causal`, `new_k`/`new_v`) and must equal it within rounding, gradients
included; the tests hold every registered implementation to the reference.

- "blockwise" (`blockwise.py`): flash attention in pure JAX, any backend and dtype; memory O(T x block)
  forward and backward (a custom VJP recomputes the scores from the saved log-sum-exp).
- "cudnn" (`dot_product_attention.py`): `jax.nn.dot_product_attention`'s fused cuDNN kernel; GPUs,
  bf16/fp16, no cached decoding. "xla" is the same wrapper on XLA's own implementation (any backend).

`choose("auto", call)` picks per call, from what `Call` states (backend, dtype, shapes, masking):
cuDNN where it runs, else the reference while its score matrix stays small (it is the fastest there, and
for decoding, where a step's scores are one row per query), else blockwise.
"""

from . import blockwise, dot_product_attention  # register themselves
from .registry import (
    REGISTRY,
    Call,
    Kernel,
    KernelUnavailableError,
    UnknownImplementationError,
    UnsupportedAttentionError,
    backend,
    choose,
    get,
    names,
    register,
)

__all__ = [
    "REGISTRY",
    "Call",
    "Kernel",
    "KernelUnavailableError",
    "UnknownImplementationError",
    "UnsupportedAttentionError",
    "backend",
    "blockwise",
    "choose",
    "dot_product_attention",
    "get",
    "names",
    "register",
]
