"""Logical-axis sharding rules: one table maps every logical axis name (of params, cache, activations and
batches) to mesh axes. It is a value (`ShardingRules`), passed where needed through `RuntimeConfig.rules`.

Mesh axes (see `mesh.make_mesh`):
    data    batch rows (pure data parallelism: params replicated)
    fsdp    batch rows too, and the `embed`-like axis of every weight (ZeRO-3 / FSDP: each device holds a
            slice of every weight and of its optimizer state, gathered for use)
    tensor  attention heads, MLP and conv channels, vocabulary (Megatron-style column/row splits: one
            all-reduce per block)

A mesh axis of size 1, or one the mesh lacks, is a no-op, so the same table serves a one-device run,
inference over `data` x `tensor` and training over `data` x `fsdp` x `tensor`. A dimension that does not
divide its mesh axis stays replicated, with a warning (e.g. 8 KV heads on a 16-way tensor axis).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

MeshAxes = tuple[str, ...]


class ShardingRuleError(ValueError):
    """The rules map two axes of one array onto the same mesh axis (a bug in the rules, not an input)."""


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> the mesh axes it is split over (in order); unnamed axes are replicated."""

    rules: tuple[tuple[str, MeshAxes], ...]

    def mesh_axes(self, logical: str | None) -> MeshAxes:
        if logical is None:
            return ()
        return dict(self.rules).get(logical, ())

    def partition_spec(
        self, shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh, name: str = "array"
    ) -> PartitionSpec:
        """The partition of an array with these logical `axes` over `mesh`.

        Raises if two of its axes map to one mesh axis; warns (once per case) and replicates a dimension
        that its mesh axes do not divide.
        """
        if len(shape) != len(axes):
            raise ShardingRuleError(f"{name}: {len(axes)} logical axes for a {len(shape)}-d shape {shape}")
        parts: list[str | tuple[str, ...] | None] = []
        used: dict[str, str] = {}
        for size, logical in zip(shape, axes, strict=True):
            mesh_axes = tuple(a for a in self.mesh_axes(logical) if mesh.shape.get(a, 1) > 1)
            for axis in mesh_axes:
                if axis in used:
                    raise ShardingRuleError(
                        f"{name}: logical axes {used[axis]!r} and {logical!r} both map to mesh axis {axis!r}"
                    )
                used[axis] = logical
            ways = 1
            for axis in mesh_axes:
                ways *= mesh.shape[axis]
            if mesh_axes and size % ways:
                _warn_replicated(name, logical, size, mesh_axes, ways)
                mesh_axes = ()
            parts.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        return PartitionSpec(*parts)

    def sharding(
        self, mesh: Mesh, shape: Sequence[int], axes: Sequence[str | None], name: str = "array"
    ) -> NamedSharding:
        return NamedSharding(mesh, self.partition_spec(shape, axes, mesh, name))


_WARNED: set[tuple] = set()


def _warn_replicated(name: str, logical: str | None, size: int, mesh_axes: MeshAxes, ways: int) -> None:
    key = (logical, size, mesh_axes)
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        f"{name}: axis {logical!r} of size {size} does not divide mesh axes {mesh_axes} ({ways}-way); "
        "it stays replicated",
        stacklevel=3,
    )


# The project's one table. Weights: `embed`-like axes over fsdp, head/channel/vocab axes over tensor.
# Activations have their own names (prefix `act_`) so that e.g. the batch of an activation (over data and
# fsdp) never collides with a weight-only rule.
DEFAULT_RULES = ShardingRules(
    (
        ("batch", (DATA, FSDP)),
        ("act_batch", (DATA, FSDP)),
        ("vocab", (TENSOR,)),
        ("heads", (TENSOR,)),
        ("kv_heads", (TENSOR,)),
        ("mlp", (TENSOR,)),
        ("conv", (TENSOR,)),
        ("vision_heads", (TENSOR,)),
        ("vision_mlp", (TENSOR,)),
        ("projector_hidden", (TENSOR,)),
        ("embed", (FSDP,)),
        ("vision_embed", (FSDP,)),
        ("projector_in", (FSDP,)),
        # replicated: layers, head_dim, cache_seq, patch, act_length, act_embed
    )
)
