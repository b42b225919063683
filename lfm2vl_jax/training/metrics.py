"""What a run reports: model FLOPs of a step (for MFU), the device's peak, RUN_DIR/metrics.jsonl,
optional TensorBoard logs and a loss-curve PNG.

Model FLOPs of a step (what the math requires; remat's recomputation not counted), from the batch's real
(non-padding) tokens, tiles and patches. A matmul with a weight of P parameters costs 2P per row forward;
backward costs as much again for the input gradient (when anything before or in the component trains) and
again for the weight gradient (when the weight itself trains). A LoRA adapter of rank r on a weight
(inputs -> outputs) adds its two products, r * (inputs + outputs) parameters, forward, input gradient and
A's and B's gradients: 3x; the frozen weight itself gets no weight gradient. Per component:

    vision    per valid patch: patch embedding + every layer's q, k, v, o, fc1, fc2;
              attention per tile of m valid patches: 4 * m^2 * heads * head_dim per layer
    projector per image token: fc1 + fc2
    text      per token: every layer's projections and MLP, short-conv taps (2 * L * D);
              attention per row of n tokens (causal): 4 * n(n+1)/2 * heads * head_dim per attention layer;
              LM head per loss token: 2 * D * V (only loss positions' logits are needed)

MFU = model FLOPs / (step time * peak FLOP/s * devices). Peak: the dense bf16 datasheet figure of known
accelerators; CPUs have none (their throughput depends on the vector units, clocks and threads in
use), so MFU is null there unless `--peak-tflops` gives one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ATTENTION, CONV, Lfm2VlConfig
from .config import TrainingError
from .lora import AdaptedWeight

# Dense bf16 peak FLOP/s per device, by a substring of `device.device_kind`.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
}


def peak_flops(device: Any, override_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s of one device or None, where the figure comes from)."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops, f"datasheet dense bf16 peak of {name}"
    if device.platform == "cpu":
        return None, "no datasheet peak for CPUs; pass --peak-tflops to set one"
    return None, f"unknown device kind {kind!r}; pass --peak-tflops to set its peak"


def _weights(config: Lfm2VlConfig) -> dict[str, float]:
    """Matmul parameters applied per row of each kind (vision patch, image token, text token) and per
    LM-head position."""
    v, t = config.vision, config.text
    vision_layer = 4 * v.hidden_size * v.hidden_size + 2 * v.hidden_size * v.intermediate_size
    patch_embed = v.num_channels * v.patch_size**2 * v.hidden_size
    projector = config.projector_in_size * config.projector_hidden_size
    projector += config.projector_hidden_size * t.hidden_size
    d = t.hidden_size
    mlp = 3 * d * t.intermediate_size
    attention = d * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads)
    conv = 4 * d * d + t.conv_kernel_size * d  # in_proj (3D), out_proj, depthwise taps
    text = sum(mlp + (conv if kind == CONV else attention) for kind in t.layer_types)
    return {
        "vision": patch_embed + v.num_layers * vision_layer,
        "projector": projector,
        "text": text,
        "head": d * t.vocab_size,
    }


def adapter_sizes(weights: dict[str, AdaptedWeight], rank: int) -> dict[str, float]:
    """LoRA's matmul parameters applied per row, by component ("vision": per patch, "text": per token)."""
    sizes: dict[str, float] = {}
    for w in weights.values():
        layers = int(np.prod(w.shape[: w.stacked]))
        per_row = layers * rank * (int(np.prod(w.input_shape)) + int(np.prod(w.output_shape)))
        sizes[str(w.path[0])] = sizes.get(str(w.path[0]), 0.0) + per_row
    return sizes


def batch_counts(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Host-side counts of a (process-local) batch that the FLOP formula needs."""
    counts = {
        "row_lengths": batch["attention_mask"].sum(axis=-1).reshape(-1),
        "loss_tokens": int(batch["loss_mask"][..., 1:].sum()),
    }
    if "spatial_shapes" in batch:
        shapes = batch["spatial_shapes"].reshape(-1, 2)
        real = shapes.prod(axis=1) > 1  # padding tiles are 1x1
        counts["tile_patches"] = shapes[real].prod(axis=1)
    return counts


def step_flops(
    config: Lfm2VlConfig,
    counts: dict[str, Any],
    trains: dict[str, bool],
    full_weights: dict[str, bool],
    adapters: dict[str, float] | None = None,
) -> float:
    """Model FLOPs of one step (see the module docstring). trains[c]: whether c or anything before it
    trains (its input gradients are needed); full_weights[c]: whether c's own weights train (not LoRA);
    adapters: LoRA's parameters per row by component (`adapter_sizes`)."""
    adapters = adapters or {}
    w = _weights(config)
    v, t = config.vision, config.text

    def factor(component: str) -> int:  # forward, input gradient, weight gradient
        return 1 + trains[component] + (trains[component] and full_weights[component])

    lengths = np.asarray(counts["row_lengths"], np.float64)
    attention_layers = sum(kind == ATTENTION for kind in t.layer_types)
    text = 2 * w["text"] * lengths.sum() * factor("text") + 6 * adapters.get("text", 0.0) * lengths.sum()
    text += (
        4
        * t.num_heads
        * t.head_dim
        * attention_layers
        * (lengths * (lengths + 1) / 2).sum()
        * (1 + 2 * trains["text"])
    )
    text += 2 * w["head"] * counts["loss_tokens"] * factor("text")
    total = text
    patches = np.asarray(counts.get("tile_patches", []), np.float64)
    if patches.size:
        image_tokens = (patches / config.downsample_factor**2).sum()
        total += 2 * w["projector"] * image_tokens * factor("projector")
        total += (2 * w["vision"] * factor("vision") + 6 * adapters.get("vision", 0.0)) * patches.sum()
        total += 4 * v.hidden_size * v.num_layers * (patches**2).sum() * (1 + 2 * trains["vision"])
    return float(total)


class MetricsLog:
    """RUN_DIR/metrics.jsonl: one JSON object per line, flushed as written (a killed run loses at most
    the line being written)."""

    def __init__(self, path: Path):
        self.path = path
        self.file = None

    def keep_until(self, step: int) -> None:
        """Drops the lines of steps after `step` (and a torn last line): a resumed run rewrites them."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        temporary = self.path.with_suffix(".jsonl.tmp")
        temporary.write_text("".join(f"{line}\n" for line in kept))
        temporary.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held open for the run)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class TensorBoard:
    """Scalars to RUN_DIR/tensorboard with tensorboardX (the `train` extra)."""

    def __init__(self, directory: Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise TrainingError("--tensorboard needs tensorboardX: pip install 'lfm2vl-jax[train]'") from None
        self.writer = SummaryWriter(str(directory))

    def write(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.writer.close()


def plot_losses(metrics_file: Path, out: Path) -> bool:
    """A loss-curve PNG (train loss per step, eval loss where measured), if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        axes.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return True
