"""LoRA: low-rank adapters on the model's projection weights, as peft builds them, applied unmerged.

For an adapted weight W (input-first, `x @ W`) the model computes, at every projection (`nn.layers.project`
on a `LoraWeight`),

    y = x @ W + (alpha / rank) * (dropout(x) @ A) @ B        A: (inputs, rank), B: (rank, outputs)

as peft does: W is never merged while training, so the backward pass takes rank-r products only (no
full-size weight gradient, no merged copy), and under bfloat16 compute a small update is not rounded away
into W's bfloat16 copy. `merge` forms W + (alpha / rank) * A @ B for export only.
peft's conventions, in our input-first layout (peft's `lora_A.weight` is A transposed, `lora_B.weight`
B transposed): A ~ Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(inputs), 1/sqrt(inputs)); B = 0, so
fresh adapters leave the model unchanged; scaling alpha / rank (peft's default alpha is 8); LoRA dropout
on the adapter's input only (zero with probability p, the rest scaled by 1 / (1 - p)), each adapted weight
of each layer drawing its own mask from the step's key (`attach`).

Targets (`LoraConfig.targets`), in every component that trains (vision tower and/or text tower):
    attn: attention q, k, v, o projections (peft: q_proj, k_proj, v_proj, out_proj)
    mlp:  MLP projections (text: w1/w3/w2 = gate/up/down; vision: fc1, fc2)
    conv: short-conv in_proj and out_proj

Adapters are a flat dict keyed by the adapted weight's path ("text/blocks/0/2/attn/q"), each
{"a": A, "b": B}, stacked over the layers axis where the weight is. Multi-axis weights keep their axes:
q (D, N, H) gets A (D, r) and B (r, N, H); o (N, H, D) gets A (N, H, r) and B (r, D).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from ..config import Lfm2VlConfig
from ..errors import Lfm2VlError
from ..nn.layers import LoraWeight
from ..nn.params import Params, is_spec, param_specs
from ..nn.quant import QuantizedWeight, dequantize
from ..parallel.rules import ShardingRules

TARGET_GROUPS = ("attn", "mlp", "conv")

# (parent key, weight key) -> (target group, number of input dims); vision weights sit one level deeper,
# under "kernel".
_ADAPTABLE = {
    ("attn", "q"): ("attn", 1),
    ("attn", "k"): ("attn", 1),
    ("attn", "v"): ("attn", 1),
    ("attn", "o"): ("attn", 2),
    ("mlp", "gate"): ("mlp", 1),
    ("mlp", "up"): ("mlp", 1),
    ("mlp", "down"): ("mlp", 1),
    ("mlp", "fc1"): ("mlp", 1),
    ("mlp", "fc2"): ("mlp", 1),
    ("conv", "in_proj"): ("conv", 1),
    ("conv", "out_proj"): ("conv", 1),
}


class LoraError(Lfm2VlError):
    pass


def check_dropout(rate: object) -> str | None:
    """What is wrong with a LoRA dropout rate (a number in [0, 1)), or None."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        return f"--lora-dropout must be a number in [0, 1) (the chance of zeroing an input), got {rate!r}"
    return None


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float = 8.0
    targets: tuple[str, ...] = TARGET_GROUPS
    dropout: float = 0.0  # peft's lora_dropout: on the adapter's input, while training

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LoraError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if check_dropout(self.dropout) is not None:
            raise LoraError(check_dropout(self.dropout))
        unknown = sorted(set(self.targets) - set(TARGET_GROUPS))
        if unknown or not self.targets:
            raise LoraError(f"LoRA targets {unknown or '(none)'}: choose from {', '.join(TARGET_GROUPS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class AdaptedWeight:
    path: tuple[str | int, ...]  # of the base weight in the params tree
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    stacked: int  # leading `layers` dims
    inputs: int  # input dims after the stacked ones

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.shape[self.stacked : self.stacked + self.inputs]

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.shape[self.stacked + self.inputs :]


def _keys(path: tuple) -> tuple[str | int, ...]:
    return tuple(k.key if isinstance(k, jax.tree_util.DictKey) else k.idx for k in path)


def path_name(keys: tuple[str | int, ...]) -> str:
    return "/".join(map(str, keys))


def adapted_weights(config: Lfm2VlConfig, lora: LoraConfig, components: tuple[str, ...]) -> dict:
    """name -> `AdaptedWeight` for every targeted weight of the params components (top-level keys, e.g.
    ("vision", "text")), in `config`'s layout."""
    if config.runtime.fused_projections:
        raise LoraError(
            "LoRA adapts q, k, v and gate, up separately, as peft does; the fused projections "
            "(RuntimeConfig.fused_projections) hold them as one kernel: train with fused_projections=False"
        )
    found = {}
    # The float weights' shapes: a quantized base (QLoRA) is adapted as the weight it stands for.
    float_specs = param_specs(config.with_runtime(quantization=None))
    flat, _ = jax.tree_util.tree_flatten_with_path(float_specs, is_leaf=is_spec)
    for path, spec in flat:
        keys = _keys(path)
        if keys[0] not in components:
            continue
        tail = keys[-3:-1] if keys[-1] == "kernel" else keys[-2:]
        group, inputs = _ADAPTABLE.get(tuple(tail), (None, 0))
        if group not in lora.targets:
            continue
        stacked = len(spec.axes) - len(tuple(a for a in spec.axes if a != "layers"))
        found[path_name(keys)] = AdaptedWeight(keys, spec.shape, spec.axes, stacked, inputs)
    if not found:
        raise LoraError(
            f"--lora-targets {','.join(lora.targets)}: no such weights in the components that train "
            f"({', '.join(components) or 'none'}); every adaptable weight is frozen (--freeze)"
        )
    # A @ B has rank at most min(inputs, outputs): a larger rank only allocates more (checked before any is).
    name, narrowest = min(
        found.items(), key=lambda item: min(np.prod(item[1].input_shape), np.prod(item[1].output_shape))
    )
    width = int(min(np.prod(narrowest.input_shape), np.prod(narrowest.output_shape)))
    if lora.rank > width:
        raise LoraError(
            f"LoRA rank {lora.rank} is larger than the adapted weight {name}'s width {width} "
            f"({narrowest.input_shape} -> {narrowest.output_shape}); use --lora-rank {width} or less"
        )
    return found


def init_adapters(weights: dict, lora: LoraConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """peft's initialisation: A ~ U(-1/sqrt(inputs), 1/sqrt(inputs)), B = 0."""
    adapters = {}
    for i, (name, w) in enumerate(sorted(weights.items())):
        stack = w.shape[: w.stacked]
        bound = 1 / np.sqrt(np.prod(w.input_shape))
        a = jax.random.uniform(
            jax.random.fold_in(key, i), (*stack, *w.input_shape, lora.rank), jnp.float32, -bound, bound
        )
        adapters[name] = {
            "a": a.astype(dtype),
            "b": jnp.zeros((*stack, lora.rank, *w.output_shape), dtype),
        }
    return adapters


def adapter_axes(w: AdaptedWeight) -> dict[str, tuple[str | None, ...]]:
    """Logical axes of A and B: the base weight's, with the rank axis unsharded."""
    stack = w.axes[: w.stacked]
    inputs = w.axes[w.stacked : w.stacked + w.inputs]
    outputs = w.axes[w.stacked + w.inputs :]
    return {"a": (*stack, *inputs, None), "b": (*stack, None, *outputs)}


def adapter_shardings(weights: dict, lora: LoraConfig, mesh: Mesh, rules: ShardingRules) -> dict:
    shardings: dict[str, dict[str, NamedSharding]] = {}
    for name, w in weights.items():
        axes = adapter_axes(w)
        shapes = {
            "a": (*w.shape[: w.stacked], *w.input_shape, lora.rank),
            "b": (*w.shape[: w.stacked], lora.rank, *w.output_shape),
        }
        shardings[name] = {k: rules.sharding(mesh, shapes[k], axes[k], f"LoRA {name}") for k in axes}
    return shardings


def delta(w: AdaptedWeight, adapter: dict[str, jax.Array], scaling: float) -> jax.Array:
    """(alpha / rank) * A @ B in the base weight's shape, in float32 at full precision."""
    stack = w.shape[: w.stacked]
    a = adapter["a"].astype(jnp.float32).reshape(*stack, int(np.prod(w.input_shape)), -1)
    b = adapter["b"].astype(jnp.float32).reshape(*stack, a.shape[-1], int(np.prod(w.output_shape)))
    return scaling * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST).reshape(w.shape)


def attach(
    params: Params, adapters: Params, weights: dict, lora: LoraConfig, key: jax.Array | None = None
) -> Params:
    """The params with every adapted weight W replaced by `LoraWeight(W, A, B)`, which the model's
    projections apply unmerged. key: the raw PRNG key (uint32 (2,)) of this forward pass's dropout masks
    (each weight, and each layer of a stacked one, gets a key folded from it), or None for no dropout."""
    dropout = key is not None and lora.dropout > 0
    index = {name: i for i, name in enumerate(sorted(adapters))}

    def leaf(path: tuple, x: jax.Array) -> Any:
        name = path_name(_keys(path))
        if name not in adapters:
            return x
        keys = None
        if dropout:
            stack = weights[name].shape[: weights[name].stacked]
            keys = jax.random.split(jax.random.fold_in(key, index[name]), max(1, int(np.prod(stack))))
            keys = keys.reshape(*stack, 2)
        a, b = adapters[name]["a"], adapters[name]["b"]
        return LoraWeight(x, a, b, keys, scale=lora.scaling, dropout=lora.dropout if dropout else 0.0)

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=_is_quantized)


def _is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedWeight)


def merge(params: Params, adapters: Params, weights: dict, lora: LoraConfig) -> Params:
    """The params with every adapted weight replaced by W + (alpha / rank) * A @ B (in W's dtype; a
    quantized W dequantized, in float32): for export (training never merges)."""

    def leaf(path: tuple, x: Any) -> Any:
        name = path_name(_keys(path))
        if name not in adapters:
            return x
        w = weights[name]
        base = dequantize(x).reshape(w.shape) if _is_quantized(x) else x.astype(jnp.float32)
        return (base + delta(w, adapters[name], lora.scaling)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=_is_quantized)
