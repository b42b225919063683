"""The canonical layout of a params-shaped tree: what checkpoints store, independent of how this process
runs the model.

In memory, the text layers live in `blocks[segment][motif position]`, stacked over a segment's repeats or
as a list of them (`nn.params`): both depend on `config.plan_segments` and `RuntimeConfig.scan_layers`,
which may change between the save and the load. The canonical tree replaces `text.blocks` by
`text.layers`, a list of per-layer dicts in the checkpoint's layer order (layer i is transformers'
`model.language_model.layers.i`); everything else is as in memory (the vision layers are always stacked).
Fused projections (`RuntimeConfig.fused_projections`) are split back into q, k, v and gate, up there.

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


def _apply(fn: Any, *xs: Any) -> Any:
    """`fn(xp, *xs)`, written with `xp` (numpy or jax.numpy), on numpy arrays (numpy), jax arrays (jax) or
    `jax.ShapeDtypeStruct`s (the shape it would have)."""
    if isinstance(xs[0], jax.ShapeDtypeStruct):
        return jax.eval_shape(lambda *a: fn(jnp, *a), *xs)
    return fn(np if isinstance(xs[0], np.ndarray) else jnp, *xs)


def _fuse_qkv(xp: Any, q: Any, k: Any, v: Any) -> Any:
    """q (D, N, H), k and v (D, K, H) -> (D, K, G+2, H): per KV head its G query heads (head n = kv head
    n // G, as in GQA), its key, its value."""
    d, kv_heads, h = k.shape
    return xp.concatenate([q.reshape(d, kv_heads, -1, h), k[:, :, None], v[:, :, None]], axis=2)


def _fuse(layer: dict[str, Any]) -> dict[str, Any]:
    """A canonical layer -> the fused layout of `nn.params` (qkv, gate_up)."""
    layer = dict(layer)
    if "attn" in layer:
        attn = dict(layer["attn"])
        attn["qkv"] = _apply(_fuse_qkv, attn.pop("q"), attn.pop("k"), attn.pop("v"))
        layer["attn"] = attn
    mlp = dict(layer["mlp"])
    mlp["gate_up"] = _apply(lambda xp, gate, up: xp.stack([gate, up], axis=1), mlp.pop("gate"), mlp.pop("up"))
    return {**layer, "mlp": mlp}


def _split(layer: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `_fuse`."""
    layer = dict(layer)
    if "attn" in layer:
        attn = dict(layer["attn"])
        qkv = attn.pop("qkv")
        attn["q"] = _apply(lambda xp, a: a[:, :, :-2].reshape(a.shape[0], -1, a.shape[-1]), qkv)
        attn["k"] = _apply(lambda xp, a: a[:, :, -2], qkv)
        attn["v"] = _apply(lambda xp, a: a[:, :, -1], qkv)
        layer["attn"] = attn
    mlp = dict(layer["mlp"])
    gate_up = mlp.pop("gate_up")
    mlp["gate"], mlp["up"] = _apply(lambda xp, a: a[:, 0], gate_up), _apply(lambda xp, a: a[:, 1], gate_up)
    return {**layer, "mlp": mlp}


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
                layers[segment.layer_index(r, pos)] = (
                    _split(layer) if config.runtime.fused_projections else layer
                )
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
            if config.runtime.fused_projections:
                repeats = [_fuse(layer) for layer in repeats]
            if config.runtime.scan_layers:
                positions.append(jax.tree.map(lambda *xs: _stack(list(xs)), *repeats, is_leaf=_is_leaf))
            else:
                positions.append(repeats)
        blocks.append(positions)
    return {**tree, "text": {**text, "blocks": blocks}}
