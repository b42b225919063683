"""Shardings of the model's arrays under `RuntimeConfig.mesh` and `.rules`: params (from `param_specs`),
the decoding cache (from `cache_layout`), batches, and constraints on activations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding

from ..config import Lfm2VlConfig, RuntimeConfig


def _mesh(config: Lfm2VlConfig) -> Any:
    if config.runtime.mesh is None:
        raise ValueError("shardings need a mesh: set config.runtime.mesh")
    return config.runtime.mesh


def param_shardings(config: Lfm2VlConfig) -> Any:
    """A `NamedSharding` per param leaf, in the layout `config.runtime.scan_layers` selects."""
    from ..nn.params import is_spec, param_specs

    mesh, rules = _mesh(config), config.runtime.rules
    return jax.tree.map(
        lambda s: rules.sharding(mesh, s.shape, s.axes, "param"), param_specs(config), is_leaf=is_spec
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
