"""Prefill against transformers over the image shapes the processor produces (ours vs transformers on the
same random weights, in the same run, calls alternating).

Cases (prompt: the image(s) and a short question, through our processor, whose outputs equal
transformers'): the 512x600 photo in tests/data/images, 256x256, 768x1024 (width x height), 1024x1024
tiled with a thumbnail (the 1.6B checkpoint's processor settings), and two images in one prompt (the photo
and the 542x130 logo). For each: the full forward pass (`model(**inputs)`, logits at every position) and
prefill + first token (ours: the engine's prefill; transformers: a cached forward with `logits_to_keep=1`
and an argmax, what its `generate` does before decoding).

Prints one JSON line (with the CPU model and its SIMD extensions), then the ratio table
(transformers' time / ours: > 1 means ours is faster).

    python benchmarks/bench_prefill.py [--model 450m] [--dtype float32] [--repeats 5] [--cases photo ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
from machine import machine_description
from pair import MODELS, ModelPair, interleaved
from processor_fixtures import image_path, make_checkpoint_dir, synthetic_image

from lfm2vl_jax import Lfm2VlProcessor
from lfm2vl_jax.inference import engine

QUESTION = "Describe this image in detail, please."


def load_image(name: str) -> np.ndarray:
    from PIL import Image

    with Image.open(image_path(name)) as image:
        return np.asarray(image.convert("RGB"))


def cases(thumbnail_processor: Lfm2VlProcessor) -> dict:
    """Case name -> (images, processor or None for the model's own)."""
    photo = load_image("grace_hopper.jpg")
    return {
        "photo 512x600": ([photo], None),
        "256x256": ([synthetic_image(256, 256)], None),
        "768x1024": ([synthetic_image(1024, 768)], None),
        "1024x1024 tiled+thumbnail": ([synthetic_image(1024, 1024)], thumbnail_processor),
        "2 images": ([photo, load_image("logo2.png")], None),
    }


def prompt(processor: Lfm2VlProcessor, images: list[np.ndarray]) -> dict:
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": QUESTION}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True
    )


def measure(pair: ModelPair, inputs: dict, repeats: int) -> dict:
    import torch

    ours, reference = pair.ours, pair.reference
    torch_inputs = pair.torch_inputs(inputs)
    request = ours.request(dict(inputs), 1, seed=0, options={})

    def ours_forward() -> object:
        return pair.sync(ours(**inputs).logits)

    def ours_prefill() -> object:
        return next(engine.run(ours.params, ours.config, request))  # tokens read on the host

    def reference_forward() -> object:
        with torch.no_grad():
            return pair.sync(reference(**torch_inputs).logits)

    def reference_prefill() -> object:
        with torch.no_grad():
            logits = reference(**torch_inputs, use_cache=True, logits_to_keep=1).logits
            return pair.sync(logits[:, -1].argmax(-1))

    times = interleaved(
        {
            "ours_forward": ours_forward,
            "transformers_forward": reference_forward,
            "ours_prefill": ours_prefill,
            "transformers_prefill": reference_prefill,
        },
        repeats,
    )
    result = {name: statistics.median(t) for name, t in times.items()}
    result["tokens"] = int(np.asarray(inputs["input_ids"]).shape[1])
    result["images"] = int(len(inputs.get("spatial_shapes", ())))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="450m")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="+", help="case names to run (default: all)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        pair = ModelPair(args.model, Path(tmp) / "model", args.dtype)
        thumbnail = Lfm2VlProcessor.from_pretrained(make_checkpoint_dir(Path(tmp) / "1.6b", MODELS["1.6b"]))
        results = {}
        for name, (images, processor) in cases(thumbnail).items():
            if args.cases and name not in args.cases:
                continue
            results[name] = measure(pair, prompt(processor or pair.processor, images), args.repeats)
    report = {"benchmark": "prefill", **machine_description(), "model": args.model, "dtype": args.dtype}
    report["cases"] = results
    print(json.dumps(report))
    print(f"\n{report['cpu']} ({', '.join(report['cpu_features'])}), {args.model}, {args.dtype}")
    header = f"{'case':<28}{'tokens':>7}{'forward ours/hf (s)':>22}{'ratio':>7}"
    print(header + f"{'prefill ours/hf (s)':>22}{'ratio':>7}")
    for name, r in results.items():
        forward = f"{r['ours_forward']:.2f} / {r['transformers_forward']:.2f}"
        prefill = f"{r['ours_prefill']:.2f} / {r['transformers_prefill']:.2f}"
        print(
            f"{name:<28}{r['tokens']:>7}{forward:>22}{r['transformers_forward'] / r['ours_forward']:>7.2f}"
            f"{prefill:>22}{r['transformers_prefill'] / r['ours_prefill']:>7.2f}"
        )
    print("(ratio = transformers' time / ours: > 1 means ours is faster)")


if __name__ == "__main__":
    main()
