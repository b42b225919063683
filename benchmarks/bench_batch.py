"""Continuous batching vs static batches, same model, same requests, same run.

Workload: N requests (default 224) of realistic variety: 20% text-only questions, 65% one image (400x300
or 640x480, both resized by the processor: 108 or 234 image tokens), 15% two images, and with `--tiled`
a share of 1024x768 images that the processor tiles (6 tiles, ~1.5k tokens; off by default to keep the
CPU run in minutes); the prompt text varies too. Output lengths follow a mixture typical of VQA and
captioning: 35% short answers (2-16 tokens), 45% captions (24-96), 20% long descriptions (128-256); every
request is allowed up to `--max-new-tokens` (256). Greedy decoding with a repetition penalty of 2 (random
weights fall into a one-token loop otherwise, and the stop tokens below could not be arranged).

Random weights stop at random (almost never), so the lengths are arranged with stop tokens: a pilot run
of the continuous engine generates each request's first `target` tokens; the token at the target position
(or, if it occurred earlier, the last new token before it) becomes that request's stop token, and in the
timed continuous run each request stops exactly there. `generate` takes one stop set per call (and these
random models' outputs share tokens, so a union of the batch's stop tokens would stop rows on their
neighbours' tokens): each static batch runs until its longest row's length, rows cut to their own, which
is what per-row stops would cost. The pilot and a first, untimed pass compile the engine's programs (its
prefill groups form as requests become ready and slots free, so each pass meets some new bucket); a
warm-up of the static batches (every row stopping at its first token) compiles theirs. Compilations
during the timed runs are counted, and the JSON says how many outputs of the two agree (all, unless
float rounding changed a greedy choice).

- static: `model.generate` on consecutive batches of `--slots` requests (processor run per batch, then
  generate; each batch decodes until its longest row stops);
- continuous: `model.batch_engine(processor, slots=--slots)`: preprocessing on worker threads, slots
  refilled as requests finish.

Also reports the preprocessing rate of this workload (images/s, requests/s) with 1..N worker threads and
processes, to set beside the engine's request rate. Prints one JSON line, then a table.

    python benchmarks/bench_batch.py [--model small|450m] [--requests 224] [--slots 16] [--repeats 1]

`small` (default): a scaled-down LFM2-VL (text width 256, 8 layers in LFM2's conv/attention mix, 65536
vocabulary; 2-layer vision tower of width 128) with the 450M's processor settings, so that the run takes
minutes on a CPU; `450m`: the released 450M shapes (for a GPU or a patient CPU).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from compile_counter import CompileCounter  # noqa: E402
from machine import machine_description  # noqa: E402
from processor_fixtures import make_checkpoint_dir, synthetic_image  # noqa: E402

from lfm2vl_jax import Lfm2VlForConditionalGeneration, Lfm2VlProcessor  # noqa: E402
from lfm2vl_jax.config import (  # noqa: E402
    ATTENTION,
    CONV,
    Lfm2VlConfig,
    RuntimeConfig,
    TextConfig,
    VisionConfig,
    load_config,
)
from lfm2vl_jax.inference import engine  # noqa: E402
from lfm2vl_jax.inputs import MODEL_INPUTS  # noqa: E402
from lfm2vl_jax.nn.params import init_params  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "data" / "reference" / "lfm2-vl-450m"
PROMPTS = [
    "What is in this image?",
    "Describe this image in detail.",
    "How many objects can you count? Answer with a number.",
    "Write a short caption for this picture, suitable for a photo album.",
    "Is there a person in the picture? Answer yes or no, then explain what they are doing.",
]
QUESTIONS = [
    "What is the capital of France?",
    "Explain, step by step, how a bicycle gear works.",
    "Write a haiku about the sea.",
    "Give three reasons to learn a second language.",
]
# Ids past the vocabulary: never emitted, they pad the static batches' stop sets to one size (a new size
# would compile new programs). Set from the model's vocabulary in `main`.
FILLER_STOPS: list[int] = []
PENALTY = 2.0


def build_model(name: str) -> Lfm2VlForConditionalGeneration:
    runtime = RuntimeConfig(scan_layers=jax.default_backend() != "cpu")
    if name == "450m":
        config = load_config(REFERENCE / "config.json").with_runtime(scan_layers=runtime.scan_layers)
    else:
        c, a = CONV, ATTENTION
        config = Lfm2VlConfig(
            vision=VisionConfig(
                hidden_size=128,
                intermediate_size=512,
                num_layers=2,
                num_heads=2,
                patch_size=16,
                num_patches=256,
            ),
            text=TextConfig(
                vocab_size=65536,
                hidden_size=256,
                intermediate_size=768,
                num_heads=4,
                num_kv_heads=2,
                head_dim=64,
                layer_types=(c, c, a, c, c, a, c, a),
            ),
            projector_hidden_size=512,
            runtime=runtime,
        )
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    return Lfm2VlForConditionalGeneration(config, params, {"eos_token_id": 7, "pad_token_id": 0})


def workload(count: int, max_new_tokens: int, tiled: float, seed: int = 0) -> list[dict]:
    """Requests {id, messages, target} of mixed images and prompts, with target output lengths."""
    rng = np.random.default_rng(seed)
    images = {size: synthetic_image(*size) for size in [(300, 400), (480, 640), (768, 1024)]}
    requests = []
    for i in range(count):
        kind = rng.choice(["text", "photo", "large", "two"], p=[0.2, 0.65 - tiled, tiled, 0.15])
        if kind == "text":
            content = [{"type": "text", "text": str(rng.choice(QUESTIONS))}]
        else:
            sizes = {"photo": [[(300, 400), (480, 640)][rng.integers(2)]], "large": [(768, 1024)]}
            sizes["two"] = [(300, 400), (480, 640)]
            content = [{"type": "image", "image": images[size]} for size in sizes[kind]]
            content.append({"type": "text", "text": str(rng.choice(PROMPTS))})
        band = rng.choice(3, p=[0.35, 0.45, 0.2])
        low, high = (min(bound, max_new_tokens) for bound in [(2, 16), (24, 96), (128, max_new_tokens)][band])
        requests.append(
            {
                "id": i,
                "messages": [{"role": "user", "content": content}],
                "target": int(rng.integers(low, high + 1)),
            }
        )
    return requests


def arrange_stops(requests: list[dict], pilot: dict[int, list[int]]) -> None:
    """Each request's stop token: its pilot token at the target position, or the last new one before."""
    for request in requests:
        tokens = pilot[request["id"]]
        new = [k for k in range(len(tokens)) if tokens[k] not in tokens[:k]]
        request["stop"] = tokens[new[-1]]
        request["length"] = new[-1] + 1


def run_static(model, processor, requests, slots, stop_key=None) -> tuple[float, dict]:
    """Consecutive batches through the processor and `generate`, each until its longest row is done:
    `generate` takes one stop set per call, so each batch runs `max_new_tokens` = its longest arranged
    length with no stop token, and each row is cut to its own length (what per-row stop tokens would
    give, at the same cost). `stop_key="first"`: every row stops at its first token (compiles the
    programs, decodes nothing). Seconds and each request's tokens."""
    outputs = {}
    start = time.perf_counter()
    for first in range(0, len(requests), slots):
        batch = requests[first : first + slots]
        stops = sorted({r[stop_key] for r in batch}) if stop_key else []
        fillers = [t for t in FILLER_STOPS if t not in stops][: slots - len(stops)]  # one size: one program
        inputs = processor.apply_chat_template(
            [r["messages"] for r in batch], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        options = {"eos_token_id": [], "stop_token_ids": stops, "repetition_penalty": PENALTY}
        inputs = {name: inputs.get(name) for name in MODEL_INPUTS}
        request = model.request(inputs, max(r["length"] for r in batch), 0, options)
        # The fillers lie outside the vocabulary, which `generate` refuses: added after its checks.
        request = dataclasses.replace(request, stop_ids=(*request.stop_ids, *fillers))
        tokens = engine.generate(model.params, model.config, request, "device")
        for request, row in zip(batch, tokens.tolist(), strict=True):
            outputs[request["id"]] = row[: request["length"]]
    return time.perf_counter() - start, outputs


def run_continuous(model, processor, requests, slots, max_new_tokens) -> tuple[float, dict, object]:
    engine = model.batch_engine(processor, slots=slots, max_new_tokens=max_new_tokens)
    start = time.perf_counter()
    outputs = {
        result.id: result.token_ids
        for result in engine.run(
            {
                "id": r["id"],
                "messages": r["messages"],
                "stop_token_ids": [r["stop"]],
                "repetition_penalty": PENALTY,
            }
            for r in requests
        )
    }
    return time.perf_counter() - start, outputs, engine.stats


def prompt_length(processor, messages) -> int:
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True).shape[1]


def _prepare(processor, messages) -> int:
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return 0 if "pixel_values" not in inputs else len(inputs["spatial_shapes"])


_WORKER_PROCESSOR = None


def _process_init(directory: str) -> None:
    global _WORKER_PROCESSOR
    _WORKER_PROCESSOR = Lfm2VlProcessor.from_pretrained(directory)


def _process_prepare(messages) -> int:
    return _prepare(_WORKER_PROCESSOR, messages)


def preprocessing_rates(processor, directory: Path, requests: list[dict], workers: list[int]) -> list[dict]:
    """Requests/s and images/s of rendering + image preprocessing the workload, with N threads (as the
    engine does) and N processes."""
    messages = [r["messages"] for r in requests]
    images = sum(sum(b["type"] == "image" for b in r["messages"][0]["content"]) for r in requests)
    rows = []
    for n in workers:
        for kind in ("threads", "processes"):
            if kind == "threads":
                pool = concurrent.futures.ThreadPoolExecutor(n)
                task, args = _prepare, [(processor, m) for m in messages]
            else:
                pool = concurrent.futures.ProcessPoolExecutor(
                    n,
                    multiprocessing.get_context("spawn"),
                    initializer=_process_init,
                    initargs=(str(directory),),
                )
                task, args = _process_prepare, [(m,) for m in messages]
            with pool:
                list(pool.map(task, *zip(*args[: 2 * n], strict=True)))  # warm-up (processes start, caches)
                start = time.perf_counter()
                list(pool.map(task, *zip(*args, strict=True)))
                seconds = time.perf_counter() - start
            rows.append(
                {
                    "workers": n,
                    "kind": kind,
                    "requests_per_s": round(len(messages) / seconds, 2),
                    "images_per_s": round(images / seconds, 2),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("small", "450m"), default="small")
    parser.add_argument("--requests", type=int, default=224)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--tiled", type=float, default=0.0, help="share of tiled 1024x768 images (e.g. 0.1)")
    parser.add_argument("--repeats", type=int, default=1, help="timed static/continuous pairs, alternated")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="preprocessing workers")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        directory = make_checkpoint_dir(Path(tmp) / "processor", "lfm2-vl-450m")
        processor = Lfm2VlProcessor.from_pretrained(directory)
        model = build_model(args.model)
        FILLER_STOPS[:] = range(model.config.text.vocab_size, model.config.text.vocab_size + args.slots)
        requests = workload(args.requests, args.max_new_tokens, args.tiled)

        # Pilot: each request's first `target` tokens (the cache grown to the timed runs' capacity by a
        # longest request first); it compiles the engine's programs.
        engine = model.batch_engine(processor, slots=args.slots, max_new_tokens=args.max_new_tokens)
        longest = max(requests, key=lambda r: prompt_length(processor, r["messages"]))
        pilot_requests = [{"id": "capacity", "messages": longest["messages"], "repetition_penalty": PENALTY}]
        pilot_requests += [
            {
                "id": r["id"],
                "messages": r["messages"],
                "max_new_tokens": r["target"],
                "repetition_penalty": PENALTY,
            }
            for r in requests
        ]
        start = time.perf_counter()
        pilot = {result.id: result.token_ids for result in engine.run(pilot_requests)}
        pilot_seconds = time.perf_counter() - start
        arrange_stops(requests, pilot)
        for r in requests:
            r["first"] = pilot[r["id"]][0]
        start = time.perf_counter()
        run_static(model, processor, requests, args.slots, "first")  # compiles, decodes nothing
        warmup_seconds = time.perf_counter() - start
        # A first pass of the timed continuous workload: prefill groups form as requests become ready and
        # slots free, so it meets (rows, length) buckets that the pilot did not.
        first_pass_seconds, *_ = run_continuous(model, processor, requests, args.slots, args.max_new_tokens)
        preprocessing = preprocessing_rates(processor, directory, requests, args.workers)

        runs = []
        for _ in range(args.repeats):
            counter = CompileCounter()
            static_s, static_out = run_static(model, processor, requests, args.slots)
            static_compiles = counter.count
            continuous_s, continuous_out, stats = run_continuous(
                model, processor, requests, args.slots, args.max_new_tokens
            )
            runs.append(
                {
                    "static_s": round(static_s, 2),
                    "continuous_s": round(continuous_s, 2),
                    "speedup": round(static_s / continuous_s, 3),
                    "static_compiles": static_compiles,
                    "continuous_compiles": counter.count - static_compiles,
                    "occupancy": round(stats.occupancy, 3),
                    "continuous_tokens": stats.completion_tokens,
                    "static_tokens": sum(len(t) for t in static_out.values()),
                    "outputs_agreeing": sum(static_out[r["id"]] == continuous_out[r["id"]] for r in requests),
                }
            )

    lengths = [r["length"] for r in requests]
    speedup = statistics.median(run["speedup"] for run in runs)
    best = min(runs, key=lambda run: run["continuous_s"])
    result = {
        "benchmark": "batch",
        "model": args.model,
        "backend": jax.default_backend(),
        **machine_description(),
        "requests": args.requests,
        "slots": args.slots,
        "images": sum(sum(b["type"] == "image" for b in r["messages"][0]["content"]) for r in requests),
        "image_sizes": sorted(
            {
                f"{b['image'].shape[1]}x{b['image'].shape[0]}"
                for r in requests
                for b in r["messages"][0]["content"]
                if b["type"] == "image"
            }
        ),
        "output_tokens_mean": round(statistics.mean(lengths), 1),
        "output_tokens_median": statistics.median(lengths),
        "output_tokens_max": max(lengths),
        "pilot_s": round(pilot_seconds, 1),
        "static_warmup_s": round(warmup_seconds, 1),
        "continuous_first_pass_s": round(first_pass_seconds, 1),
        "runs": runs,
        "speedup_median": speedup,
        "continuous_requests_per_s": round(args.requests / best["continuous_s"], 2),
        "continuous_tokens_per_s": round(best["continuous_tokens"] / best["continuous_s"], 1),
        "preprocessing": preprocessing,
    }
    print(json.dumps(result))
    print(
        f"{args.requests} requests ({result['images']} images), {args.slots} slots, output tokens mean "
        f"{result['output_tokens_mean']} / max {result['output_tokens_max']}"
    )
    print(f"{'run':<5}{'static s':>10}{'continuous s':>14}{'speed-up':>10}{'occupancy':>11}{'agree':>7}")
    for i, run in enumerate(runs):
        print(
            f"{i:<5}{run['static_s']:>10.1f}{run['continuous_s']:>14.1f}{run['speedup']:>10.2f}"
            f"{run['occupancy']:>11.0%}{run['outputs_agreeing']:>7}"
        )
    rate = f"{result['continuous_requests_per_s']} requests/s, {result['continuous_tokens_per_s']} tokens/s"
    print(f"continuous: {rate}")
    print(f"{'preprocessing':<16}{'workers':>8}{'requests/s':>12}{'images/s':>10}")
    for row in preprocessing:
        print(
            f"{row['kind']:<16}{row['workers']:>8}{row['requests_per_s']:>12.1f}{row['images_per_s']:>10.1f}"
        )


if __name__ == "__main__":
    main()
