"""Weight-only quantization: int8 with one scale per output channel, int4 with one scale per group of
consecutive inputs, held as a small pytree (`QuantizedWeight`) that `nn.layers.project` multiplies by,
dequantizing inside the product.

A quantized weight has ONE contracted (input) axis: a kernel's input axes are merged into one when it is
quantized (the attention output kernel (N, H, D) is held as (N*H, D)), and the tied embedding (V, D)
contracts its last axis in the LM head. Leading axes before it (a scanned stack's `layers`) are sliced by
`lax.scan` like any leaf; the static `axis` counts from the end, so a slice keeps it valid.

Symmetric absmax scales (no zero point): int8 rounds w / (max|w| / 127) per output channel; int4 rounds
w / (max|w| / 7) per group, two values per byte (inputs 2i in the low nibble, 2i+1 in the high one), since
XLA stores `jnp.int4` one value per byte on a CPU.

The product (`quantized_einsum`): XLA's CPU dot does not fuse a producer into its operands, so a weight
dequantized whole is written out in full (float32) before the dot, every call. On a CPU the contracted axis
is cut into chunks of at most `CPU_CHUNK` inputs: each chunk is dequantized (one fused convert-and-scale)
into a buffer a fraction of the weight's size and multiplied, and the partial products summed, each chunk
ordered after the previous product. Other backends fuse the dequantization into the matrix product (one
chunk). The CPU compiler must order programs depth-first for the chunks not to pile up: see
`lfm2vl_jax/xla_flags.py`, and docs/design.md for the measured alternatives.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# Inputs per dequantized chunk on a CPU (measured in docs/design.md: 512 beat 128 and 256 and the whole
# weight at batch 1 and 8 on a (1024, 4608) kernel).
CPU_CHUNK = 512
# Vocabulary rows per dequantized chunk of a tied LM head (V, D) on a CPU, which contracts its last axis.
CPU_HEAD_ROWS = 4096


class QuantizedWeight(struct.PyTreeNode):
    """values: int8 (8 bits), or uint8 holding two int4 values per byte along `axis` (4 bits); scales:
    float, the values' logical shape with the contracted axis cut to its number of groups (1 for int8).
    Logical weight: values (unpacked) * scales repeated `group_size` times along `axis`."""

    values: Any
    scales: Any
    bits: int = struct.field(pytree_node=False, default=8)
    group_size: int = struct.field(pytree_node=False, default=1)  # inputs per scale along `axis`
    axis: int = struct.field(pytree_node=False, default=-2)  # the contracted axis, negative

    @property
    def dtype(self) -> Any:
        """The dequantized dtype: the scales'."""
        return self.scales.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (dequantized) shape."""
        shape = list(self.values.shape)
        shape[self.axis] *= 8 // self.bits
        return tuple(shape)


def quantize(w: Any, bits: int, group_size: int | None, first: int, count: int) -> QuantizedWeight:
    """Quantizes `w` (host numpy, any float dtype) along its axes `first .. first+count-1` merged into one
    contracted axis; `group_size` None: one group (per output channel). Returns numpy arrays."""
    w = np.asarray(w, np.float32)
    shape = (*w.shape[:first], math.prod(w.shape[first : first + count]), *w.shape[first + count :])
    k = shape[first]
    group = k if group_size is None else group_size
    if k % group:
        raise ValueError(f"group size {group} does not divide the contracted width {k}")
    grouped = w.reshape(*shape[:first], k // group, group, *shape[first + 1 :])
    qmax = 127 if bits == 8 else 7
    scales = np.abs(grouped).max(axis=first + 1, keepdims=True) / qmax
    q = np.rint(grouped / np.where(scales == 0, 1, scales))
    q = np.clip(q, -qmax, qmax).astype(np.int8).reshape(shape)
    if bits == 4:
        even = np.take(q, np.arange(0, k, 2), axis=first).astype(np.uint8)
        odd = np.take(q, np.arange(1, k, 2), axis=first).astype(np.uint8)
        q = (even & 0x0F) | (odd << 4)
    axis = first - len(shape)
    return QuantizedWeight(q, scales.squeeze(first + 1), bits=bits, group_size=group, axis=axis)


def quantize_like(w: Any, like: QuantizedWeight) -> QuantizedWeight:
    """`w` quantized as `like` (a `QuantizedWeight` of anything with a `.shape`, e.g. the spec tree's)
    says: its trailing output axes, leading stacked axes and contracted axes follow from the shapes."""
    outputs = -like.axis - 1
    first = len(like.values.shape) - 1 - outputs
    count = w.ndim - first - outputs
    group = None if like.group_size == like.shape[like.axis] else like.group_size
    return quantize(w, like.bits, group, first, count)


def _unpack(packed: jax.Array, axis: int) -> jax.Array:
    """uint8 pairs -> int8 values along `axis` (positive), each byte's low nibble first."""
    low = jax.lax.bitcast_convert_type(packed << 4, jnp.int8) >> 4  # arithmetic shifts: sign-extended
    high = jax.lax.bitcast_convert_type(packed, jnp.int8) >> 4
    pairs = jnp.stack([low, high], axis=axis + 1)
    return pairs.reshape(*packed.shape[:axis], -1, *packed.shape[axis + 1 :])


def _chunk(w: QuantizedWeight, start: int, size: int) -> QuantizedWeight:
    """Inputs `start .. start+size` of the contracted axis, still quantized (a weight of `size` inputs)."""
    if start == 0 and size == w.shape[w.axis]:
        return w
    axis = w.values.ndim + w.axis
    per_byte = 8 // w.bits
    values = jax.lax.slice_in_dim(w.values, start // per_byte, (start + size) // per_byte, axis=axis)
    if w.group_size >= w.shape[w.axis]:  # one group: its scale broadcasts over any chunk
        return w.replace(values=values, group_size=size)
    scales = jax.lax.slice_in_dim(w.scales, start // w.group_size, (start + size) // w.group_size, axis=axis)
    return w.replace(values=values, scales=scales)


def dequantize(w: QuantizedWeight, dtype: Any = jnp.float32) -> jax.Array:
    """The whole weight in `dtype`, in its quantized (merged-input) shape."""
    axis = w.values.ndim + w.axis
    values = _unpack(w.values, axis) if w.bits == 4 else w.values
    if w.group_size >= w.shape[w.axis]:  # one group: its scale broadcasts
        return values.astype(dtype) * w.scales.astype(dtype)
    group = w.group_size
    grouped = values.reshape(*values.shape[:axis], -1, group, *values.shape[axis + 1 :])
    return (grouped.astype(dtype) * jnp.expand_dims(w.scales.astype(dtype), axis + 1)).reshape(values.shape)


def _after(dependency: Any, w: QuantizedWeight) -> QuantizedWeight:
    """On a CPU, `w` made to wait for `dependency` (the previous partial product), so that each chunk is
    dequantized just before its product: int8 batch-1 decoding of the 450M went from 14.6 to 23.0 tokens/s
    (the barrier is gone from the compiled program; the order it set stays). Elsewhere `w`: the
    dequantization fuses into the product, no buffer to order."""
    if jax.default_backend() != "cpu":
        return w
    return jax.lax.optimization_barrier((dependency, w))[1]


def dequantize_on_host(w: QuantizedWeight) -> np.ndarray:
    """`dequantize(w)` in float32 numpy, computed on the host (export: no per-shape compilation)."""
    axis = w.values.ndim + w.axis
    values = np.asarray(w.values)
    if w.bits == 4:
        low = (values << 4).view(np.int8) >> 4
        values = np.stack([low, values.view(np.int8) >> 4], axis=axis + 1).reshape(w.shape)
    scales = np.repeat(np.asarray(w.scales, np.float32), w.shape[w.axis] // w.scales.shape[axis], axis=axis)
    return values.astype(np.float32) * scales


def chunk_size(width: int, w: QuantizedWeight) -> int:
    """Inputs per dequantized chunk (the last chunk takes what is left): on a CPU the most whole groups
    (and int4 byte pairs) within `CPU_CHUNK` inputs; elsewhere the whole width (the backend fuses). Not a
    divisor of `width`: the 1.6B vision MLP's 4304 inputs in int4 groups of 16 (= 16 x 269) would otherwise
    be cut into 269 chunks, and its image prefill took 31 s instead of 6."""
    if jax.default_backend() != "cpu":
        return width
    unit = w.group_size if w.group_size < width else 8 // w.bits
    return min(width, max(unit, CPU_CHUNK // unit * unit))


def _row_chunk(rows: int) -> int:
    """Rows of an embedding-layout weight per dequantized chunk (on a CPU; elsewhere all)."""
    return min(rows, CPU_HEAD_ROWS) if jax.default_backend() == "cpu" else rows


def quantized_einsum(
    equation: str, x: jax.Array, w: QuantizedWeight, preferred_element_type: Any = None
) -> jax.Array:
    """`jnp.einsum(equation, x, dequantize(w))` without a full-size float copy of `w` on a CPU: the
    contracted axis in chunks (see the module docstring), each dequantized to x's dtype. `equation` must
    contract exactly the weight's quantized axis."""
    inputs, output = equation.replace(" ", "").split("->")
    x_axes, w_axes = inputs.split(",")
    letter = w_axes[w.axis]
    if len(w_axes) != len(w.shape) or [a for a in w_axes if a not in output] != [letter]:
        raise ValueError(f"{equation!r} does not contract the quantized axis {w.axis} alone")
    if w.axis == -1 and len(w_axes) == 2:  # an embedding as the LM head (V, D): chunks of rows, joined
        rows = _row_chunk(w.shape[0])
        parts = []
        for start in range(0, w.shape[0], rows):
            block = w.replace(values=w.values[start : start + rows], scales=w.scales[start : start + rows])
            block = dequantize(_after(parts[-1] if parts else x, block), x.dtype)
            parts.append(jnp.einsum(equation, x, block, preferred_element_type=preferred_element_type))
        return jnp.concatenate(parts, axis=output.index(w_axes[0]) - len(output))
    x_axis = x.ndim + x_axes.index(letter) - len(x_axes)  # the letter sits after any ellipsis
    width = w.shape[w.axis]
    step = chunk_size(width, w)
    total = None
    for start in range(0, width, step):
        size = min(step, width - start)
        part = x if size == width else jax.lax.slice_in_dim(x, start, start + size, axis=x_axis)
        weight = dequantize(_after(x if total is None else total, _chunk(w, start, size)), x.dtype)
        y = jnp.einsum(equation, part, weight, preferred_element_type=preferred_element_type)
        total = y if total is None else total + y
    return total


def take_rows(table: Any, ids: jax.Array) -> jax.Array:
    """`jnp.take(table, ids, axis=0)` for an embedding table, plain or quantized along its width (only the
    rows taken are dequantized, in float32)."""
    if not isinstance(table, QuantizedWeight):
        return jnp.take(table, ids, axis=0)
    return dequantize(jax.tree.map(lambda x: jnp.take(x, ids, axis=0), table))
