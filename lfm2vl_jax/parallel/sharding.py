"""Shardings of batches and constraints on activations under `RuntimeConfig.mesh` and `.rules`. The
shardings of params and of the decoding cache live beside their layouts (`nn.params.param_shardings`,
`inference.cache.cache_shardings`): this folder sits below the model (docs/design.md, "Layers")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
from jax.sharding import NamedSharding

if TYPE_CHECKING:
    from ..config import Lfm2VlConfig, RuntimeConfig


def mesh_of(config: Lfm2VlConfig) -> Any:
    if config.runtime.mesh is None:
        raise ValueError("shardings need a mesh: set config.runtime.mesh")
    return config.runtime.mesh


def batch_sharding(config: Lfm2VlConfig, shape: Sequence[int]) -> NamedSharding:
    """Leading axis over the batch mesh axes (when divisible), the rest replicated."""
    axes = ("batch",) + (None,) * (len(shape) - 1)
    return config.runtime.rules.sharding(mesh_of(config), shape, axes, "batch input")


def constrain(x: jax.Array, axes: Sequence[str | None], runtime: RuntimeConfig) -> jax.Array:
    """A sharding constraint on an activation by logical axes (a no-op without a mesh)."""
    if runtime.mesh is None:
        return x
    return jax.lax.with_sharding_constraint(
        x, runtime.rules.sharding(runtime.mesh, x.shape, axes, "activation")
    )
