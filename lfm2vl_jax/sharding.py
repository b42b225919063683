"""Sharding: one table of logical-axis rules maps every param and cache axis to a mesh axis.

The mesh has a `data` axis (batch rows) and a `tensor` axis (attention heads, MLP and conv channels,
vocabulary: Megatron-style column/row splits, so each layer needs one all-reduce). The rules are written
against logical axes so that training can reuse them; a mesh axis of size 1 is a no-op. A dimension not
divisible by its mesh axis stays replicated, so any mesh works with any checkpoint.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from .cache import cache_layout, is_layout
from .config import Lfm2VlConfig
from .errors import Lfm2VlError
from .params import is_spec, param_specs

DATA, TENSOR = "data", "tensor"

LOGICAL_RULES: dict[str, str | None] = {
    "batch": DATA,
    "vocab": TENSOR,
    "heads": TENSOR,
    "kv_heads": TENSOR,
    "mlp": TENSOR,
    "conv": TENSOR,
    "vision_heads": TENSOR,
    "vision_mlp": TENSOR,
    "projector_hidden": TENSOR,
    # replicated: layers, embed, head_dim, cache_seq, vision_embed, patch, projector_in
}


def make_mesh(data: int = 1, tensor: int = 1, devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    if data * tensor > len(devices):
        raise Lfm2VlError(f"a {data}x{tensor} mesh needs {data * tensor} devices, {len(devices)} available")
    grid = np.array(devices[: data * tensor]).reshape(data, tensor)
    # Auto axes: XLA propagates shardings through the model from those of the params and inputs.
    return Mesh(grid, (DATA, TENSOR), axis_types=(AxisType.Auto, AxisType.Auto))


def partition_spec(shape: tuple[int, ...], axes: tuple[str | None, ...], mesh: Mesh) -> PartitionSpec:
    parts = []
    for size, axis in zip(shape, axes, strict=True):
        mesh_axis = LOGICAL_RULES.get(axis) if axis else None
        ok = mesh_axis in mesh.shape and size % mesh.shape[mesh_axis] == 0
        parts.append(mesh_axis if ok else None)
    return PartitionSpec(*parts)


def param_shardings(config: Lfm2VlConfig, mesh: Mesh, scan_layers: bool = True) -> Any:
    return jax.tree.map(
        lambda s: NamedSharding(mesh, partition_spec(s.shape, s.axes, mesh)),
        param_specs(config, scan_layers),
        is_leaf=is_spec,
    )


def cache_shardings(
    config: Lfm2VlConfig, batch: int, max_len: int, mesh: Mesh, scan_layers: bool = True
) -> list:
    return jax.tree.map(
        lambda x: NamedSharding(mesh, partition_spec(*x, mesh)),
        cache_layout(config.text, batch, max_len, scan_layers),
        is_leaf=is_layout,
    )


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Leading axis over `data` (when divisible), the rest replicated."""
    return NamedSharding(mesh, partition_spec(shape, ("batch",) + (None,) * (len(shape) - 1), mesh))
