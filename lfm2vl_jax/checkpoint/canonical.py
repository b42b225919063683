"""The canonical layout of a params-shaped tree: what checkpoints store, independent of how this process
runs the model.

In memory, the text layers live in `blocks[segment][motif position]`, stacked over a segment's repeats or
as a list of them (`nn.params`): both depend on `config.plan_segments` and `RuntimeConfig.scan_layers`,
which may change between the save and the load. The canonical tree replaces `text.blocks` by
`text.layers`, a list of per-layer dicts in the checkpoint's layer order (layer i is transformers'
`model.language_model.layers.i`); everything else is as in memory (the vision layers are always stacked).

The functions take any tree shaped like the params (params, gradients, optimizer moments, shardings of
`jax.ShapeDtypeStruct`s), so optimizer states convert as their params do.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config import Lfm2VlConfig


def _take(x: Any, index: int) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    return x[index]


def _stack(xs: list[Any]) -> Any:
    first = xs[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(xs), *first.shape), first.dtype)
    if isinstance(first, np.ndarray):
        return np.stack(xs)
    return jnp.stack(xs)


def _is_leaf(x: Any) -> bool:
    return x is None


def to_canonical(tree: dict[str, Any], config: Lfm2VlConfig) -> dict[str, Any]:
    """A params-shaped tree in `config.runtime`'s layout -> the canonical layout."""
    text = dict(tree["text"])
    blocks = text.pop("blocks")
    layers: list[Any] = [None] * config.text.num_layers
    for s, segment in enumerate(config.text.segments):
        for pos in range(len(segment.motif)):
            for r in range(segment.repeats):
                node = blocks[s][pos]
                if config.runtime.scan_layers:
                    layer = jax.tree.map(lambda x, r=r: _take(x, r), node, is_leaf=_is_leaf)
                else:
                    layer = node[r]
                layers[segment.layer_index(r, pos)] = layer
    return {**tree, "text": {**text, "layers": layers}}


def from_canonical(tree: dict[str, Any], config: Lfm2VlConfig) -> dict[str, Any]:
    """The canonical layout -> a params-shaped tree in `config.runtime`'s layout."""
    text = dict(tree["text"])
    layers = text.pop("layers")
    if len(layers) != config.text.num_layers:
        raise ValueError(f"canonical tree has {len(layers)} text layers, the config {config.text.num_layers}")
    blocks = []
    for segment in config.text.segments:
        positions = []
        for pos in range(len(segment.motif)):
            repeats = [layers[segment.layer_index(r, pos)] for r in range(segment.repeats)]
            if config.runtime.scan_layers:
                positions.append(jax.tree.map(lambda *xs: _stack(list(xs)), *repeats, is_leaf=_is_leaf))
            else:
                positions.append(repeats)
        blocks.append(positions)
    return {**tree, "text": {**text, "blocks": blocks}}
