"""Bad-input sweep: runs many bad or unusual inputs against `lfm2vl batch`, `train`, `convert` and
`save_pretrained`, each in its own process bounded in time and memory, and counts the outcomes:

    error      refused with one `error:` line (exit status 2), every protected file unchanged
    handled    did the right thing (a bad line became its error record, the rest ran; files kept)
    data loss  a file the case protects (the user's input, results, notes) changed or vanished
    crash      killed by a signal, or out of memory
    hang       still running at the time limit
    silent     finished as if nothing were wrong (exit 0 / no error record where one was due)
    traceback  a traceback, an internal error, or an error line that does not name the problem

    PYTHONPATH=. python tests/tools/bad_input_sweep.py [--only SUBSTRING] [--timeout 180] [--memory-gb 8] \
        [--code CHECKOUT]  # another checkout's lfm2vl_jax, e.g. to compare with an older version

Torch-free: the checkpoint is the tiny random one of the tests (tests/training_fixtures.py). Prints one
line per case and the counts; exit status 1 if any case is not `error` or `handled`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CODE = REPO  # the checkout whose lfm2vl_jax the cases run (--code)

CLI = [sys.executable, "-m", "lfm2vl_jax.cli"]
GOOD_LINE = {"id": "good", "messages": [{"role": "user", "content": "Hello."}], "max_new_tokens": 2}
RESULT_LINE = '{"id": "earlier", "text": "x", "token_ids": [1], "finish_reason": "stop"}\n'
TRAIN = ["--steps", "2", "--batch-size", "2", "--save-every", "1", "--quiet"]


@dataclasses.dataclass
class Case:
    """A command run in `work` (a fresh directory set up by `setup`). `expect`: "error" (exit 2 naming
    `names`) or "handled" (exit status `status`, and `check(work, stdout+stderr)` true). `protect`: paths
    (relative to `work`) that must be byte-identical afterwards."""

    name: str
    setup: Callable[[Path, Path], list[str]]  # (work, shared) -> argv
    expect: str = "error"
    names: tuple[str, ...] = ()
    protect: tuple[str, ...] = ()
    status: int = 1
    check: Callable[[Path, str], bool] | None = None


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_requests(work: Path, *raw: bytes) -> Path:
    path = work / "requests.jsonl"
    path.write_bytes(b"\n".join(raw) + b"\n")
    return path


def good() -> bytes:
    return json.dumps(GOOD_LINE).encode()


def batch(shared: Path, requests: Path, output: Path, *extra: str) -> list[str]:
    argv = ["batch", "--model", str(shared / "model"), "--input", str(requests), "--output", str(output)]
    return [*argv, "--slots", "2", "--max-length", "128", "--quiet", *extra]


def error_records(count: int, *phrases: str) -> Callable[[Path, str], bool]:
    """The results hold `count` error records, whose errors name `phrases`, and the good line's result."""

    def check(work: Path, _: str) -> bool:
        results = lines(work / "out.jsonl")
        errors = " ".join(r.get("error", "") for r in results if r["finish_reason"] == "error")
        done = [r for r in results if r["id"] == "good" and r["finish_reason"] != "error"]
        return len(results) == count + 1 and len(done) == 1 and all(p in errors for p in phrases)

    return check


def user_dir(work: Path) -> Path:
    directory = work / "dst"
    directory.mkdir()
    (directory / "notes.txt").write_text("mine")
    return directory


def train(shared: Path, output: Path, *extra: str, data: Path | None = None) -> list[str]:
    data = data or shared / "data" / "train.jsonl"
    return [
        "train",
        "--model",
        str(shared / "model"),
        "--data",
        str(data),
        "--output",
        str(output),
        *TRAIN,
        *extra,
    ]


def copied_run(work: Path, shared: Path) -> Path:
    return shutil.copytree(shared / "run", work / "run", symlinks=True)


def truncate_latest(work: Path, shared: Path) -> list[str]:
    run = copied_run(work, shared)
    for path in (run / "checkpoints" / "2").rglob("*"):
        if path.is_file() and path.stat().st_size > 100 and path.name != "_CHECKPOINT_METADATA":
            os.truncate(path, 50)
    return train(shared, run, "--resume", "--steps", "3")


def corrupt_run_file(work: Path, shared: Path) -> list[str]:
    run = copied_run(work, shared)
    (run / "run.json").write_text('{"batch_size": 2,')
    return train(shared, run, "--resume", "--steps", "3")


def save_into_users_dir(work: Path, shared: Path) -> list[str]:
    user_dir(work)
    return python_api(
        "from lfm2vl_jax import Lfm2VlForConditionalGeneration as M\n"
        f"M.from_pretrained({str(shared / 'model')!r}, progress=False)"
        f".save_pretrained({str(work / 'dst')!r}, overwrite=True, progress=False)"
    )


def python_api(code: str) -> list[str]:
    """A Python API call as a case: an `Lfm2VlError` is its one clear error (exit status 2, like the CLI's),
    anything else a traceback."""
    wrapped = "\n".join(
        [
            "import sys",
            "from lfm2vl_jax.errors import Lfm2VlError",
            "try:",
            *(f"    {line}" for line in code.splitlines()),
            "except Lfm2VlError as error:",
            "    print(f'error: {error}', file=sys.stderr)",
            "    sys.exit(2)",
        ]
    )
    return ["-c", wrapped]


def long_line(size: int) -> bytes:
    return json.dumps({"id": "long", "messages": [{"role": "user", "content": "x " * (size // 2)}]}).encode()


CASES = [
    # lfm2vl batch: files -------------------------------------------------------------------------------
    Case(
        "batch --output is --input (--overwrite)",
        lambda w, s: batch(s, write_requests(w, good()), w / "requests.jsonl", "--overwrite"),
        names=("--output",),
        protect=("requests.jsonl",),
    ),
    Case(
        "batch --output links to --input",
        lambda w, s: (
            [os.symlink(write_requests(w, good()), w / "l.jsonl")]
            and batch(s, w / "requests.jsonl", w / "l.jsonl", "--overwrite")
        ),
        names=("--output",),
        protect=("requests.jsonl",),
    ),
    Case(
        "batch --output hard link to --input",
        lambda w, s: (
            [os.link(write_requests(w, good()), w / "h.jsonl")]
            and batch(s, w / "requests.jsonl", w / "h.jsonl", "--resume")
        ),
        names=("--output",),
        protect=("requests.jsonl",),
    ),
    Case(
        "batch --overwrite, bad --model",
        lambda w, s: (
            [(w / "out.jsonl").write_text(RESULT_LINE)]
            and batch(w, write_requests(w, good()), w / "out.jsonl", "--overwrite")
        ),
        names=("model",),
        protect=("out.jsonl",),
    ),
    Case(
        "batch --overwrite --slots 0",
        lambda w, s: (
            [(w / "out.jsonl").write_text(RESULT_LINE)]
            and batch(s, write_requests(w, good()), w / "out.jsonl", "--overwrite", "--slots", "0")
        ),
        names=("--slots",),
        protect=("out.jsonl",),
    ),
    Case(
        "batch --resume onto a non-results file",
        lambda w, s: (
            [(w / "out.jsonl").write_text("a,b\n1,2")]
            and batch(s, write_requests(w, good()), w / "out.jsonl", "--resume")
        ),
        names=("not a result line",),
        protect=("out.jsonl",),
    ),
    Case(
        "batch --resume onto another JSONL",
        lambda w, s: (
            [shutil.copy(write_requests(w, good()), w / "out.jsonl")]
            and batch(s, w / "requests.jsonl", w / "out.jsonl", "--resume")
        ),
        names=("not a result line",),
        protect=("out.jsonl",),
    ),
    Case(
        "batch --resume --overwrite",
        lambda w, s: (
            [(w / "out.jsonl").write_text(RESULT_LINE)]
            and batch(s, write_requests(w, good()), w / "out.jsonl", "--resume", "--overwrite")
        ),
        names=("--resume",),
        protect=("out.jsonl",),
    ),
    Case(
        "batch --workers -1",
        lambda w, s: batch(s, write_requests(w, good()), w / "out.jsonl", "--workers", "-1"),
        names=("--workers",),
    ),
    Case(
        "batch --max-length 0",
        lambda w, s: batch(s, write_requests(w, good()), w / "out.jsonl", "--max-length", "0"),
        names=("--max-length",),
    ),
    Case("batch --input is a directory", lambda w, s: batch(s, w, w / "out.jsonl"), names=("--input",)),
    Case(
        "batch --output in a missing directory",
        lambda w, s: batch(s, write_requests(w, good()), w / "no" / "out.jsonl"),
        names=("--output",),
    ),
    Case(
        "batch --output is a directory",
        lambda w, s: [(w / "d").mkdir()] and batch(s, write_requests(w, good()), w / "d"),
        names=("not a regular file",),
    ),
    # lfm2vl batch: lines -------------------------------------------------------------------------------
    Case(
        "batch line with a non-UTF-8 byte",
        lambda w, s: batch(s, write_requests(w, b'{"id": "x\xe9"}', good()), w / "out.jsonl"),
        "handled",
        check=error_records(1, "not UTF-8"),
    ),
    Case(
        "batch UTF-16 file",
        lambda w, s: (
            [(w / "requests.jsonl").write_text(json.dumps(GOOD_LINE) + "\n", encoding="utf-16")]
            and batch(s, w / "requests.jsonl", w / "out.jsonl")
        ),
        "handled",
        check=lambda w, _: "UTF-16" in lines(w / "out.jsonl")[0]["error"],
    ),
    Case(
        "batch deeply nested line",
        lambda w, s: batch(s, write_requests(w, b"[" * 100_000 + b"]" * 100_000, good()), w / "out.jsonl"),
        "handled",
        check=error_records(1, "nested"),
    ),
    Case(
        "batch 50 MB line",
        lambda w, s: batch(
            s,
            write_requests(w, long_line(50 * 10**6), good()),
            w / "out.jsonl",
            "--max-line-bytes",
            str(16 * 2**20),
        ),
        "handled",
        check=error_records(1, "--max-line-bytes"),
    ),
    Case(
        "batch 5 MB of text in a line",
        lambda w, s: batch(s, write_requests(w, long_line(5 * 10**6), good()), w / "out.jsonl"),
        "handled",
        check=error_records(1, "characters of text"),
    ),
    Case(
        "batch wrong types",
        lambda w, s: batch(
            s,
            write_requests(
                w,
                b'{"id": [1], "messages": []}',
                b'{"id": "r", "messages": [{"role": 5, "content": 7}]}',
                b'{"id": "s", "messages": "hi"}',
                b"[1, 2]",
                b'"text"',
                good(),
            ),
            w / "out.jsonl",
        ),
        "handled",
        check=error_records(5),
    ),
    # convert and save_pretrained ---------------------------------------------------------------------
    Case(
        "convert hf-to-orbax --overwrite onto a user's directory",
        lambda w, s: (
            [user_dir(w)]
            and ["convert", "hf-to-orbax", str(s / "model"), str(w / "dst"), "--overwrite", "--quiet"]
        ),
        names=("notes.txt", "--keep-other-files"),
        protect=("dst/notes.txt",),
    ),
    Case(
        "convert orbax-to-hf --overwrite onto a user's directory",
        lambda w, s: (
            [user_dir(w)]
            and ["convert", "orbax-to-hf", str(s / "orbax"), str(w / "dst"), "--overwrite", "--quiet"]
        ),
        names=("notes.txt",),
        protect=("dst/notes.txt",),
    ),
    Case(
        "convert onto a file",
        lambda w, s: (
            [(w / "dst").write_text("mine")]
            and ["convert", "hf-to-orbax", str(s / "model"), str(w / "dst"), "--overwrite", "--quiet"]
        ),
        names=("a file",),
        protect=("dst",),
    ),
    Case(
        "convert --keep-other-files into a user's directory",
        lambda w, s: (
            [user_dir(w)]
            and ["convert", "hf-to-orbax", str(s / "model"), str(w / "dst"), "--keep-other-files", "--quiet"]
        ),
        "handled",
        protect=("dst/notes.txt",),
        status=0,
        check=lambda w, _: (w / "dst" / "params").is_dir(),
    ),
    Case(
        "save_pretrained(overwrite=True) onto a user's directory",
        save_into_users_dir,
        names=("notes.txt", "keep_other_files"),
        protect=("dst/notes.txt",),
    ),
    # lfm2vl train ------------------------------------------------------------------------------------
    Case(
        "train --learning-rate nan",
        lambda w, s: train(s, w / "run", "--learning-rate", "nan"),
        names=("--learning-rate",),
    ),
    Case(
        "train --learning-rate inf",
        lambda w, s: train(s, w / "run", "--learning-rate", "inf"),
        names=("--learning-rate",),
    ),
    Case(
        "train --weight-decay nan",
        lambda w, s: train(s, w / "run", "--weight-decay", "nan"),
        names=("--weight-decay",),
    ),
    Case(
        "train --lora-alpha inf",
        lambda w, s: train(s, w / "run", "--lora-rank", "2", "--lora-alpha", "inf"),
        names=("--lora-alpha",),
    ),
    Case(
        "train --lr-multiplier vision=nan",
        lambda w, s: train(s, w / "run", "--lr-multiplier", "vision=nan"),
        names=("--lr-multiplier",),
    ),
    Case(
        "train --lora-rank 100000",
        lambda w, s: train(s, w / "run", "--lora-rank", "100000"),
        names=("LoRA rank 100000",),
        check=lambda w, _: not (w / "run").exists(),
    ),
    Case(
        "train --output is a file",
        lambda w, s: [(w / "run").write_text("mine")] and train(s, w / "run"),
        names=("--output",),
        protect=("run",),
    ),
    Case(
        "train --output holds a user's files",
        lambda w, s: [user_dir(w)] and train(s, w / "dst"),
        names=("notes.txt", "--keep-other-files"),
        protect=("dst/notes.txt",),
    ),
    Case(
        "train --learning-rate 1e30 (NaN at step 2)",
        lambda w, s: train(s, w / "run", "--learning-rate", "1e30"),
        names=("step 2", "last good checkpoint (step 1)"),
    ),
    Case(
        "train --resume with another model",
        lambda w, s: (
            [copied_run(w, s)]
            and ["train", "--model", str(s / "other"), *train(s, w / "run", "--resume", "--steps", "3")[3:]]
        ),
        names=("another one",),
    ),
    Case("train --resume with a corrupt run.json", corrupt_run_file, names=("run.json",)),
    Case(
        "train --resume, latest checkpoint truncated",
        truncate_latest,
        "handled",
        status=0,
        check=lambda w, out: "checkpoint of step 2 does not restore" in out,
    ),
    Case(
        "train unreachable coordinator",
        lambda w, s: train(
            s,
            w / "run",
            "--coordinator-address",
            "127.0.0.1:9",
            "--num-processes",
            "2",
            "--process-id",
            "1",
            "--coordinator-timeout",
            "5",
        ),
        names=("127.0.0.1:9",),
    ),
    Case(
        "train data with a non-UTF-8 line",
        lambda w, s: train(s, w / "run", data=write_requests(w, b'{"messages": "\xff"}')),
        names=("requests.jsonl:1", "UTF-8"),
    ),
    Case(
        "train data with a 50 MB line",
        lambda w, s: train(
            s,
            w / "run",
            data=write_requests(
                w,
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": "x " * 25_000_000},
                            {"role": "assistant", "content": "y"},
                        ]
                    }
                ).encode(),
            ),
        ),
        names=("characters of text",),
    ),
]


def prepare_shared(shared: Path, timeout: float) -> None:
    """The tiny checkpoint (and another of the same shapes), its orbax copy, training data, and a finished
    2-step run with checkpoints at steps 1 and 2; in subprocesses, so that this process never starts JAX
    (it forks the cases)."""
    code = (
        "import sys; from pathlib import Path; sys.path[:0] = ['tests']; "
        "from training_fixtures import make_tiny_checkpoint, uniform_conversations; "
        "from lfm2vl_jax.checkpoint.orbax import hf_to_orbax; "
        f"shared = Path({str(shared)!r}); "
        "make_tiny_checkpoint(shared / 'model'); make_tiny_checkpoint(shared / 'other', seed=1); "
        "hf_to_orbax(shared / 'model', shared / 'orbax', progress=False); "
        "uniform_conversations(shared / 'data')"
    )
    env = os.environ | {"PYTHONPATH": str(CODE), "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=timeout, cwd=REPO, env=env)
    argv = [*CLI, *train(shared, shared / "run")]
    subprocess.run(argv, check=True, timeout=timeout, env=env, capture_output=True)


def classify(case: Case, work: Path, before: dict, rc: int | None, out: str) -> str:
    if rc is None:
        return "hang"
    if any(snapshot_file(work / p) != digest for p, digest in before.items()):
        return "data loss"
    if rc < 0 or "MemoryError" in out or "bad_alloc" in out or "Killed" in out:
        return "crash"
    if "Traceback" in out or "internal error" in out:
        return "traceback"
    if case.expect == "error":
        if rc == 2:
            named = all(n in out for n in case.names) and (case.check is None or case.check(work, out))
            return "error" if named else "traceback"
        return "silent"
    try:
        return "handled" if rc == case.status and (case.check is None or case.check(work, out)) else "silent"
    except (OSError, ValueError, KeyError, IndexError):
        return "silent"


def snapshot_file(path: Path) -> str | None:
    if path.is_symlink() or not path.exists():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"


def run_case(case: Case, shared: Path, timeout: float, memory: int) -> tuple[str, float, str]:
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        work = Path(tmp)
        argv = case.setup(work, shared)
        before = {p: snapshot_file(work / p) for p in case.protect}
        command = [sys.executable, *argv] if argv[0] == "-c" else [*CLI, *argv]

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

        start = time.perf_counter()
        try:
            done = subprocess.run(
                command,
                cwd=work,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                preexec_fn=limit,
                env=os.environ | {"PYTHONPATH": str(CODE), "JAX_PLATFORMS": "cpu"},
            )
            rc, out = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as expired:
            rc, out = None, str(expired.stderr or "")
        outcome = classify(case, work, before, rc, out)
        last = (out.strip().splitlines() or [""])[-1][:160]
        return outcome, time.perf_counter() - start, last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run the cases whose name contains this")
    parser.add_argument("--timeout", type=float, default=180, help="seconds per case (default 180)")
    parser.add_argument("--memory-gb", type=float, default=8, help="address-space limit per case (8)")
    parser.add_argument("--code", type=Path, default=REPO, help="checkout to test (default: this one)")
    args = parser.parse_args()
    global CODE
    CODE = args.code.resolve()
    cases = [c for c in CASES if not args.only or args.only in c.name]
    counts: collections.Counter = collections.Counter()
    with tempfile.TemporaryDirectory(prefix="sweep-shared-") as tmp:
        shared = Path(tmp)
        prepare_shared(shared, args.timeout * 3)
        for case in cases:
            outcome, seconds, last = run_case(case, shared, args.timeout, int(args.memory_gb * 2**30))
            counts[outcome] += 1
            print(f"{outcome:10s} {seconds:6.1f} s  {case.name}  | {last}", flush=True)
    order = ("error", "handled", "data loss", "crash", "hang", "silent", "traceback")
    print(f"{len(cases)} cases: " + ", ".join(f"{counts[k]} {k}" for k in order))
    return 0 if counts["error"] + counts["handled"] == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main())
