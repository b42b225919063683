"""The parameter pytree: the one place that defines every weight's shape and logical axes.

Layout (nested dicts and lists of arrays; kernels are stored input-first, `x @ kernel`):

    vision:     patch_embed{kernel (P*P*C, E), bias (E,)}, position_grid (G, G, E),
                layers{ln1, attn{q,k,v{kernel (E,N,H), bias (N,H)}, o{kernel (N,H,E), bias (E,)}}, ln2,
                       mlp{fc1, fc2}}  -- every leaf stacked on a leading `layers` axis for `lax.scan`,
                post_ln{scale, bias}
    projector:  [ln{scale, bias}], fc1{kernel (E*f*f, P), bias}, fc2{kernel (P, D), bias}
    text:       embed (V, D), final_norm{scale}, [lm_head (D, V) when untied],
                blocks: one list per `Segment` of the layer plan (see `config.plan_segments`), holding per
                motif position either one layer dict stacked on a leading `layers` axis of length
                `repeats` (`RuntimeConfig.scan_layers`: run by `lax.scan`) or a list of `repeats`
                unstacked layer dicts (run by a Python loop, no per-step weight slicing):
                  conv layer: operator_norm, conv{in_proj (D, 3, D), kernel (L, D), out_proj (D, D)
                              [+ biases]}, ffn_norm, mlp{gate (D, F), up (D, F), down (F, D)}
                  attention:  operator_norm, attn{q (D,N,H), k (D,K,H), v (D,K,H), o (N,H,D),
                              q_norm (H,), k_norm (H,)}, ffn_norm, mlp
                With `RuntimeConfig.fused_projections`: attn{qkv (D,K,G+2,H), ...} (per KV head its G = N/K
                query heads, then its key and its value) and mlp{gate_up (D,2,F), down}.

The layout is a static fact of the config (`config.runtime.scan_layers`), never read off a pytree.
Checkpoints store the canonical per-layer tree instead (`checkpoint.canonical`), which no layout choice
changes.

Logical axis names (mapped to mesh axes by `parallel.rules.DEFAULT_RULES`): layers, vocab, embed, heads,
kv_heads, head_dim, mlp, conv (short-conv channels), vision_embed, vision_mlp, vision_heads, patch,
projector_in, projector_hidden.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ATTENTION, CONV, ConfigError, Lfm2VlConfig, Quantization, TextConfig, VisionConfig
from ..errors import Lfm2VlError
from ..parallel.sharding import mesh_of
from .quant import QuantizedWeight, quantize_like

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # one logical axis name per dimension
    init: str = "normal"  # "normal" (std `std`), "ones" or "zeros"
    std: float = 0.0
    dtype: Any = None  # None: the params dtype (quantized values and their scales have their own)

    def stacked(self, n: int) -> ParamSpec:
        return dataclasses.replace(self, shape=(n, *self.shape), axes=("layers", *self.axes))


def _kernel(shape: tuple[int, ...], axes: tuple[str | None, ...], fan_in: int) -> ParamSpec:
    return ParamSpec(shape, axes, "normal", 1 / math.sqrt(fan_in))


def _norm(size: int, axis: str | None, bias: bool = False) -> dict[str, ParamSpec]:
    specs = {"scale": ParamSpec((size,), (axis,), "ones")}
    if bias:
        specs["bias"] = ParamSpec((size,), (axis,), "zeros")
    return specs


def _bias(shape: tuple[int, ...], axes: tuple[str | None, ...]) -> ParamSpec:
    return ParamSpec(shape, axes, "zeros")


def _linear(n_in: int, n_out: int, axes: tuple[str, str], bias: bool) -> dict[str, ParamSpec]:
    specs = {"kernel": _kernel((n_in, n_out), axes, n_in)}
    if bias:
        specs["bias"] = _bias((n_out,), axes[1:])
    return specs


def vision_layer_specs(v: VisionConfig) -> dict[str, Any]:
    e, n, h = v.hidden_size, v.num_heads, v.head_dim
    in_proj = {
        "kernel": _kernel((e, n, h), ("vision_embed", "vision_heads", "head_dim"), e),
        "bias": _bias((n, h), ("vision_heads", "head_dim")),
    }
    return {
        "ln1": _norm(e, "vision_embed", bias=True),
        "attn": {
            "q": in_proj,
            "k": in_proj,
            "v": in_proj,
            "o": {
                "kernel": _kernel((n, h, e), ("vision_heads", "head_dim", "vision_embed"), e),
                "bias": _bias((e,), ("vision_embed",)),
            },
        },
        "ln2": _norm(e, "vision_embed", bias=True),
        "mlp": {
            "fc1": _linear(e, v.intermediate_size, ("vision_embed", "vision_mlp"), bias=True),
            "fc2": _linear(v.intermediate_size, e, ("vision_mlp", "vision_embed"), bias=True),
        },
    }


def _mlp(t: TextConfig, fused: bool) -> dict[str, ParamSpec]:
    d, f = t.hidden_size, t.intermediate_size
    if fused:
        projections = {"gate_up": _kernel((d, 2, f), ("embed", None, "mlp"), d)}
    else:
        projections = {
            "gate": _kernel((d, f), ("embed", "mlp"), d),
            "up": _kernel((d, f), ("embed", "mlp"), d),
        }
    return {**projections, "down": _kernel((f, d), ("mlp", "embed"), f)}


def text_layer_specs(t: TextConfig, kind: str, fused: bool = False) -> dict[str, Any]:
    d = t.hidden_size
    if kind == CONV:
        operator: dict[str, ParamSpec] = {
            "in_proj": _kernel((d, 3, d), ("embed", None, "conv"), d),
            "kernel": _kernel((t.conv_kernel_size, d), (None, "conv"), t.conv_kernel_size),
            "out_proj": _kernel((d, d), ("conv", "embed"), d),
        }
        if t.conv_bias:
            operator |= {
                "in_proj_bias": _bias((3, d), (None, "conv")),
                "kernel_bias": _bias((d,), ("conv",)),
                "out_proj_bias": _bias((d,), ("embed",)),
            }
        operator_key = "conv"
    elif kind == ATTENTION:
        n, k, h = t.num_heads, t.num_kv_heads, t.head_dim
        if fused:
            projections = {"qkv": _kernel((d, k, n // k + 2, h), ("embed", "kv_heads", None, "head_dim"), d)}
        else:
            projections = {
                "q": _kernel((d, n, h), ("embed", "heads", "head_dim"), d),
                "k": _kernel((d, k, h), ("embed", "kv_heads", "head_dim"), d),
                "v": _kernel((d, k, h), ("embed", "kv_heads", "head_dim"), d),
            }
        operator = {
            **projections,
            "o": _kernel((n, h, d), ("heads", "head_dim", "embed"), n * h),
            "q_norm": ParamSpec((h,), ("head_dim",), "ones"),
            "k_norm": ParamSpec((h,), ("head_dim",), "ones"),
        }
        operator_key = "attn"
    else:
        raise ValueError(f"unknown layer kind {kind!r}")
    return {
        "operator_norm": _norm(d, "embed"),
        operator_key: operator,
        "ffn_norm": _norm(d, "embed"),
        "mlp": _mlp(t, fused),
    }


def _stack(tree: Any, n: int) -> Any:
    return jax.tree.map(lambda s: s.stacked(n), tree, is_leaf=lambda x: isinstance(x, ParamSpec))


def param_specs(config: Lfm2VlConfig) -> Params:
    """The whole model's parameter pytree, as `ParamSpec` leaves, in the layout of
    `config.runtime.scan_layers`."""
    v, t = config.vision, config.text
    scan_layers, fused = config.runtime.scan_layers, config.runtime.fused_projections
    patch_dim = v.num_channels * v.patch_size**2
    grid = v.position_grid_size
    projector: dict[str, Any] = {}
    if config.projector_use_layernorm:
        projector["ln"] = _norm(config.projector_in_size, "projector_in", bias=True)
    projector["fc1"] = _linear(
        config.projector_in_size,
        config.projector_hidden_size,
        ("projector_in", "projector_hidden"),
        config.projector_bias,
    )
    projector["fc2"] = _linear(
        config.projector_hidden_size, t.hidden_size, ("projector_hidden", "embed"), config.projector_bias
    )
    text: dict[str, Any] = {
        "embed": ParamSpec((t.vocab_size, t.hidden_size), ("vocab", "embed"), "normal", 1.0),
        "blocks": [
            [
                _stack(text_layer_specs(t, kind, fused), seg.repeats)
                if scan_layers
                else [text_layer_specs(t, kind, fused) for _ in range(seg.repeats)]
                for kind in seg.motif
            ]
            for seg in t.segments
        ],
        "final_norm": _norm(t.hidden_size, "embed"),
    }
    if not t.tie_word_embeddings:
        text["lm_head"] = _kernel((t.hidden_size, t.vocab_size), ("embed", "vocab"), t.hidden_size)
    specs = {
        "vision": {
            "patch_embed": _linear(patch_dim, v.hidden_size, ("patch", "vision_embed"), bias=True),
            "position_grid": ParamSpec(
                (grid, grid, v.hidden_size), (None, None, "vision_embed"), "normal", 1.0
            ),
            "layers": _stack(vision_layer_specs(v), v.num_layers),
            "post_ln": _norm(v.hidden_size, "vision_embed", bias=True),
        },
        "projector": projector,
        "text": text,
    }
    quantization = config.runtime.quantization
    return specs if quantization is None else quantized_specs(specs, quantization)


# Weights that `nn.layers.project` multiplies by (named by their key, or their parent's for a "kernel"
# leaf), with how many input axes they have; and the embedding tables.
_PROJECTION_INPUTS = {
    **dict.fromkeys(("q", "k", "v", "qkv", "in_proj", "out_proj", "gate", "up", "down", "gate_up"), 1),
    **dict.fromkeys(("fc1", "fc2", "patch_embed"), 1),
    "o": 2,
}


def _contracted_axes(path: tuple, spec: ParamSpec, quantization: Quantization) -> tuple[int, int] | None:
    """(first, count): the axes of the leaf at `path` that a quantized copy contracts, or None to keep it."""
    keys = [getattr(k, "key", None) for k in path]
    name = keys[-2] if keys[-1] == "kernel" and len(keys) > 1 else keys[-1]
    lead = sum(axis == "layers" for axis in spec.axes)
    if keys[-1] == "embed" and keys[0] == "text":
        return (1, 1) if quantization.embeddings else None  # the tied head contracts the width
    if keys[-1] == "lm_head":
        return (0, 1) if quantization.embeddings else None
    if name in _PROJECTION_INPUTS:
        return lead, _PROJECTION_INPUTS[name]
    return None


def _path_name(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def quantized_specs(specs: Params, quantization: Quantization) -> Params:
    """The spec tree with each projection (and, by option, the embedding) replaced by a `QuantizedWeight`
    of specs: int8/uint8 values and float32 scales, with the input axes merged into one that takes the
    first input axis's logical name (heads-major for (N, H): the same shards as the heads)."""

    def convert(path: tuple, spec: ParamSpec) -> Any:
        axes = _contracted_axes(path, spec, quantization)
        if axes is None:
            return spec
        first, count = axes
        width = math.prod(spec.shape[first : first + count])
        group = quantization.group_for(width)
        if group is None:
            given = quantization.group_size
            raise ConfigError(
                f"int4 group size {given} does not divide the input width {width} of weight "
                f"{_path_name(path)} {spec.shape}: choose a group size that divides it"
                if given
                else f"int4 cannot quantize weight {_path_name(path)} {spec.shape}: its input width {width} "
                "is odd (two values per byte); use int8"
            )
        outer, inner = spec.shape[:first], spec.shape[first + count :]
        outer_axes, inner_axes = spec.axes[:first], spec.axes[first + count :]
        per_byte = 8 // quantization.bits
        values = ParamSpec(
            (*outer, width // per_byte, *inner),
            (*outer_axes, spec.axes[first], *inner_axes),
            "zeros",
            dtype=np.int8 if quantization.bits == 8 else np.uint8,
        )
        grouped_axis = spec.axes[first] if width > group else None
        scales_axes = (*outer_axes, grouped_axis, *inner_axes)
        scales = ParamSpec((*outer, width // group, *inner), scales_axes, "ones", dtype=np.float32)
        return QuantizedWeight(values, scales, quantization.bits, group, first - len(spec.shape) + count - 1)

    return jax.tree_util.tree_map_with_path(convert, specs, is_leaf=is_spec)


def quantize_params(params: Params, config: Lfm2VlConfig) -> Params:
    """Float params (in `config`'s layout, without quantization) quantized as `config.runtime.quantization`
    says, leaf by leaf on the host. Refuses params that already hold quantized weights."""
    if any(isinstance(x, QuantizedWeight) for x in jax.tree.leaves(params, is_leaf=_is_quantized)):
        raise Lfm2VlError("these params are already quantized: quantize a float model (load it again)")
    specs = param_specs(config)
    return jax.tree.map(
        lambda spec, leaf: quantize_like(np.asarray(leaf), spec) if _is_quantized(spec) else leaf,
        specs,
        params,
        is_leaf=lambda x: is_spec(x) or _is_quantized(x),
    )


def _is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedWeight)


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def abstract_params(config: Lfm2VlConfig, dtype: Any = None) -> Params:
    """`jax.ShapeDtypeStruct` leaves (dtype: default the policy's params dtype): what `jax.eval_shape`
    sees, without allocating anything."""
    dtype = config.runtime.dtypes.params if dtype is None else dtype
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype or dtype), param_specs(config), is_leaf=is_spec
    )


def init_params(config: Lfm2VlConfig, key: jax.Array, dtype: Any = None) -> Params:
    """Random weights of realistic scale (kernels ~ N(0, 1/fan_in)), for tests and benchmarks."""
    dtype = config.runtime.dtypes.params if dtype is None else dtype
    return init_from_specs(param_specs(config), key, dtype)


def init_from_specs(spec_tree: Any, key: jax.Array, dtype: Any) -> Any:
    """Arrays for a tree of `ParamSpec`s (the whole model's or any subtree), each drawn as its spec says."""
    specs, treedef = jax.tree.flatten(spec_tree, is_leaf=is_spec)
    keys = jax.random.split(key, len(specs))

    def init(spec: ParamSpec, k: jax.Array) -> jax.Array:
        leaf_dtype = spec.dtype or dtype
        if spec.init == "ones":
            return jnp.ones(spec.shape, leaf_dtype)
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, leaf_dtype)
        return (spec.std * jax.random.normal(k, spec.shape, jnp.float32)).astype(leaf_dtype)

    return jax.tree.unflatten(treedef, [init(s, k) for s, k in zip(specs, keys, strict=True)])


def tree_bytes(params: Params) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


def param_shardings(config: Lfm2VlConfig) -> Any:
    """A `NamedSharding` per param leaf, in the layout `config.runtime.scan_layers` selects."""
    mesh, rules = mesh_of(config), config.runtime.rules
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
