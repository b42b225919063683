"""Processor throughput: our numpy processor vs transformers' `Lfm2VlProcessor`, same images, same run.

Each workload is one `processor(images=[image], text=prompt)` call on a PIL image in memory (RGB
conversion, resize, normalise, patchify, placeholder expansion, tokenisation, padding); the two
processors' calls alternate in blocks of five and the median is reported. Prints one JSON line, then a
table with images/s and the speed ratio ours / transformers (> 1: ours is faster). Run it on an
otherwise idle machine: torch's threads stall badly when another process competes for the cores.

    python benchmarks/bench_processor.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from processor_fixtures import (  # noqa: E402
    image_path,
    make_checkpoint_dir,
    make_reference_processor,
    synthetic_image,
)

from lfm2vl_jax.processing.processor import Lfm2VlProcessor  # noqa: E402

PROMPT = "<|startoftext|><|im_start|>user\n<image>Describe this image.<|im_end|>\n<|im_start|>assistant\n"


def median_seconds(
    ours: Callable[[], object], reference: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median seconds per call of each. Blocks of 5 calls alternate, so that both see the same machine
    load; within a block one processor runs alone (torch's worker threads keep spinning for a while after
    each call and would otherwise take the cores from the next call, whichever it is)."""
    ours(), reference()  # warm-up: caches, lazy imports
    ours_times, reference_times = [], []
    for _ in range(max(1, repeats // 5)):
        for fn, times in ((ours, ours_times), (reference, reference_times)):
            fn()  # settle: the other processor's threads wind down
            for _ in range(5):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
    return statistics.median(ours_times), statistics.median(reference_times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    with Image.open(image_path("grace_hopper.jpg")) as photo:
        photo = photo.convert("RGB")
    images = {
        "1024x1024": Image.fromarray(synthetic_image(1024, 1024)),
        "grace_hopper 600x512": photo,
        "2048x1536": Image.fromarray(synthetic_image(1536, 2048)),
        "3000x300": Image.fromarray(synthetic_image(300, 3000)),
    }
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for checkpoint in ("lfm2-vl-450m", "lfm2-vl-1.6b"):
            directory = make_checkpoint_dir(Path(tmp) / checkpoint, checkpoint)
            ours = Lfm2VlProcessor.from_pretrained(directory)
            reference = make_reference_processor(directory)
            for name, image in images.items():
                ours_out = ours(images=[image], text=PROMPT)
                reference_out = reference(images=[image], text=PROMPT, return_tensors="np")
                assert np.array_equal(ours_out["input_ids"], reference_out["input_ids"]), name
                ours_s, reference_s = median_seconds(
                    lambda: ours(images=[image], text=PROMPT),  # noqa: B023
                    lambda: reference(images=[image], text=PROMPT, return_tensors="np"),  # noqa: B023
                    args.repeats,
                )
                results.append(
                    {
                        "checkpoint": checkpoint,
                        "image": name,
                        "tiles": int(ours_out["pixel_values"].shape[0]),
                        "ours_images_per_s": round(1 / ours_s, 2),
                        "transformers_images_per_s": round(1 / reference_s, 2),
                        "ratio": round(reference_s / ours_s, 3),
                    }
                )

    print(json.dumps({"benchmark": "processor", "repeats": args.repeats, "results": results}))
    print(f"{'checkpoint':<14}{'image':<22}{'tiles':>6}{'ours img/s':>12}{'hf img/s':>10}{'ours/hf':>9}")
    for row in results:
        print(
            f"{row['checkpoint']:<14}{row['image']:<22}{row['tiles']:>6}{row['ours_images_per_s']:>12.1f}"
            f"{row['transformers_images_per_s']:>10.1f}{row['ratio']:>9.2f}"
        )


if __name__ == "__main__":
    main()
