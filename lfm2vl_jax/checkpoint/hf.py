"""Hugging Face checkpoints (safetensors, transformers' layout) to our params pytree, and back.

`tensor_map(config)` is the single table of correspondences: for every tensor of transformers'
`Lfm2VlForConditionalGeneration` state dict (5.x save layout), where it lives in our pytree (leaf path and,
for scanned layers, the index on the stacked `layers` axis) and how it is laid out there. Import and export
both walk it, so they cannot drift apart; the layout changes are transposes and reshapes only, so a round
trip is bit-exact.

Accepted key layouts: the hub's (`model.vision_tower.vision_model.*`) and transformers 5.x
`save_pretrained`'s (no `vision_model`); `lm_head.weight` present or absent when tied.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ..config import CONV, Lfm2VlConfig, RuntimeConfig, config_from_dict, read_config_json
from ..errors import Lfm2VlError
from ..nn.params import Params, ParamSpec, is_spec, param_shardings, param_specs
from ..nn.quant import QuantizedWeight, dequantize_on_host, quantize_like
from .safetensors_io import SafetensorsError, SafetensorsFile

log = logging.getLogger(__name__)

HUB_VISION_PREFIX = "model.vision_tower.vision_model."
VISION_PREFIX = "model.vision_tower."
TEXT_PREFIX = "model.language_model."
PROJECTOR_PREFIX = "model.multi_modal_projector."
# Parts of the SigLIP2 checkpoint the LFM2-VL forward pass never uses.
UNUSED_TENSORS = re.compile(r"^model\.vision_tower\.head\.")


class CheckpointError(Lfm2VlError):
    """A checkpoint whose tensors do not fit the model its config describes."""


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    hf_key: str
    path: tuple[str | int, ...]  # path of the leaf in our params pytree
    # Where in the leaf: its position on the stacked `layers` axis (an int), that and a part of a fused
    # kernel (a tuple of indices), or None for the whole leaf.
    index: int | tuple | None
    hf_shape: tuple[int, ...]
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def _to_input_first(*out_shape: int) -> tuple[Callable, Callable]:
    """torch Linear weight (out, in) <-> kernel (in, *out_shape)."""
    return (lambda w: w.T.reshape(w.shape[1], *out_shape)), (lambda k: k.reshape(k.shape[0], -1).T)


def _from_heads_first(n_in: int, *head_shape: int) -> tuple[Callable, Callable]:
    """torch Linear weight (out, heads*head_dim) <-> kernel (heads, head_dim, out)."""
    return (lambda w: w.T.reshape(*head_shape, w.shape[0])), (lambda k: k.reshape(n_in, -1).T)


def _reshaper(shape: tuple[int, ...], hf_shape: tuple[int, ...]) -> tuple[Callable, Callable]:
    return (lambda x: x.reshape(shape)), (lambda x: x.reshape(hf_shape))


def tensor_map(config: Lfm2VlConfig) -> dict[str, TensorMapping]:
    """Every tensor of the model's 5.x state dict -> where and how it lives in our pytree (in the
    layout `config.runtime.scan_layers` selects, see `nn.params.param_specs`)."""
    v, t = config.vision, config.text
    scan_layers, fused = config.runtime.scan_layers, config.runtime.fused_projections
    table: dict[str, TensorMapping] = {}

    def add(
        hf_key: str, path: tuple, index: int | tuple | None, hf_shape: tuple, transforms: tuple | None = None
    ):
        to_jax, to_hf = transforms or (_identity, _identity)
        table[hf_key] = TensorMapping(hf_key, path, index, tuple(hf_shape), to_jax, to_hf)

    def add_linear(hf: str, path: tuple, index: int | None, n_in: int, out_shape: tuple, bias: bool):
        n_out = int(np.prod(out_shape))
        add(f"{hf}.weight", (*path, "kernel"), index, (n_out, n_in), _to_input_first(*out_shape))
        if bias:
            add(f"{hf}.bias", (*path, "bias"), index, (n_out,), _reshaper(out_shape, (n_out,)))

    def add_norm(hf: str, path: tuple, index: int | None, size: int, bias: bool):
        add(f"{hf}.weight", (*path, "scale"), index, (size,))
        if bias:
            add(f"{hf}.bias", (*path, "bias"), index, (size,))

    # Vision tower.
    e, heads, hd = v.hidden_size, v.num_heads, v.head_dim
    patch_dim = v.num_channels * v.patch_size**2
    grid = v.position_grid_size
    add_linear(
        f"{VISION_PREFIX}embeddings.patch_embedding", ("vision", "patch_embed"), None, patch_dim, (e,), True
    )
    add(
        f"{VISION_PREFIX}embeddings.position_embedding.weight",
        ("vision", "position_grid"),
        None,
        (grid * grid, e),
        _reshaper((grid, grid, e), (grid * grid, e)),
    )
    for i in range(v.num_layers):
        hf, path = f"{VISION_PREFIX}encoder.layers.{i}", ("vision", "layers")
        add_norm(f"{hf}.layer_norm1", (*path, "ln1"), i, e, True)
        add_norm(f"{hf}.layer_norm2", (*path, "ln2"), i, e, True)
        for name in ("q", "k", "v"):
            add_linear(f"{hf}.self_attn.{name}_proj", (*path, "attn", name), i, e, (heads, hd), True)
        add(
            f"{hf}.self_attn.out_proj.weight",
            (*path, "attn", "o", "kernel"),
            i,
            (e, e),
            _from_heads_first(e, heads, hd),
        )
        add(f"{hf}.self_attn.out_proj.bias", (*path, "attn", "o", "bias"), i, (e,))
        add_linear(f"{hf}.mlp.fc1", (*path, "mlp", "fc1"), i, e, (v.intermediate_size,), True)
        add_linear(f"{hf}.mlp.fc2", (*path, "mlp", "fc2"), i, v.intermediate_size, (e,), True)
    add_norm(f"{VISION_PREFIX}post_layernorm", ("vision", "post_ln"), None, e, True)

    # Projector.
    if config.projector_use_layernorm:
        add_norm(f"{PROJECTOR_PREFIX}layer_norm", ("projector", "ln"), None, config.projector_in_size, True)
    p_hidden, bias = config.projector_hidden_size, config.projector_bias
    add_linear(
        f"{PROJECTOR_PREFIX}linear_1", ("projector", "fc1"), None, config.projector_in_size, (p_hidden,), bias
    )
    add_linear(f"{PROJECTOR_PREFIX}linear_2", ("projector", "fc2"), None, p_hidden, (t.hidden_size,), bias)

    # Text tower: HF layer i lives at blocks[segment][motif position], then at index `repeat` of the
    # stacked axis (scanned layout) or of the list of layers (per-layer layout).
    d, f, n, k, h = t.hidden_size, t.intermediate_size, t.num_heads, t.num_kv_heads, t.head_dim
    add(f"{TEXT_PREFIX}embed_tokens.weight", ("text", "embed"), None, (t.vocab_size, d))
    add(f"{TEXT_PREFIX}embedding_norm.weight", ("text", "final_norm", "scale"), None, (d,))
    if not t.tie_word_embeddings:
        add("lm_head.weight", ("text", "lm_head"), None, (t.vocab_size, d), (_transpose, _transpose))
    for s, segment in enumerate(t.segments):
        for r in range(segment.repeats):
            for pos, kind in enumerate(segment.motif):
                hf = f"{TEXT_PREFIX}layers.{segment.layer_index(r, pos)}"
                if scan_layers:
                    path, index = ("text", "blocks", s, pos), r
                else:
                    path, index = ("text", "blocks", s, pos, r), None
                add(f"{hf}.operator_norm.weight", (*path, "operator_norm", "scale"), index, (d,))
                add(f"{hf}.ffn_norm.weight", (*path, "ffn_norm", "scale"), index, (d,))
                # Fused kernels: each tensor is one part of the leaf (`nn.params`), after the layers index.
                lead = () if index is None else (index,)
                for part, (name, w) in enumerate((("gate", "w1"), ("up", "w3"))):
                    where = (
                        ((*path, "mlp", "gate_up"), (*lead, slice(None), part))
                        if fused
                        else ((*path, "mlp", name), index)
                    )
                    add(f"{hf}.feed_forward.{w}.weight", *where, (f, d), (_transpose, _transpose))
                add(
                    f"{hf}.feed_forward.w2.weight",
                    (*path, "mlp", "down"),
                    index,
                    (d, f),
                    (_transpose, _transpose),
                )
                if kind == CONV:
                    conv = (*path, "conv")
                    size = t.conv_kernel_size
                    add(
                        f"{hf}.conv.in_proj.weight",
                        (*conv, "in_proj"),
                        index,
                        (3 * d, d),
                        _to_input_first(3, d),
                    )
                    add(
                        f"{hf}.conv.conv.weight",
                        (*conv, "kernel"),
                        index,
                        (d, 1, size),
                        (lambda w: w[:, 0, :].T, lambda x: x.T[:, None, :]),
                    )
                    add(
                        f"{hf}.conv.out_proj.weight",
                        (*conv, "out_proj"),
                        index,
                        (d, d),
                        (_transpose, _transpose),
                    )
                    if t.conv_bias:
                        add(
                            f"{hf}.conv.in_proj.bias",
                            (*conv, "in_proj_bias"),
                            index,
                            (3 * d,),
                            _reshaper((3, d), (3 * d,)),
                        )
                        add(f"{hf}.conv.conv.bias", (*conv, "kernel_bias"), index, (d,))
                        add(f"{hf}.conv.out_proj.bias", (*conv, "out_proj_bias"), index, (d,))
                else:
                    attn = (*path, "attn")
                    g, everything = n // k, slice(None)
                    projections = {  # name: (shape in our kernel, part of the fused kernel)
                        "q": ((n, h), (everything, everything, slice(0, g))),
                        "k": ((k, h), (everything, everything, g)),
                        "v": ((k, h), (everything, everything, g + 1)),
                    }
                    for name, (shape, part) in projections.items():
                        if fused:  # q lands as (K, G, H): query head n belongs to KV head n // G, as in GQA
                            ours, where = (
                                ((k, g, h) if name == "q" else shape),
                                ((*attn, "qkv"), (*lead, *part)),
                            )
                        else:
                            ours, where = shape, ((*attn, name), index)
                        add(
                            f"{hf}.self_attn.{name}_proj.weight",
                            *where,
                            (shape[0] * h, d),
                            _to_input_first(*ours),
                        )
                    add(
                        f"{hf}.self_attn.out_proj.weight",
                        (*attn, "o"),
                        index,
                        (d, n * h),
                        _from_heads_first(d, n, h),
                    )
                    add(f"{hf}.self_attn.q_layernorm.weight", (*attn, "q_norm"), index, (h,))
                    add(f"{hf}.self_attn.k_layernorm.weight", (*attn, "k_norm"), index, (h,))
    return table


def canonical_key(key: str) -> str:
    """Maps the hub layout's vision keys onto transformers 5.x's save layout."""
    if key.startswith(HUB_VISION_PREFIX):
        return VISION_PREFIX + key[len(HUB_VISION_PREFIX) :]
    return key


def _allowed_roots(directory: Path) -> list[Path]:
    """Where the files of a checkpoint directory may really live: inside it, or, for a Hugging Face Hub
    cache snapshot (`.../snapshots/<revision>/`, whose files are links into the repository's blob store),
    in that repository's `blobs/`."""
    roots = [directory.resolve()]
    if directory.parent.name == "snapshots":
        roots.append((directory.parent.parent / "blobs").resolve())
    return roots


def _shard_path(directory: Path, index: Path, key: str, name: Any) -> Path:
    """The shard an index entry names, refused unless it is a file inside the checkpoint directory: a
    downloaded checkpoint must not make us read other files (`../x`, `/etc/x`, or a link leading out)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointError(f"{index}: weight_map[{key!r}] must be a shard file name, got {name!r}")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise CheckpointError(
            f"{index}: weight_map[{key!r}] names {name!r}, which is not a file inside {directory}"
        )
    path = directory / relative
    real = path.resolve()
    if not any(real.is_relative_to(root) for root in _allowed_roots(directory)):
        raise CheckpointError(
            f"{index}: weight_map[{key!r}] names {name!r}, a link to {real}, outside {directory}"
        )
    return path


def weight_files(directory: Path) -> list[Path]:
    """model.safetensors, or the shards a model.safetensors.index.json names (files inside `directory`)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard files")
        files = list(
            dict.fromkeys(_shard_path(directory, index, key, name) for key, name in weight_map.items())
        )
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {missing}")
        return files
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {directory}")


class CheckpointReader:
    """All tensors of a (possibly sharded) safetensors checkpoint, under canonical key names."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.tensors: dict[str, tuple[SafetensorsFile, str]] = {}
        for path in weight_files(directory):
            try:
                file = SafetensorsFile(path)
            except OSError as err:
                raise CheckpointError(f"cannot read {path}: {err}") from None
            for name in file.keys():  # noqa: SIM118 (not a dict)
                key = canonical_key(name)
                if key in self.tensors:
                    other = self.tensors[key][0].path.name
                    raise CheckpointError(f"tensor {name!r} appears twice (in {other} and {path.name})")
                self.tensors[key] = (file, name)

    def shape(self, key: str) -> tuple[int, ...]:
        file, name = self.tensors[key]
        return file.shape(name)

    def dtype(self, key: str) -> np.dtype:
        file, name = self.tensors[key]
        return file.dtype(name)

    def read(self, key: str) -> np.ndarray:
        file, name = self.tensors[key]
        return file.read(name)


def _consensus(reader: CheckpointReader, dims: list[tuple[str, int]], configured: int) -> int:
    """The size most of the present tensors `dims` (key, axis) give; `configured` where it is among the
    most common. A tensor that disagrees with the others is then the one the shape check names, instead of
    one bad tensor setting a width that all the good ones would be blamed for."""
    sizes = collections.Counter(
        reader.shape(key)[axis]
        for key, axis in dims
        if key in reader.tensors and len(reader.shape(key)) > axis
    )
    if not sizes or sizes[configured] == max(sizes.values()):
        return configured
    return sizes.most_common(1)[0][0]


def reconcile_config(config: Lfm2VlConfig, raw: dict[str, Any], reader: CheckpointReader) -> Lfm2VlConfig:
    """Takes from the checkpoint's tensors the facts configs in the wild get wrong or leave out, where
    the tensors agree: the vision depth (the custom-code model cut its tower after
    `vision_feature_layer`), the projector width, whether the projector has a LayerNorm, and the MLP width
    (the config's auto-adjust rule is easy to misstate). Every other size comes from the config, and a
    tensor that disagrees with it is refused by name."""
    keys = reader.tensors
    layer_ids = {
        int(m.group(1))
        for key in keys
        if (m := re.match(rf"{re.escape(VISION_PREFIX)}encoder\.layers\.(\d+)\.", key))
    }
    vision = config.vision
    if layer_ids:
        depth = min(max(layer_ids) + 1, vision.num_layers)  # keep the smaller depth
        if depth != vision.num_layers:
            warnings.warn(
                f"config says {vision.num_layers} vision layers, the checkpoint holds "
                f"{max(layer_ids) + 1}; using {depth}",
                stacklevel=3,
            )
            vision = dataclasses.replace(vision, num_layers=depth)
    changes: dict[str, Any] = {"vision": vision}

    projector = [
        (f"{PROJECTOR_PREFIX}linear_1.weight", 0),
        (f"{PROJECTOR_PREFIX}linear_1.bias", 0),
        (f"{PROJECTOR_PREFIX}linear_2.weight", 1),
    ]
    hidden = _consensus(reader, projector, config.projector_hidden_size)
    if hidden != config.projector_hidden_size:
        warnings.warn(
            f"projector_hidden_size {config.projector_hidden_size} != checkpoint's {hidden}; using {hidden}",
            stacklevel=3,
        )
        changes["projector_hidden_size"] = hidden
    if "projector_use_layernorm" not in raw:
        changes["projector_use_layernorm"] = f"{PROJECTOR_PREFIX}layer_norm.weight" in keys

    text = config.text
    mlp = [
        (key, 1 if m.group(1) == "2" else 0)
        for key in keys
        if (m := re.fullmatch(rf"{re.escape(TEXT_PREFIX)}layers\.\d+\.feed_forward\.w([123])\.weight", key))
    ]
    width = _consensus(reader, mlp, text.intermediate_size)
    if width != text.intermediate_size:
        warnings.warn(
            f"MLP width from the config's auto-adjust rule is {text.intermediate_size}, "
            f"the checkpoint's is {width}; using {width}",
            stacklevel=3,
        )
        changes["text"] = dataclasses.replace(text, intermediate_size=width)
    return config.replace(**changes)


def _unused(key: str, config: Lfm2VlConfig) -> bool:
    """Tensors we drop on purpose: SigLIP2's pooling head, vision layers past `vision_feature_layer`, and
    an `lm_head` that the config ties to the embeddings."""
    if UNUSED_TENSORS.match(key):
        return True
    m = re.match(rf"{re.escape(VISION_PREFIX)}encoder\.layers\.(\d+)\.", key)
    if m and int(m.group(1)) >= config.vision.num_layers:
        return True
    return key == "lm_head.weight" and config.text.tie_word_embeddings


def _check_depth(config: Lfm2VlConfig, reader: CheckpointReader) -> None:
    """Refuses a config that states more layers than the checkpoint holds tensors for, before the tensor
    table (which grows with the stated depth) is built."""
    for tower, prefix, depth in (
        ("text_config", f"{TEXT_PREFIX}layers", config.text.num_layers),
        ("vision_config", f"{VISION_PREFIX}encoder.layers", config.vision.num_layers),
    ):
        pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
        held = {m.group(1) for key in reader.tensors if (m := pattern.match(key))}
        if depth > len(held):
            raise CheckpointError(
                f"{reader.directory / 'config.json'}: {tower} states {depth} layers, but the checkpoint "
                f"holds tensors for {len(held)}"
            )


def _check_tensors(reader: CheckpointReader, table: dict[str, TensorMapping], config: Lfm2VlConfig) -> None:
    present = set(reader.tensors)
    unexpected = sorted(k for k in present - set(table) if not _unused(k, config))
    missing = sorted(set(table) - present)
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the model has no place for, e.g. {unexpected[:5]}")
    if missing:
        problems.append(f"{len(missing)} tensors missing, e.g. {missing[:5]}")
    wrong = [key for key in sorted(present & set(table)) if reader.shape(key) != table[key].hf_shape]
    problems += [
        f"tensor {key!r} has shape {reader.shape(key)}, expected {table[key].hf_shape}" for key in wrong[:5]
    ]
    if len(wrong) > 5:
        problems.append(f"and {len(wrong) - 5} more tensors of the wrong shape")
    not_float = [k for k in sorted(present & set(table)) if not jnp.issubdtype(reader.dtype(k), jnp.floating)]
    problems += [f"tensor {k!r} is stored as {reader.dtype(k)}, not a float type" for k in not_float[:5]]
    if problems:
        raise CheckpointError(
            f"checkpoint {reader.directory} does not match its config: " + "; ".join(problems)
        )


def leaf_at(tree: Any, path: tuple) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def _set_leaf(tree: Any, path: tuple, value: Any) -> None:
    for part in path[:-1]:
        tree = tree[part]
    tree[path[-1]] = value


def _group_by_leaf(table: dict[str, TensorMapping]) -> dict[tuple, list[TensorMapping]]:
    groups: dict[tuple, list[TensorMapping]] = {}
    for mapping in table.values():
        groups.setdefault(mapping.path, []).append(mapping)
    return groups


def _non_finite(key: str, path: Path, stored: np.ndarray, dtype: np.dtype) -> str:
    """Why tensor `key` is not finite once cast to `dtype`: NaN or inf in the file, or values beyond the
    range of `dtype`."""
    nan, inf = int(np.isnan(stored).sum()), int(np.isinf(stored).sum())
    if nan or inf:
        return (
            f"tensor {key!r} in {path} holds {nan} NaN and {inf} infinite values (of {stored.size}): the "
            "checkpoint is damaged (pass check_finite=False to load it anyway)"
        )
    largest = float(np.abs(stored.astype(np.float64)).max())
    return (
        f"tensor {key!r} in {path} holds values up to {largest:.4g}, beyond the range of {dtype.name} (the "
        "params dtype asked for); load it in float32 or bfloat16"
    )


def load_hf_checkpoint(
    directory: str | Path,
    runtime: RuntimeConfig | None = None,
    progress: bool = True,
    check_finite: bool = True,
) -> tuple[Lfm2VlConfig, Params]:
    """Reads a transformers checkpoint directory into (config, params); no torch needed.

    `runtime` (default `RuntimeConfig()`) becomes the config's: the params get its layout
    (`scan_layers`) and params dtype, and are sharded over its mesh as they load. Tensors are read one at
    a time (each into a fresh array), laid out and cast on the host, and each parameter leaf is put on its
    device(s) as soon as it is complete, so peak host memory stays near one leaf.

    `check_finite`: each tensor is checked, as it is read and cast, for NaN and infinite values (a damaged
    file, or values beyond the range of the params dtype), and the first such tensor is named (a
    `CheckpointError`); False skips the check (one pass over each tensor on the host).
    """
    if not isinstance(check_finite, bool):
        raise CheckpointError(f"check_finite must be True or False, got {check_finite!r}")
    runtime = RuntimeConfig() if runtime is None else runtime
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"no config.json in {directory}")
    raw = read_config_json(directory)
    reader = CheckpointReader(directory)
    config = reconcile_config(config_from_dict(raw, directory / "config.json"), raw, reader)
    config = config.replace(runtime=runtime)
    _check_depth(config, reader)
    table = tensor_map(config)
    _check_tensors(reader, table, config)

    specs = param_specs(config)  # quantized weights: a `QuantizedWeight` of specs
    float_specs = param_specs(config.with_runtime(quantization=None))
    leaf_shardings = None if runtime.mesh is None else param_shardings(config)
    np_dtype = np.dtype(runtime.dtypes.params)
    params = jax.tree.map(lambda _: None, specs, is_leaf=is_spec)
    # closed as an error or Ctrl-C passes through, so that nothing redraws it after the error line
    with tqdm(total=len(table), desc=f"loading {directory.name}", unit="tensor", disable=not progress) as bar:
        for path, mappings in _group_by_leaf(table).items():
            spec: ParamSpec = leaf_at(float_specs, path)
            leaf = np.empty(spec.shape, np_dtype)
            for m in mappings:
                file = reader.tensors[m.hf_key][0].path
                try:
                    stored = reader.read(m.hf_key)
                    value = m.to_jax(stored)
                except (OSError, ValueError) as err:
                    raise SafetensorsError(f"{file}: cannot read {m.hf_key!r}: {err}") from None
                target = leaf if m.index is None else leaf[m.index]  # a view: written in place
                with np.errstate(over="ignore"):  # an overflowing cast is reported below
                    target[...] = value
                if check_finite and not np.isfinite(target).all():
                    raise CheckpointError(_non_finite(m.hf_key, file, stored, np_dtype))
                bar.update()
            quantized = leaf_at(specs, path)
            if isinstance(quantized, QuantizedWeight):  # quantized as it streams in: one float leaf at a time
                leaf = quantize_like(leaf, quantized)
            sharding = None if leaf_shardings is None else leaf_at(leaf_shardings, path)
            _set_leaf(params, path, jax.device_put(leaf, sharding))
    return config, params


def iter_hf_tensors(
    config: Lfm2VlConfig, params: Params, dtype: Any = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Our params (in `config`'s layout) as transformers 5.x state-dict tensors, one at a time, in key
    order."""
    table = tensor_map(config)
    float_specs = param_specs(config.with_runtime(quantization=None))
    dequantized: dict[tuple, np.ndarray] = {}  # the last quantized leaf, dequantized (one at a time)
    for key in sorted(table):
        m = table[key]
        leaf = leaf_at(params, m.path)
        if isinstance(leaf, QuantizedWeight):  # exported dequantized, in the float leaf's shape
            if m.path not in dequantized:
                dequantized = {m.path: dequantize_on_host(leaf).reshape(leaf_at(float_specs, m.path).shape)}
            leaf = dequantized[m.path]
        value = np.asarray(leaf if m.index is None else leaf[m.index])
        value = np.ascontiguousarray(m.to_hf(value))
        yield key, value if dtype is None else value.astype(np.dtype(jnp.dtype(dtype)))
