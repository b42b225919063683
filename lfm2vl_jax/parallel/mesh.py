"""Device meshes with the project's three axes (`data`, `fsdp`, `tensor`; see `rules.py`)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from ..errors import Lfm2VlError
from .rules import MESH_AXES


class MeshError(Lfm2VlError):
    """A mesh that the devices at hand cannot make, or a mesh description that cannot be read."""


def make_mesh(data: int = 1, tensor: int = 1, fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A `data x fsdp x tensor` mesh over the first data*fsdp*tensor devices (all processes' devices on a
    multi-host run). Axes are Auto: XLA propagates shardings from those of the params and inputs."""
    devices = jax.devices() if devices is None else devices
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise MeshError(f"mesh axis {name} must be a positive integer, got {size!r}")
    needed = data * fsdp * tensor
    if needed > len(devices):
        raise MeshError(
            f"a mesh data={data}, fsdp={fsdp}, tensor={tensor} needs {needed} devices, "
            f"{len(devices)} available"
        )
    grid = np.array(devices[:needed]).reshape(data, fsdp, tensor)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=2,tensor=2' -> {'data': 2, 'fsdp': 2, 'tensor': 2} (axes left out are 1)."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES:
            raise MeshError(f"mesh {text!r}: unknown axis {name!r} (axes: {', '.join(MESH_AXES)})")
        if name in sizes:
            raise MeshError(f"mesh {text!r}: axis {name!r} given twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise MeshError(f"mesh {text!r}: axis {name!r} needs an integer size, got {value!r}") from None
        if sizes[name] < 1:
            raise MeshError(f"mesh {text!r}: axis {name!r} must be >= 1")
    return sizes
