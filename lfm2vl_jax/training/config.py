"""`SFTConfig`: every option of a fine-tuning run, as `lfm2vl train` and `--config run.yaml` name them
(dashes become underscores), checked before anything is loaded."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..config import REMAT_POLICIES, Quantization
from ..errors import Lfm2VlError
from .lora import TARGET_GROUPS, check_dropout
from .optimizer import COMPONENTS

DTYPES = ("float32", "bfloat16")


class TrainingError(Lfm2VlError):
    """A fine-tuning run that cannot start or continue as asked (options, output directory, resources)."""


def _names(value: str | Sequence[str] | None, flag: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TrainingError(f"{flag} must be comma-separated names or a list of names, got {value!r}")
    return tuple(v.strip() for v in value if v.strip())


def _multipliers(value: str | Mapping[str, float] | None) -> dict[str, float]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        items = value.items()
    else:
        items = []
        for part in _names(value, "--lr-multiplier"):
            name, sep, number = part.partition("=")
            if not sep:
                raise TrainingError(f"--lr-multiplier {value!r}: expected component=factor pairs")
            items.append((name.strip(), number))
    out = {}
    for name, number in items:
        try:
            out[name] = float(number)
        except (TypeError, ValueError):
            raise TrainingError(f"--lr-multiplier: {name}={number!r} is not a number") from None
        if isinstance(number, bool) or not math.isfinite(out[name]) or out[name] < 0:
            raise TrainingError(f"--lr-multiplier: {name}={number!r} must be a finite number >= 0")
    return out


def _check_number(name: str, value: Any, low: float | None, strict: bool = False) -> None:
    """A finite real number (not a bool), at least `low` (above it if `strict`), named by its flag."""
    flag = f"--{name.replace('_', '-')}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TrainingError(f"{flag} must be a finite number, got {value!r}")
    if low is not None and (value <= low if strict else value < low):
        raise TrainingError(f"{flag} must be {'>' if strict else '>='} {low:g}, got {value!r}")


@dataclasses.dataclass
class SFTConfig:
    """A supervised fine-tuning run (see train/README.md for a walk-through).

    model: checkpoint directory or hub id; data / eval_data: JSONL conversations (image paths relative to
    the file); output: the run directory (metrics.jsonl, checkpoints/, final/).
    steps: the run's total number of optimizer updates (a resumed run continues to it).
    batch_size: conversations per update over all devices and micro-batches; grad_accum: micro-batches
    per update (each batch_size / grad_accum conversations).
    dtype: compute dtype (weights are kept and updated in float32); default float32 on CPU, bfloat16
    elsewhere. mesh: "data=D,fsdp=F,tensor=T" (default: every device on `data`).
    freeze: components that do not train (vision, projector, language); lr_multiplier: per-component
    factors on the learning rate. lora_rank > 0: train LoRA adapters (see `training.lora`) instead of
    the weights of the components that are not frozen; lora_dropout: peft's dropout on the adapters'
    inputs; init_adapters: a peft adapter directory to start the adapters from. quantize ("int8", "int4";
    quant_group_size for int4): QLoRA, the frozen base held quantized (its projections; embeddings stay
    float), the adapters in float32.
    coordinator_timeout: seconds a multi-process run waits for its processes to connect.
    keep_other_files: train into an existing --output directory that holds other files (they are kept).
    skip_nonfinite: skip an update whose loss or gradient norm is not finite (counted in the metrics)
        instead of stopping the run.
    """

    model: str
    data: str
    output: str
    eval_data: str | None = None
    eval_every: int = 0  # 0: evaluate at the end only (when there is eval data)
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 2e-5
    warmup_steps: int = 0  # > 0: wins over warmup_ratio (transformers' rule)
    warmup_ratio: float = 0.0  # share of `steps` warming up, rounded up (at most steps - 1)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    dtype: str | None = None
    mesh: str | Mapping[str, int] | None = None
    save_every: int = 100
    keep: int = 3
    resume: bool = False
    freeze: str | Sequence[str] | None = None
    lr_multiplier: str | Mapping[str, float] | None = None
    lora_rank: int = 0
    lora_alpha: float = 8.0
    lora_targets: str | Sequence[str] = TARGET_GROUPS
    lora_dropout: float = 0.0
    init_adapters: str | None = None
    quantize: str | None = None
    quant_group_size: int | None = None
    max_length: int = 2048
    skip_bad: bool = False
    remat: str = "none"
    scan_layers: bool = True
    loss_chunk_tokens: int = 2048
    data_threads: int = 4
    tensorboard: bool = False
    peak_tflops: float | None = None
    progress: bool = True
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    coordinator_timeout: int = 300  # seconds to wait for every process to reach the coordinator
    keep_other_files: bool = False  # write the run into an --output holding other files (kept)
    skip_nonfinite: bool = False  # skip (not apply) an update whose loss or gradient is NaN or inf

    def __post_init__(self):
        self.freeze = _names(self.freeze, "--freeze")
        self.lora_targets = _names(self.lora_targets, "--lora-targets")
        self.lr_multiplier = _multipliers(self.lr_multiplier)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "bool" and not isinstance(value, bool):
                raise TrainingError(f"--{field.name.replace('_', '-')} must be true or false, got {value!r}")
        # Numbers that would otherwise train to NaN, or not train at all, without a word.
        for name, low in (("learning_rate", 0.0), ("weight_decay", 0.0), ("max_grad_norm", 0.0)):
            _check_number(name, getattr(self, name), low)
        _check_number("lora_alpha", self.lora_alpha, None)
        _check_number("warmup_ratio", self.warmup_ratio, 0.0)
        if self.warmup_ratio >= 1:
            raise TrainingError(f"--warmup-ratio must be below 1, got {self.warmup_ratio!r}")
        if self.peak_tflops is not None:
            _check_number("peak_tflops", self.peak_tflops, 0.0, strict=True)
        positive = ("steps", "batch_size", "grad_accum", "save_every", "keep", "max_length")
        for name in (*positive, "loss_chunk_tokens", "data_threads", "coordinator_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("eval_every", "lora_rank", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TrainingError(f"--{name.replace('_', '-')} must be an integer >= 0, got {value!r}")
        if self.batch_size % self.grad_accum:
            raise TrainingError(
                f"--batch-size {self.batch_size} is not a multiple of --grad-accum {self.grad_accum}"
            )
        unknown = sorted(set(self.freeze) - set(COMPONENTS))
        if unknown:
            raise TrainingError(
                f"--freeze: unknown components {unknown} (components: {', '.join(COMPONENTS)})"
            )
        if set(self.freeze) == set(COMPONENTS):
            raise TrainingError("--freeze: every component is frozen; nothing would train")
        unknown = sorted(set(self.lr_multiplier) - set(COMPONENTS))
        if unknown:
            raise TrainingError(
                f"--lr-multiplier: unknown components {unknown} (components: {', '.join(COMPONENTS)})"
            )
        unknown = sorted(set(self.lora_targets) - set(TARGET_GROUPS))
        if unknown or not self.lora_targets:
            raise TrainingError(
                f"--lora-targets: {unknown or 'none given'}; choose from {', '.join(TARGET_GROUPS)}"
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise TrainingError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise TrainingError(f"--remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")
        if self.eval_every and not self.eval_data:
            raise TrainingError("--eval-every needs --eval-data")
        if check_dropout(self.lora_dropout) is not None:
            raise TrainingError(check_dropout(self.lora_dropout))
        for name, given in (("--lora-dropout", self.lora_dropout), ("--init-adapters", self.init_adapters)):
            if given and not self.lora_rank:
                raise TrainingError(f"{name} applies to LoRA runs: give --lora-rank too")
        if self.quantize is not None or self.quant_group_size is not None:
            if not self.lora_rank:
                raise TrainingError(
                    "--quantize holds the frozen base quantized (QLoRA): give --lora-rank too"
                )
            if self.quantize is None:
                raise TrainingError("--quant-group-size is for --quantize int4")
            try:
                self.quantization()
            except Lfm2VlError as err:
                raise TrainingError(f"--quantize {self.quantize}: {err}") from None
        if self.lora_rank and set(self.freeze) >= {"vision", "language"}:
            raise TrainingError("--lora-rank: vision and language are both frozen; no weight to adapt")

    def quantization(self) -> Quantization | None:
        """The frozen base's quantization (QLoRA): its projections; the embeddings stay float."""
        if self.quantize is None:
            return None
        return Quantization(self.quantize, self.quant_group_size, embeddings=False)

    @property
    def warmup(self) -> int:
        """Warmup steps: --warmup-steps when given (> 0), else ceil(--warmup-ratio x --steps) as transformers
        computes it, capped at steps - 1 so that a short run (--steps 1 included) still reaches the peak
        learning rate on its last update."""
        if self.warmup_steps:
            return self.warmup_steps
        return min(math.ceil(self.warmup_ratio * self.steps), self.steps - 1)

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    @property
    def trained_components(self) -> tuple[str, ...]:
        return tuple(name for name in COMPONENTS if name not in self.freeze)

    def run_settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues (they fix the data order, the
        trained parameters and their layout)."""
        return {
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "seed": self.seed,
            "max_length": self.max_length,
            "freeze": list(self.freeze),
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "lora_targets": list(self.lora_targets),
            "lora_dropout": self.lora_dropout,
            "quantize": self.quantize,
            "quant_group_size": self.quant_group_size,
            "scan_layers": self.scan_layers,
            "skip_bad": self.skip_bad,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> SFTConfig:
        """From a mapping such as a parsed run.yaml (keys as the flags, dashes or underscores)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        normalized = {key.replace("-", "_"): value for key, value in values.items()}
        unknown = sorted(set(normalized) - fields)
        if unknown:
            raise TrainingError(f"{source}: unknown options {unknown}")
        missing = sorted(k for k in ("model", "data", "output") if normalized.get(k) is None)
        if missing:
            raise TrainingError(f"{source}: missing {', '.join('--' + k for k in missing)}")
        return cls(**normalized)
