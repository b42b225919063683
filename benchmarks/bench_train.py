"""Fine-tuning benchmark: our train step vs a transformers training step (forward, backward, global-norm
clipping, AdamW) on the same random weights and the same batch, alternating in blocks in the same run.

Models: the LFM2-VL-450M shapes (released config) and 1.6B shapes (reconstructed config), random weights
of realistic scale saved by transformers and loaded by both. Batch: `--batch` conversations of about
`--tokens` tokens each (one 512x512 image, 256 image tokens, a question and a long answer), built by our
data pipeline (stand-in tokenizer); transformers gets the same ids, pixels and -100 labels off the loss
tokens. Both run full fine-tuning; `--dtype` is the compute dtype (ours: bf16 matmuls on float32 master
weights; transformers: the model cast to bf16). `--remat full` recomputes each layer in the backward pass
on both sides (ours: `RuntimeConfig.remat`; transformers: activation checkpointing).

With `--lora-rank R` two more sides train LoRA adapters of rank R on every attention, MLP and short-conv
projection of the vision and text towers (peft's targets written as full module names), starting from the
same adapters (ours drawn, saved in peft's format, loaded by both): ours (`ours-lora`, applied unmerged)
and transformers + peft (`peft-lora`, `PeftModel.from_pretrained(..., is_trainable=True)`). Use it with
`--remat full` for the comparison with gradient checkpointing on both sides. `--quantize int4` (or int8)
holds our LoRA side's frozen projections quantized (QLoRA; peft's side stays float: bitsandbytes' 4-bit
layers need CUDA).

Each side runs in its own subprocess, one block of `--steps` timed steps (after a warm-up step) at a
time, the sides alternating for `--rounds` rounds: a training step holds the params, gradients, AdamW
state and activations of one side, and on a small machine the two sides do not fit together. Our compiled
step is cached on disk between blocks. Reported per model: step time (median over all blocks), tokens/s
(non-padding input tokens), MFU (model FLOPs of `training.metrics.step_flops` over the device's peak; on
CPU, whose datasheet peak is unknown, over the throughput of a large matmul measured in this run: an
achievable peak, not a datasheet one) and peak memory (CPU: the subprocess's peak RSS, framework
included; accelerators: the allocator's peak). A model whose float32 params, gradients and AdamW state
alone do not fit this machine's available memory is reported as skipped.

Prints one JSON line, then a table. Ratios compare the two in the same run; absolute times depend on the
machine and its load.

    python benchmarks/bench_train.py [--models 450m 1.6b] [--dtype float32|bfloat16] [--batch 1]
        [--remat none|full] [--rounds 2] [--steps 3] [--ours-only] [--lora-rank R [--quantize int4]
        [--lora-only]]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pair import MODELS, raw_config  # noqa: E402
from processor_fixtures import make_checkpoint_dir, synthetic_image  # noqa: E402
from reference_models import randomize_weights  # noqa: E402

from lfm2vl_jax.config import config_from_dict  # noqa: E402
from lfm2vl_jax.nn.params import abstract_params, tree_bytes  # noqa: E402
from lfm2vl_jax.processing.processor import Lfm2VlProcessor  # noqa: E402
from lfm2vl_jax.training.data import BatchLoader, BatchPlan, RowSlice, read_conversations  # noqa: E402
from lfm2vl_jax.training.lora import LoraConfig, init_adapters  # noqa: E402
from lfm2vl_jax.training.metrics import adapter_sizes, batch_counts, peak_flops, step_flops  # noqa: E402
from lfm2vl_jax.training.peft_adapter import load_peft_adapter, save_peft_adapter  # noqa: E402
from lfm2vl_jax.training.step import Trainable  # noqa: E402

LEARNING_RATE, MAX_GRAD_NORM = 1e-5, 1.0
SENTENCE = "The photo shows a woman in a naval uniform standing in front of a blue wall. "
ALL = {"vision": True, "projector": True, "text": True}
NONE = {"vision": False, "projector": False, "text": False}
LORA_COMPONENTS = ("vision", "text")
SIDES = ("ours", "transformers", "ours-lora", "peft-lora")


def matmul_flops_per_s(dtype: str) -> float:
    """Throughput of a large jitted matmul: what this device sustains on dense math."""
    n = 2048
    a = jnp.ones((n, n), jnp.dtype(dtype))
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a))
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def available_bytes() -> int:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(meminfo["MemAvailable"].split()[0]) * 1024


# The material (parent process) --------------------------------------------------------------------------


def write_material(name: str, directory: Path, batch: int, tokens: int) -> Path:
    """A checkpoint directory with transformers-saved random weights and processor files, and train.jsonl:
    `batch` conversations of about `tokens` tokens (one 512x512 image, a question, a long answer)."""
    import torch
    from PIL import Image
    from transformers import Lfm2VlConfig as HfConfig
    from transformers import Lfm2VlForConditionalGeneration as HfModel

    make_checkpoint_dir(directory, MODELS[name])
    raw = raw_config(name)
    torch.manual_seed(0)
    model = randomize_weights(
        HfModel(HfConfig(**{k: v for k, v in raw.items() if k != "model_type"})), seed=0
    )
    model.save_pretrained(directory)
    del model
    processor = Lfm2VlProcessor.from_pretrained(directory)
    per_sentence = len(processor.tokenizer.encode(SENTENCE, add_special_tokens=False).ids)
    lines = []
    for i in range(batch):
        Image.fromarray(synthetic_image(512, 512, seed=i)).save(directory / f"image_{i}.png")
        content = [{"type": "image", "image": f"image_{i}.png"}, {"type": "text", "text": "Describe it."}]
        answer = SENTENCE * max(1, (tokens - 300) // per_sentence)
        messages = [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
        lines.append(json.dumps({"messages": messages}))
    (directory / "train.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def load_batch(directory: Path, batch: int, max_length: int) -> tuple[dict, list, Lfm2VlProcessor]:
    """Our loader's batch (K=1) of the conversations, the examples in its row order, the processor."""
    processor = Lfm2VlProcessor.from_pretrained(directory)
    dataset = read_conversations(directory / "train.jsonl", processor, max_length)
    max_patches = processor.image_processor.max_num_patches
    plan = BatchPlan(dataset.examples, batch, max_length=max_length, max_patches=max_patches)
    local = next(BatchLoader(dataset, plan, processor, RowSlice(0, batch), max_length).iterator(1))
    return local, [dataset.examples[i] for i in plan.step(0).rows[0]], processor


# One side (subprocess) ----------------------------------------------------------------------------------


def ours_step(directory: Path, args: argparse.Namespace, lora: bool = False):
    from lfm2vl_jax.checkpoint.hf import load_hf_checkpoint
    from lfm2vl_jax.config import DTypePolicy, Quantization, RuntimeConfig
    from lfm2vl_jax.parallel.mesh import make_mesh
    from lfm2vl_jax.training.optimizer import OptimizerConfig, make_optimizer, parameter_labels
    from lfm2vl_jax.training.step import (
        Trainable,
        TrainState,
        abstract_state,
        make_train_step,
        state_shardings,
    )
    from lfm2vl_jax.training.trainer import global_batch

    local, _, _ = load_batch(directory, args.batch, args.max_length)
    mesh = make_mesh()
    dtypes = DTypePolicy(params=jnp.float32, compute=jnp.dtype(args.dtype))
    quantization = Quantization(args.quantize, embeddings=False) if lora and args.quantize != "none" else None
    runtime = RuntimeConfig(dtypes=dtypes, mesh=mesh, remat=args.remat, quantization=quantization)
    config, params = load_hf_checkpoint(directory, runtime, False)
    trainable = Trainable(config, ("vision", "projector", "text"))
    if lora:
        trainable = Trainable(config, LORA_COMPONENTS, LoraConfig(args.lora_rank))
    options = OptimizerConfig(learning_rate=LEARNING_RATE, total_steps=10**6, max_grad_norm=MAX_GRAD_NORM)
    tx = make_optimizer(options, parameter_labels(trainable.specs()))
    shardings = state_shardings(trainable, tx, abstract_state(trainable, tx))
    create = jax.jit(
        lambda p: TrainState.create(p, tx, jax.random.PRNGKey(0)), out_shardings=shardings, donate_argnums=0
    )
    frozen = {}
    if lora:
        frozen = params
        state = create(load_peft_adapter(directory / "adapter", config, trainable.adapted, trainable.lora))
    else:
        state = create(params)
    train_step = make_train_step(trainable, options.schedule(), shardings, 2048)
    batch = global_batch(local, mesh, config.runtime.rules, 1)

    def step() -> float:
        nonlocal state
        state, metrics = train_step(state, frozen, batch)
        return float(jax.device_get(metrics["loss"]))

    return step


def transformers_step(directory: Path, args: argparse.Namespace, lora: bool = False):
    import torch
    from transformers import Lfm2VlForConditionalGeneration as HfModel

    _, examples, processor = load_batch(directory, args.batch, args.max_length)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = HfModel.from_pretrained(directory, dtype=dtype).to(device).train()
    if args.remat != "none":
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    if lora:
        from peft import PeftModel

        model.enable_input_require_grads()  # checkpointed layers need a grad-requiring input to backprop
        model = PeftModel.from_pretrained(model, directory / "adapter", is_trainable=True).train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=LEARNING_RATE, weight_decay=0.0, eps=1e-8)
    width = max(e.length for e in examples)
    ids = np.full((len(examples), width), processor.pad_token_id, np.int64)
    mask, labels = np.zeros_like(ids), np.full_like(ids, -100)
    images = []
    for row, e in enumerate(examples):
        ids[row, : e.length], mask[row, : e.length] = e.input_ids, 1
        labels[row, : e.length] = np.where(e.loss_mask, e.input_ids, -100)
        images.append(processor(images=[list(e.images)], text=[e.text]))
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for key in ("pixel_values", "pixel_attention_mask", "spatial_shapes"):
        inputs[key] = np.concatenate([out[key] for out in images])
    inputs = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
    inputs["pixel_attention_mask"] = inputs["pixel_attention_mask"].bool()
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, MAX_GRAD_NORM)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    return step


def worker(side: str, directory: Path, args: argparse.Namespace) -> None:
    """One block: a warm-up step, then `--steps` timed steps; prints times, losses and peak memory."""
    make = ours_step if side.startswith("ours") else transformers_step
    step = make(directory, args, lora=side.endswith("lora"))
    losses = [step()]
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    if side == "ours" and jax.default_backend() != "cpu":
        peak = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
    elif side == "transformers" and jax.default_backend() == "gpu":
        import torch

        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"times": times, "losses": losses, "peak_gb": peak / 1e9}))


def run_block(side: str, directory: Path, args: argparse.Namespace, cache: Path) -> dict:
    command = [sys.executable, __file__, "--worker", side, "--material", str(directory)]
    for flag in ("dtype", "batch", "tokens", "remat", "steps", "max_length", "lora_rank", "quantize"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR", str(cache)),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{side} block failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# The comparison -----------------------------------------------------------------------------------------


def benchmark(name: str, args: argparse.Namespace, peak: float) -> dict:
    held = "float32 params" if args.lora_only else "float32 params, gradients and AdamW state"
    need = (1 if args.lora_only else 4) * tree_bytes(abstract_params(config_from_dict(raw_config(name))))
    if jax.default_backend() == "cpu" and need > available_bytes():
        return {
            "skipped": f"{held} alone need {need / 1e9:.1f} GB; {available_bytes() / 1e9:.1f} GB available"
        }
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_material(name, Path(tmp) / "material", args.batch, args.tokens)
        local, _, _ = load_batch(directory, args.batch, args.max_length)
        config = config_from_dict(json.loads((directory / "config.json").read_text()))
        counts = batch_counts(local)
        flops = {side: step_flops(config, counts, ALL, ALL) for side in ("ours", "transformers")}
        sides = [] if args.lora_only else ["ours"] if args.ours_only else ["ours", "transformers"]
        if args.lora_rank:
            lora = Trainable(config, LORA_COMPONENTS, LoraConfig(args.lora_rank))
            adapters = init_adapters(lora.adapted, lora.lora, jax.random.key(0))
            adapters = jax.device_get(adapters)
            save_peft_adapter(directory / "adapter", config, adapters, lora.adapted, lora.lora)
            sizes = adapter_sizes(lora.adapted, args.lora_rank)
            for side in ("ours-lora", "peft-lora"):
                flops[side] = step_flops(config, counts, ALL, NONE, sizes)
            sides += ["ours-lora"] if args.ours_only else ["ours-lora", "peft-lora"]
        blocks: dict[str, list] = {side: [] for side in sides}
        for _ in range(args.rounds):
            for side in blocks:
                blocks[side].append(run_block(side, directory, args, Path(tmp) / "cache"))
    tokens = int(counts["row_lengths"].sum())
    result = {"tokens": tokens, "loss_tokens": counts["loss_tokens"], "step_tflop": flops["ours"] / 1e12}
    for side, runs in blocks.items():
        seconds = statistics.median(t for run in runs for t in run["times"])
        result[side] = {
            "step_s": seconds,
            "tokens_per_s": tokens / seconds,
            "mfu": flops[side] / seconds / peak,
            "peak_gb": max(run["peak_gb"] for run in runs),
            "first_loss": runs[0]["losses"][0],
        }
    if "transformers" in result:
        result["speedup"] = result["transformers"]["step_s"] / result["ours"]["step_s"]
    if "ours-lora" in result and "ours" in result:
        result["lora_over_full_time"] = result["ours-lora"]["step_s"] / result["ours"]["step_s"]
    if "peft-lora" in result:
        result["lora_speedup_over_peft"] = result["peft-lora"]["step_s"] / result["ours-lora"]["step_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["450m"])
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--batch", type=int, default=1, help="conversations per step")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per conversation (about)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--remat", choices=("none", "full"), default="none")
    parser.add_argument("--rounds", type=int, default=2, help="blocks per side, alternating")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per block")
    parser.add_argument("--ours-only", action="store_true", help="no transformers side")
    parser.add_argument("--lora-rank", type=int, default=0, help="also LoRA of this rank: ours and peft's")
    parser.add_argument("--quantize", choices=("none", "int8", "int4"), default="none", help="QLoRA's base")
    parser.add_argument("--lora-only", action="store_true", help="only the LoRA sides (no full fine-tuning)")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--material", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if (args.quantize != "none" or args.lora_only) and not args.lora_rank:
        parser.error("--quantize and --lora-only are about the LoRA sides: give --lora-rank too")
    if args.worker:
        worker(args.worker, args.material, args)
        return

    device = jax.devices()[0]
    peak, peak_source = peak_flops(device)
    if peak is None:
        peak, peak_source = matmul_flops_per_s(args.dtype), f"measured {args.dtype} 2048^3 matmul"
    report = {
        "benchmark": "train",
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "host": platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "batch": args.batch,
        "remat": args.remat,
        "lora_rank": args.lora_rank,
        "quantize": args.quantize,
        "peak_tflops": peak / 1e12,
        "peak_source": peak_source,
        "models": {name: benchmark(name, args, peak) for name in args.models},
    }
    print(json.dumps(report))
    print_table(report)


def print_table(report: dict) -> None:
    print(
        f"\n{report['device']} ({report['host']}), {report['dtype']}, batch {report['batch']}, "
        f"remat {report['remat']}; MFU peak {report['peak_tflops']:.2f} TFLOP/s ({report['peak_source']})"
    )
    print(f"{'model':<6}{'side':<14}{'step s':>9}{'tok/s':>9}{'MFU':>8}{'peak GB':>9}")
    for name, r in report["models"].items():
        if "skipped" in r:
            print(f"{name:<6}skipped: {r['skipped']}")
            continue
        for side in (side for side in SIDES if side in r):
            s = r[side]
            print(
                f"{name:<6}{side:<14}{s['step_s']:>9.3f}{s['tokens_per_s']:>9.0f}{s['mfu']:>8.1%}{s['peak_gb']:>9.2f}"
            )
        if "speedup" in r:
            print(f"{name:<6}ours/transformers speed: {r['speedup']:.2f}x ({r['tokens']} tokens per step)")
        if "lora_over_full_time" in r:
            print(f"{name:<6}our LoRA step / our full step time: {r['lora_over_full_time']:.2f}")
        if "lora_speedup_over_peft" in r:
            print(f"{name:<6}our LoRA / peft LoRA speed: {r['lora_speedup_over_peft']:.2f}x")


if __name__ == "__main__":
    main()
