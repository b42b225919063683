"""Accuracy of weight-only quantization against the float model, on random weights of the real shapes.

Weights drawn as the parity tests draw them (`tests/reference_models.randomize_weights`, here in numpy):
kernels N(0, 1/fan_in), embeddings and position grid N(0, 1), norm scales 1 + N(0, 0.2), biases N(0, 0.1).
Real checkpoints have heavier tails (outlier channels), which costs absmax scales more: these numbers are
a lower bound on the error a real checkpoint sees.

Prompts (fixed): 4 text-only questions and 3 with one image each (384x512, 512x512, 640x360), through
our processor (the released 450M processor files, the tests' stand-in tokenizer), as one padded batch.
For every valid position: the logits' relative error (||quantized - float|| / ||float|| per position,
then the mean and the largest) and top-1 agreement (the argmax is the same token).

    python benchmarks/quant_accuracy.py [--models 450m 1.6b] [--schemes int8 int4] [--group-sizes 32 64 128]
        [--float-head-too] (each scheme with the embedding / LM head quantized, and also kept float)

Prints one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from machine import machine_description
from pair import MODELS, raw_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from processor_fixtures import make_checkpoint_dir, synthetic_image  # noqa: E402

from lfm2vl_jax import Lfm2VlForConditionalGeneration, Lfm2VlProcessor  # noqa: E402
from lfm2vl_jax.config import RuntimeConfig, config_from_dict  # noqa: E402
from lfm2vl_jax.nn.params import ParamSpec, is_spec, param_specs, tree_bytes  # noqa: E402

TEXTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a transformer language model predicts the next token, step by step.",
    "List five ways to reduce the memory a neural network needs at inference time.",
    "What is the capital of France, and what is it famous for?",
)
IMAGE_SIZES = ((384, 512), (512, 512), (640, 360))


def checkpoint_like_params(config, seed: int = 0) -> dict:
    """Random float32 params spread as the parity tests' (see the module docstring)."""
    rng = np.random.default_rng(seed)

    def draw(spec: ParamSpec) -> np.ndarray:
        noise = rng.standard_normal(spec.shape, np.float32)
        if spec.init == "ones":
            return 1 + 0.2 * noise
        if spec.init == "zeros":
            return 0.1 * noise
        return spec.std * noise

    return jax.tree.map(draw, param_specs(config), is_leaf=is_spec)


def prompts(processor: Lfm2VlProcessor) -> dict:
    """One batch (one program per model): the text-only questions, then one row per image size."""
    conversations = [[{"role": "user", "content": [{"type": "text", "text": text}]}] for text in TEXTS]
    conversations += [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": synthetic_image(height, width, seed=i)},
                    {"type": "text", "text": "Describe this image in detail, every object and colour."},
                ],
            }
        ]
        for i, (height, width) in enumerate(IMAGE_SIZES)
    ]
    return dict(
        processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, padding=True
        )
    )


def compare(reference: np.ndarray, logits: np.ndarray, mask: np.ndarray) -> dict:
    reference, logits = reference[mask], logits[mask]  # (valid positions, vocabulary)
    errors = np.linalg.norm(logits - reference, axis=-1) / np.linalg.norm(reference, axis=-1)
    agree = logits.argmax(-1) == reference.argmax(-1)
    return {
        "rel_error_mean": float(errors.mean()),
        "rel_error_max": float(errors.max()),
        "top1": float(agree.mean()),
        "positions": int(agree.size),
    }


def variants(args: argparse.Namespace) -> list[tuple[str, str, int | None, bool]]:
    """(label, scheme, group size, embeddings kept float): each scheme (int4 at each group size) with the
    embeddings quantized, and with `--float-head-too` at the first group size also kept float."""
    out = []
    for scheme in args.schemes:
        groups = args.group_sizes if scheme == "int4" else [None]
        for group in groups:
            label = scheme + (f"/g{group}" if group else "")
            out.append((label, scheme, group, False))
            if group == groups[0] and args.float_head_too:
                out.append((label + " float head", scheme, group, True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["450m"])
    parser.add_argument("--schemes", nargs="+", choices=("int8", "int4"), default=["int8", "int4"])
    parser.add_argument("--group-sizes", nargs="+", type=int, default=[64, 32, 128])
    parser.add_argument("--float-head-too", action="store_true", help="also keep the embeddings float")
    args = parser.parse_args()
    report = {"benchmark": "quant_accuracy", **machine_description(), "models": {}}
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            processor = Lfm2VlProcessor.from_pretrained(make_checkpoint_dir(Path(tmp), MODELS[name]))
        config = config_from_dict(raw_config(name)).replace(runtime=RuntimeConfig(scan_layers=False))
        model = Lfm2VlForConditionalGeneration(config, checkpoint_like_params(config))
        batch = prompts(processor)
        mask = batch["attention_mask"].astype(bool)

        def logits_of(m: Lfm2VlForConditionalGeneration, batch: dict = batch) -> np.ndarray:
            return np.asarray(m(**batch).logits, np.float64)

        start = time.perf_counter()
        reference = logits_of(model)
        result = {
            "float_bytes": tree_bytes(model.params),
            "prompts": len(mask),
            "float_forward_s": time.perf_counter() - start,
            "variants": {},
        }
        for label, scheme, group, keep in variants(args):
            quantized = model.quantize(scheme, group, embeddings=not keep)
            result["variants"][label] = {
                **compare(reference, logits_of(quantized), mask),
                "bytes": tree_bytes(quantized.params),
            }
            del quantized
            print(label, result["variants"][label], file=sys.stderr, flush=True)
        report["models"][name] = result
    print(json.dumps(report))
    for name, r in report["models"].items():
        print(
            f"\n{name}: {r['prompts']} prompts, {next(iter(r['variants'].values()))['positions']} positions"
        )
        print(f"{'variant':<22}{'GB':>7}{'rel err mean':>14}{'rel err max':>13}{'top-1':>8}")
        print(f"{'float32':<22}{r['float_bytes'] / 1e9:>7.3f}")
        for label, v in r["variants"].items():
            print(
                f"{label:<22}{v['bytes'] / 1e9:>7.3f}{v['rel_error_mean']:>14.4f}{v['rel_error_max']:>13.4f}"
                f"{v['top1']:>8.4f}"
            )


if __name__ == "__main__":
    main()
