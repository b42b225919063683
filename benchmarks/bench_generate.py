"""Generation benchmark: ours vs transformers on the same random weights, in the same run.

Models: the real LFM2-VL-450M shapes (released config) and 1.6B shapes (reconstructed config), random
weights of realistic scale. For each model and each text-layer layout (`--layouts`; per-layer is the
default, scanned the compile-time-friendly alternative):
- prefill: one 512x512 image + a 24-token prompt, time to the first token;
- decode: tokens/s at each `--batches` size with `--new-tokens` new tokens (24-token text prompts, no early
  stop), with the device loop (generate's default) and the host loop (used when streaming);
- long contexts: batch-1 decoding after a text prompt of each `--contexts` length (1k and 8k tokens);
- end to end: one 1024x1024 image, a short prompt, 100 new tokens, preprocessing included;
- the decode step's compiled program: kernels per step and bytes copied per step (batch 1).
With `--quantize int8 int4`, each scheme is one more column (weight-only, quantized from the same float
weights, the first layout; `--quantize-embeddings both` adds columns with the embedding / LM head kept
float), and its roofline counts its own (quantized) bytes.
transformers (eager) runs the same workloads once per model, unless `--ours-only` (then torch is never
imported and the weights come from our own initialiser).

Roofline: a batch-1 decode step reads every text-tower weight once, so tokens/s <= bandwidth / weight
bytes. The bandwidth is measured in the same run (`bandwidth.py`: a >= 2 GiB bf16 device-to-device copy on
accelerators, a large reduction on CPUs); fractions are also given against the datasheet bandwidth of known
accelerators.

Prints one JSON line (machine, CPU model, XLA flags, every number), then a table. Ratios compare ours and
transformers in the same run; absolute times depend on the machine and its load.

    python benchmarks/bench_generate.py [--models 450m 1.6b] [--dtype float32|bfloat16] [--batches 1 8 32]
        [--layouts per-layer scan] [--contexts 1024 8192] [--attention auto|blockwise|xla|cudnn]
        [--fused-projections] [--ours-only] [--quantize int8 int4 [--quant-group-size 64]
        [--quantize-embeddings on|off|both]]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np
from bandwidth import call_seconds, fractions, roofline_bandwidth
from machine import machine_description
from pair import DTYPES, MODELS, ModelPair

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hlo_stats import step_stats  # noqa: E402
from processor_fixtures import synthetic_image  # noqa: E402

from lfm2vl_jax import Lfm2VlForConditionalGeneration  # noqa: E402
from lfm2vl_jax.checkpoint.canonical import from_canonical, to_canonical  # noqa: E402
from lfm2vl_jax.config import QUANT_SCHEMES  # noqa: E402
from lfm2vl_jax.inference import engine  # noqa: E402
from lfm2vl_jax.inference.sampling import SamplingParams  # noqa: E402
from lfm2vl_jax.inference.step import decode_step, empty_rows  # noqa: E402
from lfm2vl_jax.nn.params import abstract_params, tree_bytes  # noqa: E402

LAYOUTS = ("per-layer", "scan")


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call (compilation, caches)."""
    return statistics.median(call_seconds(fn, repeats))


def ours_run(model: Lfm2VlForConditionalGeneration, inputs: dict, new_tokens: int, loop: str = "host"):
    """The engine's (state, tokens) for `inputs` (prefill first; tokens read on the host, so each item is
    synchronised), never stopping early (no stop tokens)."""
    request = model.request(dict(inputs), new_tokens, seed=0, options={"eos_token_id": []})
    return engine.run(model.params, model.config, request, loop=loop)


def image_prompt(pair: ModelPair, size: int, text: str) -> dict:
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": synthetic_image(size, size)},
                {"type": "text", "text": text},
            ],
        }
    ]
    return pair.processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True
    )


def text_batch(batch: int, length: int = 24) -> dict:
    rng = np.random.default_rng(batch + length)
    ids = rng.integers(1000, 60000, (batch, length))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


PREFILL_TEXT = "Describe this image in detail, please, with every object you see."


def ours_prefill_seconds(pair: ModelPair, model: Lfm2VlForConditionalGeneration, repeats: int) -> float:
    inputs = image_prompt(pair, 512, PREFILL_TEXT)
    return timed(lambda: next(ours_run(model, inputs, 1)), repeats)


def ours_decode_tokens_per_s(
    model: Lfm2VlForConditionalGeneration, inputs: dict, new_tokens: int, loop: str
) -> float:
    def decode_only() -> float:
        steps = ours_run(model, inputs, new_tokens, loop)
        next(steps)
        start = time.perf_counter()
        for _ in steps:
            pass
        return time.perf_counter() - start

    decode_only()  # compile
    seconds = statistics.median(decode_only() for _ in range(2))
    return inputs["input_ids"].shape[0] * (new_tokens - 1) / seconds


def ours_end_to_end_seconds(pair: ModelPair, model: Lfm2VlForConditionalGeneration, new_tokens: int) -> float:
    conversation = end_to_end_conversation()

    def run() -> object:
        inputs = pair.processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return model.generate(**inputs, max_new_tokens=new_tokens, eos_token_id=[])

    return timed(run, 1)


def end_to_end_conversation() -> list:
    image = synthetic_image(1024, 1024)
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": "What is in this image?"},
            ],
        }
    ]


def decode_step_program(model: Lfm2VlForConditionalGeneration, capacity: int = 1024) -> dict:
    """Kernels and copies of one compiled greedy decode step at batch 1 (the backend's own HLO)."""
    config = model.config
    state = jax.eval_shape(lambda: empty_rows(config, 1, capacity, SamplingParams(), (2,), per_row=False))
    lowered = decode_step.lower(abstract_params(config), config, state)
    stats = step_stats(lowered.compile().as_text())
    return {
        "kernels": stats.total_kernels,
        "by_kind": dict(stats.kernels.most_common()),
        "copied_bytes": stats.copied_bytes,
        "largest_copy_bytes": stats.largest_copy_bytes(),
    }


def ours_workloads(pair: ModelPair, model: Lfm2VlForConditionalGeneration, args: argparse.Namespace) -> dict:
    result: dict = {
        "prefill_s": ours_prefill_seconds(pair, model, args.repeats),
        "decode": {},
        "contexts": {},
    }
    for batch in args.batches:
        inputs = text_batch(batch)
        result["decode"][batch] = {
            loop: ours_decode_tokens_per_s(model, inputs, args.new_tokens, loop) for loop in args.loops
        }
    result["context_prefill_s"] = {}
    for context in args.contexts:
        inputs = text_batch(1, context)
        result["contexts"][context] = ours_decode_tokens_per_s(
            model, inputs, args.context_new_tokens, "device"
        )
        result["context_prefill_s"][context] = timed(
            lambda inputs=inputs: next(ours_run(model, inputs, 1)), 1
        )
    if not args.skip_end_to_end:
        result["end_to_end_s"] = ours_end_to_end_seconds(pair, model, 100)
    result["decode_step_program"] = decode_step_program(model)
    return result


def reference_workloads(pair: ModelPair, args: argparse.Namespace) -> dict:
    import torch

    reference = pair.reference

    def generate(inputs: dict, n: int) -> float:
        torch_inputs = pair.torch_inputs(inputs)
        start = time.perf_counter()
        with torch.no_grad():
            pair.sync(reference.generate(**torch_inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False))
        return time.perf_counter() - start

    def decode_tokens_per_s(inputs: dict, new_tokens: int) -> float:
        generate(inputs, 2)  # warm-up
        total, first = generate(inputs, new_tokens), generate(inputs, 1)
        return inputs["input_ids"].shape[0] * (new_tokens - 1) / (total - first)

    prefill_inputs = pair.torch_inputs(image_prompt(pair, 512, PREFILL_TEXT))

    def prefill() -> object:
        with torch.no_grad():
            logits = reference(**prefill_inputs, use_cache=True, logits_to_keep=1).logits
            return pair.sync(logits[:, -1].argmax(-1))

    result: dict = {"prefill_s": timed(prefill, args.repeats), "decode": {}, "contexts": {}}
    for batch in args.batches:
        result["decode"][batch] = decode_tokens_per_s(text_batch(batch), args.new_tokens)
    for context in args.contexts:
        result["contexts"][context] = decode_tokens_per_s(text_batch(1, context), args.context_new_tokens)
    if not args.skip_end_to_end:

        def end_to_end() -> object:
            from processor_fixtures import make_reference_processor

            processor = make_reference_processor(pair.directory)
            inputs = processor.apply_chat_template(
                end_to_end_conversation(),
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
            ).to(pair.device)
            with torch.no_grad():
                return pair.sync(
                    reference.generate(**inputs, max_new_tokens=100, min_new_tokens=100, do_sample=False)
                )

        result["end_to_end_s"] = timed(end_to_end, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["450m"])
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--contexts", nargs="*", type=int, default=[1024, 8192], help="prompt lengths for batch-1 decoding"
    )
    parser.add_argument("--context-new-tokens", type=int, default=32)
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=["per-layer"])
    parser.add_argument("--loops", nargs="+", choices=["device", "host"], default=["device", "host"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--attention",
        default="auto",
        help="RuntimeConfig.attention of ours (auto, blockwise, xla, cudnn, ...)",
    )
    parser.add_argument(
        "--fused-projections", action="store_true", help="ours with RuntimeConfig.fused_projections"
    )
    parser.add_argument("--ours-only", action="store_true", help="no transformers (torch is not imported)")
    parser.add_argument("--quantize", nargs="*", choices=QUANT_SCHEMES, default=[], help="also these schemes")
    parser.add_argument("--quant-group-size", type=int, help="int4 group size (default 64)")
    parser.add_argument(
        "--quantize-embeddings",
        choices=("on", "off", "both"),
        default="on",
        help="quantized columns with the embedding / LM head quantized, kept float, or both",
    )
    parser.add_argument("--skip-end-to-end", action="store_true")
    args = parser.parse_args()

    bandwidth = roofline_bandwidth()
    report = {
        "benchmark": "generate",
        **machine_description(),
        "dtype": args.dtype,
        "attention": args.attention,
        "fused_projections": args.fused_projections,
        "bandwidth": bandwidth,
        "models": {},
    }
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            first = args.layouts[0] == "scan"
            pair = ModelPair(name, Path(tmp), args.dtype, scan_layers=first, ours_only=args.ours_only)
            result: dict = {"layouts": {}}
            for layout in args.layouts:
                model = pair.ours if (layout == "scan") == first else pair.with_layout(layout == "scan")
                if args.attention != "auto" or args.fused_projections:
                    config = model.config.with_runtime(
                        attention=args.attention, fused_projections=args.fused_projections
                    )
                    params = from_canonical(to_canonical(model.params, model.config), config)
                    model = Lfm2VlForConditionalGeneration(config, params, model.generation_config)
                result["layouts"][layout] = ours_workloads(pair, model, args)
                result.setdefault("text_weight_bytes", {})[layout] = tree_bytes(model.params["text"])
            for column, quantized in quantized_models(pair.ours, args):
                result["layouts"][column] = ours_workloads(pair, quantized, args)
                result["text_weight_bytes"][column] = tree_bytes(quantized.params["text"])
                del quantized
            if not args.ours_only:
                result["transformers"] = reference_workloads(pair, args)
            result["roofline"] = batch1_roofline(result, result["text_weight_bytes"], bandwidth)
            report["models"][name] = result
            del pair
    print(json.dumps(report))
    print_table(report)


def quantized_models(model: Lfm2VlForConditionalGeneration, args: argparse.Namespace) -> Iterator:
    """(column name, model) for each `--quantize` scheme and embeddings choice, one at a time."""
    kept = {"on": [False], "off": [True], "both": [False, True]}[args.quantize_embeddings]
    for scheme in args.quantize:
        for keep in kept:
            group = args.quant_group_size if scheme == "int4" else None
            name = scheme + (f"/g{group}" if group else "") + (" float head" if keep else "")
            yield name, model.quantize(scheme, group, embeddings=not keep)


def batch1_roofline(result: dict, weight_bytes: dict[str, int], bandwidth: dict) -> dict:
    """Batch-1 decode rates as fractions of the rooflines (measured bandwidth; datasheet, if known), each
    column's from its own text-tower bytes (quantized ones' included); transformers' from the first's."""
    datasheet = bandwidth["datasheet_GB_s"]
    first = weight_bytes[next(iter(result["layouts"]))]
    roofline = {
        "text_weight_GB": {column: n / 1e9 for column, n in weight_bytes.items()},
        "batch1_tok_s": {column: bandwidth["GB_s"] * 1e9 / n for column, n in weight_bytes.items()},
        "batch1_tok_s_datasheet": datasheet and datasheet * 1e9 / first,
    }
    rates = {
        f"{layout}_{loop}_loop": (tokens_per_s, weight_bytes[layout])
        for layout, r in result["layouts"].items()
        for loop, tokens_per_s in r["decode"].get(1, {}).items()
    }
    if "transformers" in result and 1 in result["transformers"]["decode"]:
        rates["transformers"] = (result["transformers"]["decode"][1], first)
    roofline["fractions"] = {name: fractions(rate, n, bandwidth) for name, (rate, n) in rates.items()}
    return roofline


def print_table(report: dict) -> None:
    bw = report["bandwidth"]
    print(f"\n{report['device']} ({report['cpu']}), {report['dtype']}, XLA_FLAGS={report['xla_flags']!r}")
    datasheet = f", datasheet {bw['datasheet_GB_s']:.0f} GB/s" if bw["datasheet_GB_s"] else ""
    print(f"bandwidth: {bw['probe']} probe {bw['GB_s']:.1f} GB/s{datasheet}")
    for name, r in report["models"].items():
        layouts = list(r["layouts"])
        hf = r.get("transformers")
        width = max(12, *(len(layout) + 2 for layout in layouts))  # "int8 float head" is 15 characters
        head = f"{name:<6}{'workload':<28}" + "".join(f"{layout:>{width}}" for layout in layouts)
        print("\n" + head + (f"{'transformers':>14}{'ours/hf':>9}" if hf else ""))

        def row(
            label: str,
            values: list,
            reference: float | None,
            higher_is_better: bool,
            name: str = name,
            width: int = width,
        ) -> None:
            line = f"{name:<6}{label:<28}" + "".join(f"{v:>{width}.3f}" for v in values)
            if reference is not None:
                ratio = values[0] / reference if higher_is_better else reference / values[0]
                line += f"{reference:>14.3f}{ratio:>9.2f}"
            print(line)

        ours = [r["layouts"][layout] for layout in layouts]
        row("prefill 512px (s)", [o["prefill_s"] for o in ours], hf and hf["prefill_s"], False)
        for batch in ours[0]["decode"]:
            reference = hf and hf["decode"][batch]
            for loop in ours[0]["decode"][batch]:
                label = f"decode b={batch} (tok/s)" if loop == "device" else f"  {loop} loop b={batch}"
                row(label, [o["decode"][batch][loop] for o in ours], reference, True)
        for context in ours[0]["contexts"]:
            row(
                f"decode at {context} ctx (tok/s)",
                [o["contexts"][context] for o in ours],
                hf and hf["contexts"][context],
                True,
            )
            row(f"prefill {context} ctx (s)", [o["context_prefill_s"][context] for o in ours], None, False)
        if "end_to_end_s" in ours[0]:
            row(
                "end-to-end 1024px+100 (s)",
                [o["end_to_end_s"] for o in ours],
                hf and hf["end_to_end_s"],
                False,
            )
        row("kernels per decode step", [o["decode_step_program"]["kernels"] for o in ours], None, True)
        row(
            "MB copied per decode step",
            [o["decode_step_program"]["copied_bytes"] / 1e6 for o in ours],
            None,
            True,
        )
        f = r["roofline"]
        shares = ", ".join(
            f"{k} {v['measured']:.2f}" + (f" (datasheet {v['datasheet']:.2f})" if "datasheet" in v else "")
            for k, v in f["fractions"].items()
        )
        limits = ", ".join(
            f"{column} {f['batch1_tok_s'][column]:.1f} tok/s ({gb:.2f} GB)"
            for column, gb in f["text_weight_GB"].items()
        )
        print(f"{name:<6}roofline b=1 at {bw['GB_s']:.1f} GB/s ({bw['probe']} probe): {limits}; {shares}")
    print("(ours/hf > 1: ours is faster; ours/hf uses the first layout and the first loop listed)")


if __name__ == "__main__":
    main()
