"""Frozen model configuration, parsed from a checkpoint's `config.json` in every layout seen in the wild.

Two layouts exist:
- transformers 5.x (`model_type` "lfm2_vl"): `image_token_id`, `text_config.layer_types`,
  `text_config.rope_parameters`, `projector_use_layernorm`, `tie_word_embeddings`.
- the older custom-code one (`model_type` "lfm2-vl", as released on the hub): `image_token_index`,
  `vision_feature_layer`, `text_config.block_ff_dim` overriding `intermediate_size`, `full_attn_idxs`,
  `tie_embedding`, `rope_theta`; no `projector_use_layernorm` (the projector always had a LayerNorm).

Everything the checkpoint states is read from it; the defaults below are transformers' defaults, used only
where a file is silent.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh

from .errors import Lfm2VlError
from .parallel.rules import DEFAULT_RULES, ShardingRules

CONV = "conv"
ATTENTION = "full_attention"


class ConfigError(Lfm2VlError):
    """A checkpoint's config.json cannot be parsed into a model we can build."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP2-NaFlex vision tower."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    num_channels: int = 3
    patch_size: int = 16
    num_patches: int = 256  # learned position grid of sqrt(num_patches)^2 entries
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision_config: hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_heads})"
            )
        if self.position_grid_size**2 != self.num_patches:
            raise ConfigError(
                f"vision_config: num_patches ({self.num_patches}) must be a square (the position grid)"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_grid_size(self) -> int:
        return int(round(self.num_patches**0.5))


@dataclasses.dataclass(frozen=True)
class Segment:
    """`repeats` consecutive copies of a motif of layer kinds, run as one `lax.scan` over stacked weights."""

    motif: tuple[str, ...]
    repeats: int
    first_layer: int  # index, in the checkpoint's numbering, of the segment's first layer

    def layer_index(self, repeat: int, position: int) -> int:
        return self.first_layer + repeat * len(self.motif) + position


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """LFM2 hybrid text tower (gated short convolutions + GQA attention)."""

    vocab_size: int = 65536
    hidden_size: int = 1024
    intermediate_size: int = 4608  # the MLP width actually built (after the auto-adjust rule)
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 64
    layer_types: tuple[str, ...] = (CONV, CONV, ATTENTION)
    conv_kernel_size: int = 3  # `conv_L_cache`
    conv_bias: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 128_000
    tie_word_embeddings: bool = True

    def __post_init__(self):
        unknown = sorted(set(self.layer_types) - {CONV, ATTENTION})
        if unknown:
            raise ConfigError(f"text_config.layer_types: unsupported layer kinds {unknown}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @functools.cached_property
    def segments(self) -> tuple[Segment, ...]:
        return plan_segments(self.layer_types)


REMAT_POLICIES = ("none", "full", "dots", "qkv_conv")  # see `nn.layers.remat`


def floating_dtype(value: Any, what: str = "dtype") -> np.dtype:
    """`value` as a numpy dtype, refused (naming `what`) unless it is a floating-point type."""
    try:
        dtype = np.dtype(jnp.dtype(value))
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: {value!r} is not a dtype (e.g. float32, bfloat16)") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ConfigError(f"{what}: {dtype.name} is not a floating-point type (e.g. float32, bfloat16)")
    return dtype


def default_dtype_name() -> str:
    """The compute dtype when none is asked for: float32 on the CPU (bfloat16 decodes 18% slower there),
    bfloat16 on accelerators."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


@dataclasses.dataclass(frozen=True)
class DTypePolicy:
    """Which dtype each kind of array has, stated rather than read off the arrays.

    params: the weights as stored (and as the optimizer updates them: fp32 master weights in training).
    compute: what matmuls and activations run in; weights are cast to it where used (a no-op when equal).
    cache: the decoding cache's K/V and conv states (default: compute).
    Norms, softmax, logits and the loss are float32 whatever these say.
    """

    params: Any = jnp.float32
    compute: Any = jnp.float32
    cache: Any = None

    def __post_init__(self):
        object.__setattr__(self, "params", floating_dtype(self.params, "params dtype"))
        object.__setattr__(self, "compute", floating_dtype(self.compute, "compute dtype"))
        cache = self.compute if self.cache is None else floating_dtype(self.cache, "cache dtype")
        object.__setattr__(self, "cache", cache)

    @classmethod
    def uniform(cls, dtype: Any) -> DTypePolicy:
        return cls(params=dtype, compute=dtype, cache=dtype)


QUANT_SCHEMES = ("int8", "int4")
DEFAULT_INT4_GROUP_SIZE = 64


@dataclasses.dataclass(frozen=True)
class Quantization:
    """Weight-only quantization of every projection (`nn.quant`): "int8" with one scale per output channel,
    or "int4" with one scale per `group_size` consecutive inputs of each output channel. `embeddings`: the
    token embedding and LM head (tied or not) quantized too (per vocabulary row for a tied embedding), or
    kept in the params dtype."""

    scheme: str
    # int4 only. None: DEFAULT_INT4_GROUP_SIZE where it divides a weight's input width, else that width's
    # largest even divisor below it (SigLIP2-so400m's MLP width 4304: 16); a size given must divide all.
    group_size: int | None = None
    embeddings: bool = True

    def __post_init__(self):
        if self.scheme not in QUANT_SCHEMES:
            raise ConfigError(f"unknown quantization scheme {self.scheme!r}: use one of {QUANT_SCHEMES}")
        if self.scheme == "int8" and self.group_size is not None:
            raise ConfigError(
                f"quantization group size {self.group_size!r} is for int4 (int8 has one scale per output "
                "channel)"
            )
        if self.scheme == "int4" and self.group_size is not None:
            size = self.group_size
            if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 2 or size % 2:
                raise ConfigError(f"quantization group size must be an even integer >= 2, got {size!r}")
            object.__setattr__(self, "group_size", int(size))
        if not isinstance(self.embeddings, (bool, np.bool_)):
            raise ConfigError(f"quantization embeddings must be True or False, got {self.embeddings!r}")

    @property
    def bits(self) -> int:
        return 8 if self.scheme == "int8" else 4

    def group_for(self, width: int) -> int | None:
        """Inputs per scale of a weight of input width `width` (None: one group, int8), or None when a
        group size given does not divide it (the caller names the weight)."""
        if self.scheme == "int8":
            return width
        if self.group_size is not None:
            return self.group_size if width % self.group_size == 0 else None
        return next((g for g in range(DEFAULT_INT4_GROUP_SIZE, 1, -2) if width % g == 0), None)


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How to run the model (not what it is): layouts, dtypes, kernels, remat, sharding. Static: a change
    compiles new programs.

    scan_layers: the text layers' layout, stacked per motif and run by `lax.scan`, or one array per layer
        run by a Python loop (see `nn.params`). The params pytree must be in this layout.
    attention: the implementation behind `nn.attention.attention` ("auto", "reference", or a kernel).
    fused_projections: the text layers' q/k/v kernels held as one (D, K, G+2, H) array (per KV head: its G
        query heads, its key, its value) and the MLP's gate and up kernels as one (D, 2, F): one matrix
        product each instead of three and two. Fused once at load time; checkpoints and exports keep the
        separate tensors (`nn.params`, `checkpoint.canonical`). A tensor-parallel mesh splits the fused
        q/k/v by KV head, so their count must divide the tensor axis.
    remat: what the backward pass recomputes in the scanned layers and the vision tower
        (`nn.layers.REMAT_POLICIES`); only matters under `jax.grad`.
    mesh, rules: where arrays live; activations get sharding constraints when a mesh is set.
    quantization: weight-only int8/int4 projections (`Quantization`, `nn.quant`), or None. The params
        pytree must hold them quantized (`nn.quant.quantize_params`, or quantized as they load).
    """

    dtypes: DTypePolicy = dataclasses.field(default_factory=DTypePolicy)
    scan_layers: bool = True
    attention: str = "auto"
    fused_projections: bool = False
    remat: str = "none"
    mesh: Mesh | None = None
    rules: ShardingRules = DEFAULT_RULES
    quantization: Quantization | None = None

    def __post_init__(self):
        # Each field's type, so that e.g. scan_layers='no' is not read as True, nor a mesh description as
        # a mesh: (expected, what to say).
        types = {
            "dtypes": (DTypePolicy, "a DTypePolicy"),
            "scan_layers": ((bool, np.bool_), "True or False"),
            "attention": (str, "an implementation name (e.g. 'auto', 'reference')"),
            "remat": (str, f"one of {REMAT_POLICIES}"),
            "mesh": (
                (Mesh, AbstractMesh, type(None)),
                "a jax.sharding.Mesh (or AbstractMesh) or None (parallel.mesh.make_mesh(data=2))",
            ),
            "rules": (ShardingRules, "a ShardingRules"),
            "quantization": ((Quantization, type(None)), "a Quantization('int8' | 'int4') or None"),
        }
        for name, (expected, description) in types.items():
            value = getattr(self, name)
            if not isinstance(value, expected):
                shown = repr(value) if len(repr(value)) <= 60 else f"a {type(value).__name__}"
                raise ConfigError(f"runtime option {name} must be {description}, got {shown}")
        object.__setattr__(self, "scan_layers", bool(self.scan_layers))
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat policy {self.remat!r} is not one of {REMAT_POLICIES}")

    def replace(self, **changes: Any) -> RuntimeConfig:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Lfm2VlConfig:
    """The model as its checkpoint describes it (`vision`, `text`, projector and token ids), plus the
    `runtime` choices of this process, which are never exported."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    image_token_id: int = 396
    downsample_factor: int = 2
    projector_hidden_size: int = 2560
    projector_bias: bool = True
    projector_use_layernorm: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 7
    pad_token_id: int | None = 0
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

    @property
    def projector_in_size(self) -> int:
        return self.vision.hidden_size * self.downsample_factor**2

    def replace(self, **changes: Any) -> Lfm2VlConfig:
        return dataclasses.replace(self, **changes)

    def with_runtime(self, **changes: Any) -> Lfm2VlConfig:
        return dataclasses.replace(self, runtime=self.runtime.replace(**changes))


MAX_LAYERS = 1_000_000  # text layers a config may state (the largest released model has 30)
MAX_MOTIF = 64  # longest motif the layer planner repeats (LFM2 patterns repeat motifs of 2 and 3 layers)


def _repeat_runs(codes: np.ndarray, period: int) -> np.ndarray:
    """run[i]: the number of consecutive positions j >= i with codes[j] == codes[j + period]."""
    n = len(codes)
    run = np.zeros(n, np.int32)
    if period < n:
        index = np.arange(n - period)
        # the first mismatch at or after each position (n - period where none is left)
        mismatch = np.where(codes[:-period] == codes[period:], n - period, index)
        run[: n - period] = np.minimum.accumulate(mismatch[::-1])[::-1] - index
    return run


def _repeated_motifs(layer_types: tuple[str, ...]) -> list[list[int]]:
    """For each layer, the motif lengths m <= MAX_MOTIF whose motif starting there is repeated right after
    it and is not itself a repeat of a shorter motif (that shorter motif, repeated more often, is always
    the cheaper plan for the same layers). Vectorised over the layers."""
    n = len(layer_types)
    kinds = {kind: code for code, kind in enumerate(dict.fromkeys(layer_types))}
    codes = np.fromiter((kinds[kind] for kind in layer_types), np.int32, n)
    runs = {m: _repeat_runs(codes, m) for m in range(1, min(MAX_MOTIF, n // 2) + 1)}
    motifs: list[list[int]] = [[] for _ in range(n)]
    for m, run in runs.items():
        repeated = run >= m
        for p in range(1, m):
            if m % p == 0:  # a motif of period p is motif[:p] repeated m // p times
                repeated &= runs[p] < m - p
        for start in np.flatnonzero(repeated).tolist():
            motifs[start].append(m)
    return motifs


def plan_segments(layer_types: tuple[str, ...]) -> tuple[Segment, ...]:
    """Splits a layer pattern into runs of repeated motifs, each to be scanned over its stacked weights.

    Trace and compile time grow with the number of distinct layer bodies traced, i.e. the summed motif
    lengths; a per-step `lax.cond` choosing the layer kind would keep compile time flat but halves decode
    speed. So we pick, by dynamic programming, the decomposition with the smallest summed motif length
    (ties: fewest segments, then the shortest first motif, then its fewest repeats). E.g. LFM2's 16 layers
    `cc a cc a cc a c a c a c a c` become `[c]x1, [c,a,c]x3, [a,c]x3`: six traced layers instead of
    sixteen, independent of depth for regular patterns.

    Linear in depth (times MAX_MOTIF): from each layer, a segment is either one copy of any number of
    layers (the best of these follows in O(1) from the next layer's) or r >= 2 copies of a motif of at
    most MAX_MOTIF layers repeated there (the best r follows from the same motif's at its next copy).
    Longer motifs are not repeated, so up to 2 * MAX_MOTIF layers the plan is the optimum over all.
    """
    n = len(layer_types)
    motifs = _repeated_motifs(layer_types)
    # Plans compare as (cost, segments, first motif length, its repeats); best[i] plans layers [i, n).
    best: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)] * (n + 1)
    # (i, m) -> (cost, segments, r) of the best r >= 1 copies at i of the motif layer_types[i:i+m] and the
    # plan after them; kept where the motif is repeated at i, until the copy before it is planned.
    copies: dict[tuple[int, int], tuple[int, int, int]] = {}
    single = None  # the best plan from `start` whose first segment is one copy (of any length)
    for start in range(n - 1, -1, -1):
        cost, segments = best[start + 1][:2]
        one_layer = (1 + cost, 1 + segments, 1, 1)
        single = one_layer if single is None else min(one_layer, (single[0] + 1, single[1], single[2] + 1, 1))
        plan = single
        for m in motifs[start]:
            cost, segments = best[start + m][:2]
            later = copies.pop((start + m, m), None)
            if later is None:  # the copy at start + m is the motif's last
                later = (*best[start + 2 * m][:2], 1)
            choice = min((cost, segments, 1), (later[0], later[1], later[2] + 1))
            copies[start, m] = choice
            plan = min(plan, (m + choice[0], 1 + choice[1], m, choice[2]))
        best[start] = plan
    planned, start = [], 0
    while start < n:
        _, _, m, repeats = best[start]
        motif = tuple(layer_types[start : start + m])
        planned.append(Segment(motif=motif, repeats=repeats, first_layer=start))
        start += m * repeats
    return tuple(planned)


def mlp_width(intermediate_size: int, auto_adjust: bool, multiplier: float | None, multiple_of: int) -> int:
    """LFM2's feed-forward width: transformers' `Lfm2MLP` auto-adjust rule (2/3 of the nominal width,
    times the multiplier, rounded up to a multiple of `multiple_of`)."""
    if not auto_adjust:
        return intermediate_size
    width = int(2 * intermediate_size / 3)
    if multiplier is not None:
        width = int(multiplier * width)
        width = multiple_of * ((width + multiple_of - 1) // multiple_of)
    return width


# config.json parsing ---------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class Expected:
    """What a config.json value must be: a description for the error message and the test."""

    description: str
    accepts: Callable[[Any], bool]

    def or_null(self) -> Expected:
        return Expected(f"{self.description} or null", lambda v: v is None or self.accepts(v))


POSITIVE_INT = Expected("a positive integer", lambda v: _is_int(v) and v > 0)
INT = Expected("an integer", _is_int)
TOKEN_ID = Expected("a token id (a non-negative integer)", lambda v: _is_int(v) and v >= 0)
TOKEN_IDS = Expected(
    "a token id or a non-empty list of token ids",
    lambda v: TOKEN_ID.accepts(v) or (isinstance(v, list) and bool(v) and all(map(TOKEN_ID.accepts, v))),
)
BOOL = Expected("true or false", lambda v: isinstance(v, bool))
POSITIVE_NUMBER = Expected("a positive finite number", lambda v: _is_number(v) and v > 0)
STRING = Expected("a string", lambda v: isinstance(v, str))
STRINGS = Expected("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
INDICES = Expected(
    "a list of non-negative integers", lambda v: isinstance(v, list) and all(TOKEN_ID.accepts(x) for x in v)
)
OBJECT = Expected("an object", lambda v: isinstance(v, dict))

# Every config.json key we read, with what it must hold (null where the parser has a meaning for it).
# Keys we do not read are not checked.
CONFIG_KEYS: dict[str, Expected] = {
    "model_type": STRING,
    "text_config": OBJECT,
    "vision_config": OBJECT,
    "image_token_id": TOKEN_ID,
    "image_token_index": TOKEN_ID,
    "vision_feature_layer": INT,
    "downsample_factor": POSITIVE_INT,
    "projector_hidden_act": STRING,
    "projector_hidden_size": POSITIVE_INT,
    "projector_bias": BOOL,
    "projector_use_layernorm": BOOL,
    "tie_word_embeddings": BOOL,
    "tie_embedding": BOOL,
    "bos_token_id": TOKEN_ID.or_null(),
    "eos_token_id": TOKEN_IDS.or_null(),
    "pad_token_id": TOKEN_ID.or_null(),
}
TEXT_CONFIG_KEYS: dict[str, Expected] = {
    "vocab_size": POSITIVE_INT,
    "hidden_size": POSITIVE_INT,
    "intermediate_size": POSITIVE_INT,
    "block_ff_dim": POSITIVE_INT,
    "block_auto_adjust_ff_dim": BOOL,
    "block_ffn_dim_multiplier": POSITIVE_NUMBER.or_null(),
    "block_multiple_of": POSITIVE_INT,
    "num_hidden_layers": POSITIVE_INT,
    "num_attention_heads": POSITIVE_INT,
    "num_heads": POSITIVE_INT,
    "num_key_value_heads": POSITIVE_INT,
    "head_dim": POSITIVE_INT.or_null(),
    "layer_types": STRINGS.or_null(),
    "full_attn_idxs": INDICES.or_null(),
    "conv_L_cache": POSITIVE_INT,
    "conv_bias": BOOL,
    "norm_eps": POSITIVE_NUMBER,
    "block_norm_eps": POSITIVE_NUMBER,
    "rope_theta": POSITIVE_NUMBER,
    "rope_parameters": OBJECT.or_null(),
    "rope_scaling": OBJECT.or_null(),
    "max_position_embeddings": POSITIVE_INT,
    "tie_word_embeddings": BOOL,
    "tie_embedding": BOOL,
    "bos_token_id": TOKEN_ID.or_null(),
    "eos_token_id": TOKEN_IDS.or_null(),
    "pad_token_id": TOKEN_ID.or_null(),
}
ROPE_KEYS: dict[str, Expected] = {"rope_type": STRING.or_null(), "rope_theta": POSITIVE_NUMBER}
VISION_CONFIG_KEYS: dict[str, Expected] = {
    "hidden_size": POSITIVE_INT,
    "intermediate_size": POSITIVE_INT,
    "num_hidden_layers": POSITIVE_INT,
    "num_attention_heads": POSITIVE_INT,
    "num_channels": POSITIVE_INT,
    "patch_size": POSITIVE_INT,
    "num_patches": POSITIVE_INT,
    "layer_norm_eps": POSITIVE_NUMBER,
    "hidden_act": STRING,
}


def _check_keys(raw: dict[str, Any], expected: dict[str, Expected], prefix: str) -> None:
    for key, rule in expected.items():
        if key in raw and not rule.accepts(raw[key]):
            shown = json.dumps(raw[key])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ConfigError(f"{prefix}{key} must be {rule.description}, got {shown}")


def _text_config(raw: dict[str, Any], tie_word_embeddings: bool) -> TextConfig:
    _check_keys(raw, TEXT_CONFIG_KEYS, "text_config.")
    num_layers = raw.get("num_hidden_layers", 32)
    if num_layers > MAX_LAYERS:  # a sanity bound: the layer pattern is built as a list
        raise ConfigError(
            f"text_config.num_hidden_layers {num_layers} is above the {MAX_LAYERS} layers supported"
        )
    layer_types = raw.get("layer_types")
    if layer_types is None:
        attention_layers = raw.get("full_attn_idxs")
        if attention_layers is None:
            attention_layers = range(num_layers)
        outside = sorted(i for i in attention_layers if i >= num_layers)
        if outside:
            raise ConfigError(
                f"text_config.full_attn_idxs names layers {outside} of a "
                f"{num_layers}-layer model (num_hidden_layers)"
            )
        attention_set = set(attention_layers)
        layer_types = [ATTENTION if i in attention_set else CONV for i in range(num_layers)]
    if len(layer_types) != num_layers:
        raise ConfigError(
            f"text_config: layer_types has {len(layer_types)} entries but num_hidden_layers is {num_layers}"
        )

    rope = raw.get("rope_parameters") or {}
    _check_keys(rope, ROPE_KEYS, "text_config.rope_parameters.")
    rope_type = rope.get("rope_type") or (raw.get("rope_scaling") or {}).get("rope_type")
    if rope_type not in (None, "default"):
        raise ConfigError(f"text_config: rope_type {rope_type!r} is not supported (only 'default')")
    rope_theta = rope.get("rope_theta", raw.get("rope_theta", 1_000_000.0))

    hidden = raw.get("hidden_size", 2560)
    heads = raw.get("num_attention_heads", raw.get("num_heads", 32))
    head_dim = raw.get("head_dim")
    if head_dim is None and hidden % heads:
        raise ConfigError(
            f"text_config.hidden_size ({hidden}) must be a multiple of num_attention_heads "
            f"({heads}) when head_dim is not given"
        )
    # The custom-code layout names the nominal MLP width `block_ff_dim`; it overrides `intermediate_size`.
    nominal_width = raw.get("block_ff_dim", raw.get("intermediate_size", 12288))
    width = mlp_width(
        nominal_width,
        raw.get("block_auto_adjust_ff_dim", True),
        raw.get("block_ffn_dim_multiplier", 1.0),
        raw.get("block_multiple_of", 256),
    )
    if width < 1:
        raise ConfigError(
            f"text_config: the MLP width from intermediate_size/block_ff_dim {nominal_width} is {width}"
        )
    return TextConfig(
        vocab_size=raw.get("vocab_size", 65536),
        hidden_size=hidden,
        intermediate_size=width,
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads", 8),
        head_dim=head_dim or hidden // heads,
        layer_types=tuple(layer_types),
        conv_kernel_size=raw.get("conv_L_cache", 3),
        conv_bias=raw.get("conv_bias", False),
        norm_eps=raw.get("norm_eps", raw.get("block_norm_eps", 1e-5)),
        rope_theta=float(rope_theta),
        max_position_embeddings=raw.get("max_position_embeddings", 128_000),
        tie_word_embeddings=tie_word_embeddings,
    )


def _vision_config(raw: dict[str, Any], feature_layer: int) -> VisionConfig:
    _check_keys(raw, VISION_CONFIG_KEYS, "vision_config.")
    hidden_act = raw.get("hidden_act", "gelu_pytorch_tanh")
    if hidden_act not in ("gelu_pytorch_tanh", "gelu"):
        raise ConfigError(f"vision_config.hidden_act {hidden_act!r} is not supported")
    num_layers = raw.get("num_hidden_layers", 12)
    # The custom-code model dropped the layers after `vision_feature_layer` (-1: keep all).
    if not -num_layers <= feature_layer < num_layers:
        raise ConfigError(
            f"vision_feature_layer {feature_layer} is not a layer of the "
            f"{num_layers}-layer vision tower (vision_config.num_hidden_layers)"
        )
    if feature_layer != -1:
        num_layers = feature_layer % num_layers + 1
    return VisionConfig(
        hidden_size=raw.get("hidden_size", 768),
        intermediate_size=raw.get("intermediate_size", 3072),
        num_layers=num_layers,
        num_heads=raw.get("num_attention_heads", 12),
        num_channels=raw.get("num_channels", 3),
        patch_size=raw.get("patch_size", 16),
        num_patches=raw.get("num_patches", 256),
        layer_norm_eps=raw.get("layer_norm_eps", 1e-6),
        hidden_act=hidden_act,
    )


def config_from_dict(raw: dict[str, Any], source: str | Path = "config.json") -> Lfm2VlConfig:
    """Parses a checkpoint's config.json (either layout) into a `Lfm2VlConfig`; a value of the wrong type
    or out of range is a `ConfigError` naming `source` (the file) and the key."""
    try:
        return _parse_config(raw)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _parse_config(raw: dict[str, Any]) -> Lfm2VlConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"must hold a JSON object, not a {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type not in ("lfm2_vl", "lfm2-vl"):
        raise ConfigError(f"model_type {model_type!r} is not an LFM2-VL model")
    for key in ("text_config", "vision_config"):
        if key not in raw:
            raise ConfigError(f"missing {key!r}")
    _check_keys(raw, CONFIG_KEYS, "")
    act = raw.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ConfigError(f"projector_hidden_act {act!r} is not supported (only 'gelu')")
    text_raw = raw["text_config"]
    # The top-level flag decides (transformers ties through the outer model's config); the text config's
    # only where the top level is silent.
    tie = next(
        (bool(c[k]) for c in (raw, text_raw) for k in ("tie_word_embeddings", "tie_embedding") if k in c),
        True,
    )
    text = _text_config(text_raw, tie_word_embeddings=tie)

    def in_vocabulary(key: str, value: Any) -> Any:
        ids = value if isinstance(value, list) else [] if value is None else [value]
        if any(i >= text.vocab_size for i in ids):
            raise ConfigError(
                f"{key} {value} is outside the vocabulary (text_config.vocab_size {text.vocab_size})"
            )
        return tuple(value) if isinstance(value, list) else value

    def token_id(key: str, default: int | None) -> Any:
        return in_vocabulary(key, raw.get(key, text_raw.get(key, default)))

    image_key = "image_token_index" if "image_token_id" not in raw else "image_token_id"
    return Lfm2VlConfig(
        vision=_vision_config(raw["vision_config"], raw.get("vision_feature_layer", -1)),
        text=text,
        image_token_id=in_vocabulary(image_key, raw.get(image_key, 396)),
        downsample_factor=raw.get("downsample_factor", 2),
        projector_hidden_size=raw.get("projector_hidden_size", 2560),
        projector_bias=raw.get("projector_bias", True),
        projector_use_layernorm=raw.get("projector_use_layernorm", True),
        bos_token_id=token_id("bos_token_id", 1),
        eos_token_id=token_id("eos_token_id", 7),
        pad_token_id=token_id("pad_token_id", 0),
    )


def read_json_object(path: Path, error: type[Lfm2VlError] = ConfigError) -> dict[str, Any] | None:
    """The JSON object a config file holds; None if there is no such file. Anything else (not UTF-8, not
    JSON, nested too deeply, another JSON value) is an `error` naming the file."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise error(f"{path} is not valid JSON (UTF-8): {err}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


def config_path(path: str | Path) -> Path:
    """`config.json` in a checkpoint directory, or the file itself."""
    path = Path(path)
    return path / "config.json" if path.is_dir() else path


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The parsed JSON of `config.json` in a checkpoint directory (or of the file itself)."""
    path = config_path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no config.json at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None


def load_config(path: str | Path) -> Lfm2VlConfig:
    """Reads `config.json` from a checkpoint directory (or the file itself)."""
    return config_from_dict(read_config_json(path), config_path(path))


def config_to_dict(config: Lfm2VlConfig) -> dict[str, Any]:
    """The transformers 5.x `config.json` for this model (MLP width written as built: no auto-adjust)."""
    v, t = config.vision, config.text
    eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id
    return {
        "architectures": ["Lfm2VlForConditionalGeneration"],
        "model_type": "lfm2_vl",
        "image_token_id": config.image_token_id,
        "downsample_factor": config.downsample_factor,
        "projector_hidden_act": "gelu",
        "projector_hidden_size": config.projector_hidden_size,
        "projector_bias": config.projector_bias,
        "projector_use_layernorm": config.projector_use_layernorm,
        "tie_word_embeddings": t.tie_word_embeddings,
        "text_config": {
            "model_type": "lfm2",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "block_auto_adjust_ff_dim": False,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "layer_types": list(t.layer_types),
            "conv_L_cache": t.conv_kernel_size,
            "conv_bias": t.conv_bias,
            "norm_eps": t.norm_eps,
            "max_position_embeddings": t.max_position_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
            "tie_word_embeddings": t.tie_word_embeddings,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": config.pad_token_id,
        },
        "vision_config": {
            "model_type": "siglip2_vision_model",
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads,
            "num_channels": v.num_channels,
            "patch_size": v.patch_size,
            "num_patches": v.num_patches,
            "hidden_act": v.hidden_act,
            "layer_norm_eps": v.layer_norm_eps,
            "vision_use_head": False,
        },
    }
