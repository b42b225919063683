"""Accuracy of weight-only quantization against the float model, on random weights of the real shapes.

Weights drawn as the parity tests draw them (`tests/reference_models.randomize_weights`, here in numpy):
kernels N(0, 1/fan_in), embeddings and position grid N(0, 1), norm scales 1 + N(0, 0.2), biases N(0, 0.1).
Real checkpoints have heavier tails (outlier channels), which costs absmax scales more: these numbers are
a lower bound on the error a real checkpoint sees.

Prompts (fixed): 4 text-only rows of 64 random tokens, and 3 rows with one image each (384x512, 512x512,
640x360; through our processor, the released 450M processor files): two batches, two programs per model.
For every valid position: the logits' relative error (||quantized - float|| / ||float|| per position,
then the mean and the largest) and top-1 agreement (the argmax is the same token).

    python benchmarks/quant_accuracy.py [--models 450m 1.6b] [--schemes int8 int4] [--group-sizes 32 64 128]
        (each scheme with the embedding / LM head quantized; at the first group size also kept float)

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

TEXT_ROWS, TEXT_LENGTH = 4, 64
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


def prompts(processor: Lfm2VlProcessor, vocab: int) -> list[dict]:
    """Two batches (one program each): text-only rows of random tokens, and one row per image size."""
    ids = np.random.default_rng(0).integers(1000, min(vocab, 60000), (TEXT_ROWS, TEXT_LENGTH))
    conversations = [
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
    images = processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, padding=True
    )
    return [{"input_ids": ids, "attention_mask": np.ones_like(ids)}, dict(images)]


def compare(reference: list[np.ndarray], logits: list[np.ndarray], masks: list[np.ndarray]) -> dict:
    errors, agree = [], []
    for ref, got, mask in zip(reference, logits, masks, strict=True):
        ref, got = ref[mask], got[mask]  # (valid positions, vocab)
        errors.append(np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref, axis=-1))
        agree.append(got.argmax(-1) == ref.argmax(-1))
    errors, agree = np.concatenate(errors), np.concatenate(agree)
    return {
        "rel_error_mean": float(errors.mean()),
        "rel_error_max": float(errors.max()),
        "top1": float(agree.mean()),
        "positions": int(agree.size),
    }


def variants(args: argparse.Namespace) -> list[tuple[str, str, int | None, bool]]:
    """(label, scheme, group size, embeddings kept float): each scheme (int4 at each group size) with the
    embeddings quantized, and at the first group size also kept float."""
    out = []
    for scheme in args.schemes:
        groups = args.group_sizes if scheme == "int4" else [None]
        for group in groups:
            label = scheme + (f"/g{group}" if group else "")
            out.append((label, scheme, group, False))
            if group == groups[0]:
                out.append((label + " float head", scheme, group, True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["450m"])
    parser.add_argument("--schemes", nargs="+", choices=("int8", "int4"), default=["int8", "int4"])
    parser.add_argument("--group-sizes", nargs="+", type=int, default=[64, 32, 128])
    args = parser.parse_args()
    report = {"benchmark": "quant_accuracy", **machine_description(), "models": {}}
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            processor = Lfm2VlProcessor.from_pretrained(make_checkpoint_dir(Path(tmp), MODELS[name]))
        config = config_from_dict(raw_config(name)).replace(runtime=RuntimeConfig(scan_layers=False))
        model = Lfm2VlForConditionalGeneration(config, checkpoint_like_params(config))
        rows = prompts(processor, config.text.vocab_size)

        masks = [row["attention_mask"].astype(bool) for row in rows]

        def logits_of(m: Lfm2VlForConditionalGeneration, rows: list[dict] = rows) -> list[np.ndarray]:
            return [np.asarray(m(**row).logits, np.float64) for row in rows]

        start = time.perf_counter()
        reference = logits_of(model)
        result = {
            "float_bytes": tree_bytes(model.params),
            "prompts": len(rows),
            "float_forward_s": time.perf_counter() - start,
            "variants": {},
        }
        for label, scheme, group, keep in variants(args):
            quantized = model.quantize(scheme, group, embeddings=not keep)
            result["variants"][label] = {
                **compare(reference, logits_of(quantized), masks),
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
