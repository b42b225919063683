"""Shardings of the model's arrays under `RuntimeConfig.mesh` and `.rules`: params (from `param_specs`),
the decoding cache (from `cache_layout`), batches, and constraints on activations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding

from ..config import ConfigError, Lfm2VlConfig, RuntimeConfig


def _mesh(config: Lfm2VlConfig) -> Any:
    if config.runtime.mesh is None:
        raise ValueError("shardings need a mesh: set config.runtime.mesh")
    return config.runtime.mesh


def param_shardings(config: Lfm2VlConfig) -> Any:
    """A `NamedSharding` per param leaf, in the layout `config.runtime.scan_layers` selects."""
    from ..nn.params import is_spec, param_specs

    mesh, rules = _mesh(config), config.runtime.rules
    if config.runtime.fused_projections:
        _check_fused_split(config)
    return jax.tree.map(
        lambda s: rules.sharding(mesh, s.shape, s.axes, "param"), param_specs(config), is_leaf=is_spec
    )


def _check_fused_split(config: Lfm2VlConfig) -> None:
    """The fused q/k/v kernel is split by KV head (each shard: its KV heads' queries, keys and values); where
    the KV heads do not divide the mesh axes, it would stay whole on every device, queries included."""
    mesh, rules, kv_heads = config.runtime.mesh, config.runtime.rules, config.text.num_kv_heads
    axes = tuple(a for a in rules.mesh_axes("kv_heads") if mesh.shape.get(a, 1) > 1)
    ways = 1
    for axis in axes:
        ways *= mesh.shape[axis]
    if kv_heads % ways:
        raise ConfigError(
            f"fused_projections: the fused q/k/v kernel is split by KV head over mesh axis {axes} "
            f"({ways}-way), which its {kv_heads} KV heads do not divide; use fused_projections=False here"
        )


def cache_shardings(config: Lfm2VlConfig, batch: int, capacity: int) -> Any:
    from ..inference.cache import cache_layout, is_layout

    mesh, rules = _mesh(config), config.runtime.rules
    return jax.tree.map(
        lambda x: rules.sharding(mesh, x[0], x[1], "cache"),
        cache_layout(config, batch, capacity),
        is_leaf=is_layout,
    )


def batch_sharding(config: Lfm2VlConfig, shape: Sequence[int]) -> NamedSharding:
    """Leading axis over the batch mesh axes (when divisible), the rest replicated."""
    axes = ("batch",) + (None,) * (len(shape) - 1)
    return config.runtime.rules.sharding(_mesh(config), shape, axes, "batch input")


def constrain(x: jax.Array, axes: Sequence[str | None], runtime: RuntimeConfig) -> jax.Array:
    """A sharding constraint on an activation by logical axes (a no-op without a mesh)."""
    if runtime.mesh is None:
        return x
    return jax.lax.with_sharding_constraint(
        x, runtime.rules.sharding(runtime.mesh, x.shape, axes, "activation")
    )
