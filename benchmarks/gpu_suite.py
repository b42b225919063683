"""Every GPU check in one command, sized for one device slot: a summary table at the end, each step's JSON
in `--out`.

    python benchmarks/gpu_suite.py --out DIR [--smoke] [--budget 450] [--steps NAME ...] [--experiments]

Steps, in order, each a subprocess with its own time limit (the smaller of its own and what is left of
`--budget`; one that runs out is recorded as such and the suite goes on):
- parity: fp32 parity on the device, 8 of `tests/parity/test_parity.py` and the long-context parity's tests
  (PARITY_TESTS; matmuls at "highest" precision: TF32 would not be fp32 parity); pass/fail counts from
  pytest's JUnit XML, or from its progress line if the step runs out of time;
- generate-450m, generate-1.6b: `bench_generate.py`, bf16, batches 1 8 32 128, end to end; the 450M beside
  transformers where torch sees a GPU (not the 1.6B: drawing and saving its reference weights takes a
  minute);
- cmdbuf-off, cmdbuf-all: the 1.6B decode (batches 1 and 32) with XLA's command buffers off, and with every
  command type (`--xla_gpu_enable_command_buffer`); generate-1.6b is the default;
- batch-64, batch-128: `bench_batch.py` 450M, 64 and 128 slots;
- train-450m, train-1.6b: `bench_train.py` bf16 (ours: step time, tokens/s, MFU, peak memory).
`--experiments` adds the decode-step round after them: per-layer vs scanned layers and fused vs separate
projections (`RuntimeConfig.fused_projections`; batches 1 and 32), and an
8k-token prompt with the blockwise kernel vs "auto" (on bf16 GPUs, `jax.nn.dot_product_attention`'s cuDNN
kernel for the prefill; decoding from the cache stays on the reference in both).

Trimmed to fit 8 minutes on an H200 (compilation included; every step shares one persistent compilation
cache, `DIR/compile-cache` unless JAX_COMPILATION_CACHE_DIR is set): 32 new tokens per decode (bench
default 128), one timed repeat, the device loop only, no long-context rows in the main steps, 128 batch
requests of up to 64 tokens with one preprocessing-worker count, one round of 3 training steps with our
side only.

`--smoke`: the same steps on the CPU with tiny sizes ("tiny" and "small" models, batch sizes 1-2, a
handful of tokens and requests), in minutes: it shows that every step still runs, not how fast.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
ALL_COMMAND_BUFFERS = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"


@dataclass
class Step:
    name: str
    argv: list[str]
    limit_s: float
    env: dict[str, str] = field(default_factory=dict)
    junit: bool = False  # a pytest run: its result comes from the JUnit XML, not a JSON line


def bench(script: str, *args: object) -> list[str]:
    return [sys.executable, str(BENCHMARKS / script), *map(str, args)]


# Sizes of the full suite (an accelerator) and of --smoke (the CPU). Step names are the full suite's.
FULL = {
    "models": {"450m": "450m", "1.6b": "1.6b"},
    "dtype": "bfloat16",
    "batches": (1, 8, 32, 128),
    "new_tokens": 32,
    "long_context": 8192,
    "batch": ("--model", "450m", "--requests", 128, "--max-new-tokens", 64),
    "slots": {"batch-64": 64, "batch-128": 128},
    "train": {"train-450m": ("--models", "450m"), "train-1.6b": ("--models", "1.6b")},
}
SMOKE = {
    "models": {"450m": "tiny", "1.6b": "tiny"},
    "dtype": "float32",
    "batches": (1, 2),
    "new_tokens": 4,
    "long_context": 256,
    "batch": ("--model", "small", "--requests", 4, "--max-new-tokens", 8),
    "slots": {"batch-64": 2, "batch-128": 4},
    "train": {
        name: ("--models", "tiny", "--tokens", 300, "--max-length", 512)
        for name in ("train-450m", "train-1.6b")
    },
}


# The parity tests that fit the suite's minute (not the real-450M-shapes one: its reference alone takes it).
PARITY_TESTS = " or ".join(
    (
        "test_text_only",
        "test_one_small_image",
        "test_two_images_in_one_prompt",
        "test_tiled_image_with_thumbnail",
        "test_batch_of_two_with_different_images_and_right_padding",
        "test_bf16_top1_agreement_with_fp32_reference",
        "test_long_prompt_logits_match_transformers",
        "test_long_prompt_greedy_tokens_match_transformers",
    )
)


def steps(smoke: bool, torch_gpu: bool, experiments: bool) -> list[Step]:
    """The suite's steps; `smoke`: tiny sizes for the CPU."""
    size = SMOKE if smoke else FULL
    parity_tests = ["tests/parity/test_parity.py", "tests/parity/test_long_context_parity.py"]
    parity = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *parity_tests]
    parity += ["-k", "test_text_only or test_auto_attention_is_blockwise" if smoke else PARITY_TESTS]
    small, big, batches = size["models"]["450m"], size["models"]["1.6b"], size["batches"]
    common = ("--ours-only", "--dtype", size["dtype"], "--new-tokens", size["new_tokens"])
    common += ("--loops", "device", "--repeats", 1)
    decode = (*common, "--contexts", "--batches")
    generate_small = bench("bench_generate.py", "--models", small, *decode, *batches)
    if torch_gpu:  # beside the 450M only: making and saving the 1.6B's reference weights costs a minute
        generate_small.remove("--ours-only")
    # The other variants decode at the first and the next-to-last batch size (1 and 32).
    variant = ("bench_generate.py", "--models", big, "--skip-end-to-end", *decode, batches[0], batches[-2])
    result = [
        Step("parity", parity, 50, {"JAX_DEFAULT_MATMUL_PRECISION": "highest"}, junit=True),
        Step("generate-450m", generate_small, 65),
        Step("generate-1.6b", bench("bench_generate.py", "--models", big, *decode, *batches), 65),
    ]
    for name, value in (("off", ""), ("all", ALL_COMMAND_BUFFERS)):
        xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_enable_command_buffer={value}".strip()
        result.append(Step(f"cmdbuf-{name}", bench(*variant), 35, {"XLA_FLAGS": xla_flags}))
    for name, slots in size["slots"].items():
        argv = bench("bench_batch.py", *size["batch"], "--slots", slots, "--workers", 4)
        result.append(Step(name, argv, 45))
    for name, models in size["train"].items():  # one model per step: a step cut short prints nothing
        argv = bench("bench_train.py", "--dtype", size["dtype"], *models, "--rounds", 1, "--steps", 3)
        result.append(Step(name, [*argv, "--ours-only"], 50 if name == "train-450m" else 60))
    if experiments:
        result.append(Step("exp-scan", bench(*variant, "--layouts", "scan"), 60))
        result.append(Step("exp-fused", bench(*variant, "--fused-projections"), 45))
        context = ("--contexts", size["long_context"], "--context-new-tokens", 8, "--batches", 1)
        for attention in ("blockwise", "auto"):  # "auto": cuDNN's fused prefill where it runs (bf16 GPUs)
            argv = bench("bench_generate.py", "--models", big, "--skip-end-to-end", *common, *context)
            result.append(Step(f"exp-{attention}-context", [*argv, "--attention", attention], 45))
    return result


def run_step(step: Step, limit_s: float, out: Path, env: dict[str, str]) -> dict:
    """Runs one step; its JSON (or a record of its failure) goes to out/NAME.json and is returned."""
    argv = list(step.argv)
    if step.junit:
        argv += ["--junitxml", str(out / f"{step.name}.xml")]
    start = time.perf_counter()
    record: dict = {"step": step.name, "limit_s": round(limit_s), "command": " ".join(argv[1:])}
    if step.env:
        record["env"] = step.env
    try:
        done = subprocess.run(
            argv, cwd=REPO, env={**env, **step.env}, capture_output=True, text=True, timeout=limit_s
        )
        record["status"] = "ok" if done.returncode == 0 else f"exit {done.returncode}"
        output, errors = done.stdout, done.stderr
    except subprocess.TimeoutExpired as timeout:  # its output comes as bytes, whatever `text` says
        record["status"] = "timed out"
        output, errors = (v.decode(errors="replace") if v else "" for v in (timeout.stdout, timeout.stderr))
    record["seconds"] = round(time.perf_counter() - start, 1)
    if step.junit and (out / f"{step.name}.xml").is_file():
        suite = ElementTree.parse(out / f"{step.name}.xml").getroot().find("testsuite")
        record["result"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    elif step.junit:  # stopped before pytest wrote its XML: count the progress characters it printed
        marks = "".join(re.findall(r"^([.FEsx]+)(?:\s+\[\s*\d+%\])?$", output, re.MULTILINE))
        record["result"] = {
            "tests": len(marks),
            "failures": marks.count("F"),
            "errors": marks.count("E"),
            "skipped": marks.count("s") + marks.count("x"),
        }
    else:
        lines = [line for line in output.splitlines() if line.startswith("{")]
        if lines:
            record["result"] = json.loads(lines[0])
    if record["status"] != "ok":
        record["stderr_tail"] = errors[-2000:]
    (out / f"{step.name}.json").write_text(json.dumps(record, indent=1))
    (out / f"{step.name}.log").write_text(output + "\n--- stderr ---\n" + errors)
    return record


def headline(record: dict) -> str:
    """The step's main numbers in one line."""
    r = record.get("result")
    if not r:
        return ""
    if record["step"] == "parity":
        return f"{r['tests']} tests, {r['failures']} failed, {r['errors']} errors, {r['skipped']} skipped"
    if r.get("benchmark") == "generate":
        parts = []
        for name, m in r["models"].items():
            for layout, o in m["layouts"].items():
                decode = ", ".join(f"b={b} {v['device']:.0f}" for b, v in o["decode"].items())
                parts.append(f"{name} {layout} tok/s {decode}")
                parts += [
                    f"{c} ctx {v:.0f} tok/s, prefill {o['context_prefill_s'][c]:.3f} s"
                    for c, v in o["contexts"].items()
                ]
                if "end_to_end_s" in o:
                    parts.append(f"e2e {o['end_to_end_s']:.3f} s")
                parts.append(f"{o['decode_step_program']['kernels']} kernels/step")
            fractions = m["roofline"]["fractions"]
            parts += [
                f"roofline {k} {v['measured']:.2f}"
                + (f" (datasheet {v['datasheet']:.2f})" if "datasheet" in v else "")
                for k, v in fractions.items()
            ]
            if "transformers" in m:
                parts.append(
                    "hf tok/s " + ", ".join(f"b={b} {v:.0f}" for b, v in m["transformers"]["decode"].items())
                )
        return "; ".join(parts)
    if r.get("benchmark") == "batch":
        return f"{r['continuous_tokens_per_s']} tok/s continuous, speed-up {r['speedup_median']} over static"
    if r.get("benchmark") == "train":
        return "; ".join(
            f"{name} {m['ours']['step_s']:.3f} s/step, {m['ours']['tokens_per_s']:.0f} tok/s, MFU "
            f"{m['ours']['mfu']:.1%}, {m['ours']['peak_gb']:.1f} GB"
            if "ours" in m
            else f"{name} {m}"
            for name, m in r["models"].items()
        )
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for each step's JSON and log")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: every step runs, fast")
    parser.add_argument("--budget", type=float, help="seconds for the whole suite (default 450; smoke 1350)")
    parser.add_argument("--steps", nargs="+", help="run only these steps (names as in the summary)")
    parser.add_argument("--experiments", action="store_true", help="add the decode-step experiments")
    args = parser.parse_args()
    start = time.perf_counter()
    # The smoke run's limits are 3x the device's: a shared 2-core CPU compiles slower than an H200's host.
    scale = 3 if args.smoke else 1
    args.budget = args.budget or 450 * scale
    env = dict(os.environ)
    if args.smoke:
        env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(args.out.resolve() / "compile-cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    # Allocate as needed: transformers shares the GPU with us in generate-1.6b, and bench_train's parent
    # holds a client while its workers train.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    torch_gpu = not args.smoke and torch_sees_gpu()
    plan = steps(args.smoke, torch_gpu, args.experiments)
    unknown = set(args.steps or ()) - {s.name for s in plan}
    if unknown:
        parser.error(f"--steps: unknown {sorted(unknown)}; the steps are {[s.name for s in plan]}")
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for step in plan:
        if args.steps and step.name not in args.steps:
            continue
        left = args.budget - (time.perf_counter() - start)
        if left < 5:
            records.append({"step": step.name, "status": "skipped: budget spent"})
            continue
        record = run_step(step, min(step.limit_s * scale, left), args.out, env)
        records.append(record)
        elapsed = time.perf_counter() - start
        print(f"[{elapsed:6.0f} s] {step.name}: {record['status']} in {record['seconds']} s", flush=True)
    summary = {
        "smoke": args.smoke,
        "budget_s": args.budget,
        "seconds": round(time.perf_counter() - start, 1),
        "torch_gpu": torch_gpu,
        "steps": records,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'step':<18}{'status':<22}{'s':>7}  numbers")
    for record in records:
        print(
            f"{record['step']:<18}{record['status']:<22}{record.get('seconds', 0):>7.1f}  {headline(record)}"
        )
    print(f"total {summary['seconds']} s of a {args.budget:.0f} s budget")


def torch_sees_gpu() -> bool:
    """Whether transformers can run beside us on a GPU (asked in a subprocess: importing torch here would
    take GPU memory from the steps)."""
    probe = "import torch; print(torch.cuda.is_available())"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.stdout.strip() == "True"


if __name__ == "__main__":
    main()
