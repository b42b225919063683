"""Peak host memory (RSS) of the conversions on a checkpoint of the released LFM2-VL-450M's shapes.

Builds the checkpoint with transformers (random weights, `--dtype`, default float32: about 1.8 GB), then
runs each step in its own process and reads that process's peak RSS (`ru_maxrss` from `wait4`). This
process stays small (no jax, no torch): a child's `ru_maxrss` starts at its parent's peak.

- baseline: Python + jax + lfm2vl_jax imported and the CPU backend started, no weights;
- hf_to_orbax: `convert/hf_to_orbax.py` on the checkpoint;
- orbax_to_hf: `convert/orbax_to_hf.py` back to a transformers directory;
- save_pretrained: `Lfm2VlForConditionalGeneration.from_pretrained` then `save_pretrained`.

Prints one JSON line, then a table: peak RSS, peak / checkpoint size, and (peak - baseline) / size.

    python benchmarks/export_memory.py [--dtype float32] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BASELINE = "import jax, jax.numpy as jnp, lfm2vl_jax.checkpoint.orbax; jnp.zeros(1).block_until_ready()"
# The released 450M config with random weights, saved by transformers.
BUILD = """
import json, sys, torch
sys.path.insert(0, "tests")
from reference_models import REFERENCE_CONFIGS, randomize_weights
from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration

raw = json.loads((REFERENCE_CONFIGS / "lfm2-vl-450m" / "config.json").read_text())
config = Lfm2VlConfig(**{k: v for k, v in raw.items() if k != "model_type"})
torch.manual_seed(0)
model = randomize_weights(Lfm2VlForConditionalGeneration(config).float(), seed=0)
model.to(getattr(torch, sys.argv[2])).save_pretrained(sys.argv[1])
"""
SAVE_PRETRAINED = """
import sys
from lfm2vl_jax import Lfm2VlForConditionalGeneration
model = Lfm2VlForConditionalGeneration.from_pretrained(sys.argv[1], dtype=sys.argv[3], progress=False)
model.save_pretrained(sys.argv[2], progress=False)
"""


def peak_rss(argv: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of a child process running `argv`; raises if it fails."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, cwd=REPO)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{argv} failed with exit code {process.returncode}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--workdir", type=Path, help="where to put the checkpoints (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        python = sys.executable
        subprocess.run([python, "-c", BUILD, str(work / "hf"), args.dtype], cwd=REPO, check=True)
        size = (work / "hf" / "model.safetensors").stat().st_size
        steps = {
            "baseline": [python, "-c", BASELINE],
            "hf_to_orbax": [
                python,
                "convert/hf_to_orbax.py",
                str(work / "hf"),
                str(work / "orbax"),
                "--quiet",
            ],
            "orbax_to_hf": [
                python,
                "convert/orbax_to_hf.py",
                str(work / "orbax"),
                str(work / "out"),
                "--quiet",
            ],
            "save_pretrained": [
                python,
                "-c",
                SAVE_PRETRAINED,
                str(work / "hf"),
                str(work / "saved"),
                args.dtype,
            ],
        }
        results = {name: peak_rss(argv) for name, argv in steps.items()}

    baseline = results["baseline"][0]
    record = {
        "checkpoint": f"lfm2-vl-450m shapes, {args.dtype}",
        "checkpoint_bytes": size,
        "cpus": os.cpu_count(),
        **{f"{name}_peak_rss_bytes": rss for name, (rss, _) in results.items()},
        **{f"{name}_seconds": round(seconds, 1) for name, (_, seconds) in results.items()},
    }
    print(json.dumps(record))
    print(f"checkpoint: {record['checkpoint']}, {size / 1e9:.2f} GB; baseline RSS {baseline / 1e9:.2f} GB")
    print(f"{'step':<16} {'peak RSS':>9} {'/ size':>7} {'(peak-base) / size':>19} {'seconds':>8}")
    for name, (rss, seconds) in results.items():
        above_baseline = (rss - baseline) / size
        print(f"{name:<16} {rss / 1e9:>7.2f}GB {rss / size:>7.2f} {above_baseline:>19.2f} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
