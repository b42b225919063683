"""LoRA adapters in peft's format: a directory holding adapter_config.json and adapter_model.safetensors,
which `peft.PeftModel.from_pretrained(transformers_model, directory)` loads onto transformers'
`Lfm2VlForConditionalGeneration`, and which `lfm2vl train --init-adapters` reads (from us or from peft).

peft's layout: per adapted module (transformers' module name, e.g.
`model.language_model.layers.1.self_attn.q_proj`) the tensors `base_model.model.<module>.lora_A.weight`
(rank, inputs) and `...lora_B.weight` (outputs, rank), torch's output-first layout of our A and B with the
inputs and outputs flattened as transformers flattens the weight (`checkpoint.hf.tensor_map`).
`target_modules` lists the full module names, so that peft adapts exactly these modules (its short names,
e.g. "q_proj", would also match the vision tower's).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint.files import staging_directory
from ..checkpoint.hf import canonical_key, tensor_map
from ..checkpoint.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors
from ..config import Lfm2VlConfig
from ..nn.params import Params
from .lora import AdaptedWeight, LoraConfig, LoraError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Options of peft's LoraConfig that change what an adapter computes, and the values we implement.
PLAIN_LORA = {
    "use_dora": False,
    "use_rslora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
}


def module_names(config: Lfm2VlConfig, weights: dict[str, AdaptedWeight]) -> dict[str, list[str]]:
    """Adapted weight name -> transformers' module name of each of its layers (one if unstacked)."""
    where = {
        (m.path, m.index): key.removesuffix(".weight")
        for key, m in tensor_map(config).items()
        if key.endswith(".weight")
    }
    names = {}
    for name, w in weights.items():
        indices = range(w.shape[0]) if w.stacked else [None]
        names[name] = [where[(w.path, i)] for i in indices]
    return names


def _flat(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape))


def peft_tensors(
    config: Lfm2VlConfig, adapters: Params, weights: dict[str, AdaptedWeight], rank: int
) -> Iterator[tuple[str, np.ndarray]]:
    """(peft key, float32 tensor) of every adapter, in module order."""
    modules = module_names(config, weights)
    for name in sorted(weights):
        w = weights[name]
        a = np.asarray(adapters[name]["a"], np.float32)
        b = np.asarray(adapters[name]["b"], np.float32)
        for i, module in enumerate(modules[name]):
            ai, bi = (a[i], b[i]) if w.stacked else (a, b)
            yield f"{PREFIX}{module}.lora_A.weight", ai.reshape(_flat(w.input_shape), rank).T
            yield f"{PREFIX}{module}.lora_B.weight", bi.reshape(rank, _flat(w.output_shape)).T


def adapter_config(
    config: Lfm2VlConfig, weights: dict[str, AdaptedWeight], lora: LoraConfig, base_model: str | None
) -> dict[str, Any]:
    """adapter_config.json, in peft's field names."""
    modules = sorted(m for names in module_names(config, weights).values() for m in names)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": modules,
        "init_lora_weights": True,
        "inference_mode": True,
        **PLAIN_LORA,
    }


def save_peft_adapter(
    directory: str | Path,
    config: Lfm2VlConfig,
    adapters: Params,
    weights: dict[str, AdaptedWeight],
    lora: LoraConfig,
    base_model: str | None = None,
    keep_other_files: bool = False,
) -> Path:
    """Writes the adapters as a peft adapter directory (crash-safe: complete or untouched), replacing an
    adapter already there."""
    tensors = list(peft_tensors(config, adapters, weights, lora.rank))
    layout = [(key, np.dtype(np.float32), x.shape) for key, x in tensors]
    planned = {CONFIG_FILE, WEIGHTS_FILE}
    with staging_directory(directory, True, None, keep_other_files, planned) as staging:
        text = json.dumps(adapter_config(config, weights, lora, base_model), indent=2, sort_keys=True)
        (staging / CONFIG_FILE).write_text(text + "\n")
        write_safetensors(staging / WEIGHTS_FILE, layout, (x for _, x in tensors), {"format": "pt"})
    return Path(directory)


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise LoraError(f"--init-adapters {directory}: not a directory")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoraError(f"--init-adapters {directory}: no {CONFIG_FILE} (not a peft adapter)") from None
    except (ValueError, OSError, RecursionError) as err:
        raise LoraError(f"--init-adapters: {path} is unreadable or not JSON ({err})") from None
    if not isinstance(values, dict):
        raise LoraError(f"--init-adapters: {path} is not a JSON object")
    return values


def check_adapter_config(directory: Path, values: dict[str, Any], lora: LoraConfig) -> None:
    """Refuses an adapter that is not plain LoRA or whose rank or alpha differ from the run's."""
    where = f"--init-adapters {directory}"
    if values.get("peft_type") != "LORA":
        raise LoraError(f"{where}: peft_type {values.get('peft_type')!r}, not a LoRA adapter")
    for key, plain in PLAIN_LORA.items():
        value = values.get(key, plain)
        if value != plain and not (plain in ({}, None, False) and not value):
            raise LoraError(f"{where}: {key}={value!r} is not supported (plain LoRA only: {key}={plain!r})")
    if values.get("r") != lora.rank:
        raise LoraError(f"{where}: the adapter's rank r={values.get('r')!r}, but --lora-rank {lora.rank}")
    if values.get("lora_alpha") != lora.alpha:
        raise LoraError(
            f"{where}: the adapter's lora_alpha={values.get('lora_alpha')!r}, but --lora-alpha {lora.alpha:g}"
        )


def _listing(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def load_peft_adapter(
    directory: str | Path, config: Lfm2VlConfig, weights: dict[str, AdaptedWeight], lora: LoraConfig
) -> Params:
    """The adapters of a peft adapter directory, in our layout (float32 numpy arrays), checked against the
    run: the same adapted modules (--lora-targets, --freeze), rank and alpha, every tensor's shape."""
    directory = Path(directory)
    check_adapter_config(directory, _read_config(directory), lora)
    path = directory / WEIGHTS_FILE
    try:
        file = SafetensorsFile(path)
    except FileNotFoundError:
        raise LoraError(f"--init-adapters {directory}: no {WEIGHTS_FILE}") from None
    except (OSError, SafetensorsError) as err:
        raise LoraError(f"--init-adapters: {path} is unreadable ({err})") from None
    stored: dict[tuple[str, str], str] = {}
    for key in file.keys():  # noqa: SIM118 (not a dict)
        module, _, part = key.removeprefix(PREFIX).rpartition(".lora_")
        if not key.startswith(PREFIX) or part not in ("A.weight", "B.weight"):
            raise LoraError(f"--init-adapters: {path} holds {key!r}, not a LoRA tensor in peft's naming")
        stored[(canonical_key(module), part[0])] = key
    modules = module_names(config, weights)
    expected = {m for names in modules.values() for m in names}
    found = {module for module, _ in stored}
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing or extra:
        problems = [f"no adapter for {_listing(missing)}"] if missing else []
        problems += [f"adapters for modules this run does not adapt: {_listing(extra)}"] if extra else []
        raise LoraError(
            f"--init-adapters {directory}: its targets do not match the run's ({'; '.join(problems)}); "
            "set --lora-targets and --freeze as the adapter was trained"
        )
    adapters = {}
    for name, w in weights.items():
        parts: dict[str, list[np.ndarray]] = {"a": [], "b": []}
        shapes = {"A": (lora.rank, _flat(w.input_shape)), "B": (_flat(w.output_shape), lora.rank)}
        for module in modules[name]:
            for part, shape in shapes.items():
                key = stored.get((module, part))
                if key is None:
                    raise LoraError(f"--init-adapters {directory}: no lora_{part} for {module}")
                if file.shape(key) != shape:
                    raise LoraError(
                        f"--init-adapters: {path}: {key} has shape {file.shape(key)}, expected {shape} "
                        f"(rank {lora.rank})"
                    )
                x = file.read(key).astype(np.float32)
                if not np.isfinite(x).all():
                    raise LoraError(f"--init-adapters: {path}: {key} holds NaN or infinite values")
                if part == "A":
                    parts["a"].append(x.T.reshape(*w.input_shape, lora.rank))
                else:
                    parts["b"].append(x.T.reshape(lora.rank, *w.output_shape))
        adapters[name] = {k: np.stack(v) if w.stacked else v[0] for k, v in parts.items()}
    return adapters
