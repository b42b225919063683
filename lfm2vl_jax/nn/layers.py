"""Small shared building blocks: the projection entry point, norms, dense layers, activations, rotary
embeddings, dtype casts, remat, matmul precision.

Norms compute in float32 and return the input's dtype, as the reference does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from .quant import QuantizedWeight, quantized_einsum

# Names given (with `checkpoint_name`) to the intermediate values a remat policy may keep.
SAVEABLE_NAMES = ("q", "k", "v", "conv_out")


def remat_policy(policy: str) -> Callable:
    """`jax.checkpoint`'s policy for a named one (see `remat`; not "none")."""
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "qkv_conv": jax.checkpoint_policies.save_only_these_names(*SAVEABLE_NAMES),
    }
    if policy not in policies:
        raise ValueError(f"unknown remat policy {policy!r}")
    return policies[policy]


def remat(fn: Callable, policy: str, in_scan: bool = True) -> Callable:
    """`fn` wrapped in `jax.checkpoint` with a named policy: what its backward pass keeps from the forward
    pass instead of recomputing. "none": everything (no wrapper); "full": only the inputs; "dots": matmul
    outputs; "qkv_conv": the attention projections and conv outputs (`SAVEABLE_NAMES`)."""
    if policy == "none":
        return fn
    # Inside a scan, CSE cannot merge the recomputation into the forward pass, so its guard is not needed.
    return jax.checkpoint(fn, policy=remat_policy(policy), prevent_cse=not in_scan)


def matmul_precision(dtype: Any) -> contextlib.AbstractContextManager:
    """The scope every model function traces its matrix products in: float32 computations get float32
    products on every backend (by default GPUs multiply float32 in TF32 and TPUs in bfloat16 passes, 1e-3
    relative error where transformers keeps 1e-6), bfloat16 and float16 keep the backend's default. The
    precision is recorded on each `dot_general` when traced, so it holds inside any caller's jit and
    under `jax.grad` (transposed products inherit it)."""
    if jnp.dtype(dtype) == jnp.float32:
        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()


def cast(tree: Any, dtype: Any) -> Any:
    """Floating leaves cast to `dtype` (weights to the compute dtype where they are used; a no-op when
    they already have it)."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x, tree
    )


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """LFM2's RMSNorm: normalise in float32, cast back, then scale (the reference's order of operations)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * normed.astype(x.dtype)


def layer_norm(x: jax.Array, p: dict[str, jax.Array], eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (normed * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


class LoraWeight(struct.PyTreeNode):
    """A frozen weight with a low-rank adapter, which `project` applies unmerged:
    `x @ base + scale * (dropout(x) @ a) @ b`.

    a: (*inputs, r) and b: (r, *outputs), the base weight's input and output axes around the rank (sliced
    along a leading `layers` axis by a scan, as the weight is). dropout_key: a raw PRNG key (uint32 (2,)),
    or None for no dropout (evaluation, or rate 0); peft's semantics: inputs zeroed with probability
    `dropout`, the rest scaled by 1 / (1 - dropout)."""

    base: Any  # a `Weight`: an array, or a quantized weight
    a: jax.Array
    b: jax.Array
    dropout_key: jax.Array | None = None
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)


# What `project` accepts as a weight: a plain array, or one of the types it dispatches on.
Weight = Any


def _operands(equation: str) -> tuple[str, str, str]:
    inputs, output = equation.replace(" ", "").split("->")
    x_axes, w_axes = inputs.split(",")
    return x_axes, w_axes, output


def lora_update(equation: str, x: jax.Array, weight: LoraWeight) -> jax.Array:
    """scale * (dropout(x) @ a) @ b, in the layout `equation` gives x @ base. The weight's axes are its
    contracted (input) axes then its output axes (input-first kernels); r names the rank axis."""
    x_axes, w_axes, output = _operands(equation)
    contracted = "".join(axis for axis in w_axes if axis not in output)
    if not w_axes.startswith(contracted):
        raise ValueError(f"LoRA needs an input-first weight, got {equation!r}")
    rank = next(c for c in "rzyqjlmnopsuvwx" if c not in equation)
    kept = "".join(axis for axis in x_axes if axis not in contracted)
    if weight.dropout_key is not None and weight.dropout > 0:
        keep = jax.random.bernoulli(jax.random.wrap_key_data(weight.dropout_key), 1 - weight.dropout, x.shape)
        x = jnp.where(keep, x / jnp.asarray(1 - weight.dropout, x.dtype), jnp.zeros((), x.dtype))
    xa = jnp.einsum(f"{x_axes},{contracted}{rank}->{kept}{rank}", x, weight.a)
    update = jnp.einsum(f"{kept}{rank},{rank}{w_axes[len(contracted) :]}->{output}", xa, weight.b)
    return update * jnp.asarray(weight.scale, update.dtype)


def project(equation: str, x: jax.Array, weight: Weight) -> jax.Array:
    """THE projection: `jnp.einsum(equation, x, weight)` for every adaptable weight of the model (text
    attention, MLP and short-conv projections, vision attention and MLP, projector), so that a weight
    type dispatched here changes every one of them.

    Contract: `equation` is "x_axes,weight_axes->output" with the weight input-first (its contracted axes,
    then its output axes); `weight` is
      - a plain array: exactly `jnp.einsum(equation, x, weight)` (the same product, the same rounding);
      - a `LoraWeight`: the base's projection plus the adapter's update, never merging the two (gradients
        reach a and b through two rank-r products; the base gets none unless it is differentiated);
      - a quantized weight (its type dispatched here, like `LoraWeight`): dequantized inside the product,
        no full-size float copy materialised.
    The output has `x`'s dtype for a plain or adapted weight, as einsum gives it."""
    if isinstance(weight, LoraWeight):
        return project(equation, x, weight.base) + lora_update(equation, x, weight)
    if isinstance(weight, QuantizedWeight):
        return quantized_einsum(equation, x, weight)
    return jnp.einsum(equation, x, weight)


def merge_input_axes(weight: Weight, count: int) -> Weight:
    """The weight with its first `count` (input) axes made one, e.g. an attention output kernel (N, H, D)
    as (N*H, D), so that the product contracts one axis (XLA may transpose the weight to contract two).
    Every weight type `project` takes reshapes here."""
    if isinstance(weight, LoraWeight):
        return weight.replace(base=merge_input_axes(weight.base, count), a=merge_input_axes(weight.a, count))
    if isinstance(weight, QuantizedWeight):  # quantized with its input axes merged already
        return weight
    return weight.reshape(-1, *weight.shape[count:])


def dense(x: jax.Array, p: dict[str, Any]) -> jax.Array:
    """`x @ kernel (+ bias)` over the last axis of x and the first of the kernel (axis legend: e inputs,
    f outputs)."""
    y = project("...e,ef->...f", x, p["kernel"])
    return y + p["bias"] if "bias" in p else y


def activation(name: str) -> Any:
    """transformers' activation names: "gelu" is the exact (erf) GELU, "gelu_pytorch_tanh" the tanh one."""
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "gelu_pytorch_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unsupported activation {name!r}")


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """NeoX-style rotary embedding (rotate the two halves of the head dim).

    x: (B, T, heads, H); positions: (B, T) integer positions.
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)
