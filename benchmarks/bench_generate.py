"""Generation benchmark: ours vs transformers on the same random weights, in the same run.

Models: the real LFM2-VL-450M shapes (released config) and 1.6B shapes (reconstructed config), random
weights of realistic scale saved by transformers and loaded by both. Workloads:
- prefill: one 512x512 image + a 24-token prompt, time to the first token;
- decode: tokens/s at batch 1, 8, 32 with 128 new tokens (24-token text prompts, no early stop), with
  the device loop (generate's default) and the host loop (used when streaming);
- end to end: one 1024x1024 image, a short prompt, 100 new tokens, preprocessing included.
On CPU it also reports the decode roofline: (text-tower weight bytes read per step) / (read bandwidth
measured in this run by a large reduction), and our and transformers' batch-1 fraction of it.

Prints one JSON line, then a table. Ratios compare the two in the same run; absolute times depend on the
machine and its load (run it on an idle machine).

    python benchmarks/bench_generate.py [--models 450m 1.6b] [--dtype float32|bfloat16] [--batches 1 8 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from processor_fixtures import make_checkpoint_dir, make_reference_processor, synthetic_image  # noqa: E402
from reference_models import REFERENCE_CONFIGS, randomize_weights  # noqa: E402

from lfm2vl_jax import Lfm2VlForConditionalGeneration, Lfm2VlProcessor  # noqa: E402
from lfm2vl_jax.inference import engine  # noqa: E402
from lfm2vl_jax.nn.params import tree_bytes  # noqa: E402

MODELS = {"450m": "lfm2-vl-450m", "1.6b": "lfm2-vl-1.6b"}
DTYPES = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call (compilation, caches)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sync(result: object) -> object:
    jax.block_until_ready(result)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result


def read_bandwidth() -> float:
    """Bytes/s of a jitted sum over 400 MB: what a memory-bound decode step can at best stream."""
    x = jnp.ones((100_000_000,), jnp.float32)
    total = jax.jit(jnp.sum)
    seconds = timed(lambda: sync(total(x)), 10)
    return x.nbytes / seconds


class Setup:
    """One checkpoint directory (processor files + transformers-saved random weights), both models."""

    def __init__(self, name: str, directory: Path, dtype: str, scan_layers: bool):
        jax_dtype, torch_dtype = DTYPES[dtype]
        make_checkpoint_dir(directory, MODELS[name])
        from transformers import Lfm2VlConfig as HfConfig
        from transformers import Lfm2VlForConditionalGeneration as HfModel

        raw = json.loads((REFERENCE_CONFIGS / MODELS[name] / "config.json").read_text())
        config = HfConfig(**{k: v for k, v in raw.items() if k != "model_type"})
        torch.manual_seed(0)
        reference = randomize_weights(HfModel(config).float(), seed=0)
        reference.save_pretrained(directory)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.reference = reference.to(self.device, torch_dtype).eval()
        self.reference_processor = make_reference_processor(directory)
        self.processor = Lfm2VlProcessor.from_pretrained(directory)
        self.model = Lfm2VlForConditionalGeneration.from_pretrained(
            directory, dtype=jax_dtype, scan_layers=scan_layers, progress=False
        )
        self.directory = directory

    def torch_inputs(self, inputs: dict) -> dict:
        return {k: torch.as_tensor(np.asarray(v)).to(self.device) for k, v in inputs.items()}

    def image_prompt(self, size: int, text: str) -> dict:
        image = synthetic_image(size, size)
        conversation = [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}
        ]
        return self.processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True
        )


def ours_run(model: Lfm2VlForConditionalGeneration, inputs: dict, new_tokens: int, loop: str = "host"):
    """The engine's states for `inputs` (prefill first), never stopping early (no stop tokens)."""
    request = model.request(dict(inputs), new_tokens, seed=0, options={"eos_token_id": []})
    return engine.run(model.params, model.config, request, loop=loop)


def prefill_seconds(setup: Setup, repeats: int) -> dict:
    inputs = setup.image_prompt(512, "Describe this image in detail, please, with every object you see.")
    ours = timed(lambda: sync(next(ours_run(setup.model, inputs, 1)).tokens), repeats)
    torch_inputs = setup.torch_inputs(inputs)
    with torch.no_grad():
        reference = timed(lambda: sync(setup.reference(**torch_inputs, use_cache=True).logits), repeats)
    return {"prompt_tokens": int(inputs["input_ids"].shape[1]), "ours_s": ours, "transformers_s": reference}


def ours_decode_tokens_per_s(
    model: Lfm2VlForConditionalGeneration, inputs: dict, new_tokens: int, loop: str = "host"
) -> float:
    def decode_only() -> float:
        steps = ours_run(model, inputs, new_tokens, loop)
        sync(next(steps).tokens)
        start = time.perf_counter()
        *_, last = steps
        sync(last.tokens)
        return time.perf_counter() - start

    decode_only()  # compile
    seconds = statistics.median(decode_only() for _ in range(2))
    return inputs["input_ids"].shape[0] * (new_tokens - 1) / seconds


def reference_decode_tokens_per_s(setup: Setup, inputs: dict, new_tokens: int) -> float:
    torch_inputs = setup.torch_inputs(inputs)

    def generate(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            sync(
                setup.reference.generate(**torch_inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            )
        return time.perf_counter() - start

    generate(2)  # warm-up
    total, first = generate(new_tokens), generate(1)
    return inputs["input_ids"].shape[0] * (new_tokens - 1) / (total - first)


def text_batch(batch: int, length: int = 24) -> dict:
    rng = np.random.default_rng(batch)
    ids = rng.integers(1000, 60000, (batch, length))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def end_to_end_seconds(setup: Setup, new_tokens: int) -> dict:
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": synthetic_image(1024, 1024)},
                {"type": "text", "text": "What is in this image?"},
            ],
        }
    ]

    def ours() -> object:
        inputs = setup.processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return setup.model.generate(**inputs, max_new_tokens=new_tokens, eos_token_id=[])

    def reference() -> object:
        inputs = setup.reference_processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        ).to(setup.device)
        with torch.no_grad():
            return sync(
                setup.reference.generate(
                    **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
                )
            )

    return {"ours_s": timed(ours, 1), "transformers_s": timed(reference, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["450m"])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--scan-layers", action="store_true", help="scanned layer layout (default: per-layer)"
    )
    args = parser.parse_args()

    device = jax.devices()[0]
    report = {
        "benchmark": "generate",
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "host": platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "layout": "scan" if args.scan_layers else "per-layer",
        "models": {},
    }
    bandwidth = read_bandwidth() if device.platform == "cpu" else None
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            setup = Setup(name, Path(tmp), args.dtype, args.scan_layers)
            result: dict = {"prefill": prefill_seconds(setup, args.repeats), "decode": {}}
            for batch in args.batches:
                inputs = text_batch(batch)
                result["decode"][batch] = {
                    "ours_tok_s": ours_decode_tokens_per_s(setup.model, inputs, args.new_tokens, "device"),
                    "ours_host_loop_tok_s": ours_decode_tokens_per_s(
                        setup.model, inputs, args.new_tokens, "host"
                    ),
                    "transformers_tok_s": reference_decode_tokens_per_s(setup, inputs, args.new_tokens),
                }
            result["end_to_end"] = end_to_end_seconds(setup, 100)
            if bandwidth:
                step_bytes = tree_bytes(setup.model.params["text"])
                roofline = bandwidth / step_bytes
                one = result["decode"].get(1)
                result["roofline"] = {
                    "read_GB_s": bandwidth / 1e9,
                    "text_weight_GB": step_bytes / 1e9,
                    "batch1_tok_s": roofline,
                    "ours_fraction": one and one["ours_tok_s"] / roofline,
                    "ours_host_loop_fraction": one and one["ours_host_loop_tok_s"] / roofline,
                    "transformers_fraction": one and one["transformers_tok_s"] / roofline,
                }
            report["models"][name] = result
            del setup
    print(json.dumps(report))
    print_table(report)


def print_table(report: dict) -> None:
    print(f"\n{report['device']} ({report['host']}), {report['dtype']}, {report['layout']} layout")
    print(f"{'model':<6}{'workload':<30}{'ours':>10}{'transformers':>14}{'ours/hf':>9}")
    for name, r in report["models"].items():
        p, e = r["prefill"], r["end_to_end"]
        rows = [(f"prefill {p['prompt_tokens']} tok (s)", p["ours_s"], p["transformers_s"], False)]
        for batch, d in r["decode"].items():
            rows.append((f"decode b={batch} (tok/s)", d["ours_tok_s"], d["transformers_tok_s"], True))
            rows.append(
                (f"  host loop b={batch} (tok/s)", d["ours_host_loop_tok_s"], d["transformers_tok_s"], True)
            )
        rows.append(("end-to-end 1024px+100 (s)", e["ours_s"], e["transformers_s"], False))
        for label, ours, reference, higher_is_better in rows:
            ratio = ours / reference if higher_is_better else reference / ours
            print(f"{name:<6}{label:<30}{ours:>10.3f}{reference:>14.3f}{ratio:>9.2f}")
        if "roofline" in r:
            f = r["roofline"]
            print(
                f"{name:<6}roofline b=1: {f['batch1_tok_s']:.1f} tok/s ({f['text_weight_GB']:.2f} GB at "
                f"{f['read_GB_s']:.1f} GB/s); ours {f['ours_fraction']:.2f} (host loop "
                f"{f['ours_host_loop_fraction']:.2f}), transformers {f['transformers_fraction']:.2f}"
            )
    print("(ours/hf > 1: ours is faster; ours = generate's default, the device loop)")


if __name__ == "__main__":
    main()
