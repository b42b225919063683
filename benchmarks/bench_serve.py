"""`lfm2vl serve` under load vs the offline batch engine: same model, same requests, same slots, same run.

The requests are bench_batch.py's workload (text-only questions, one or two 400x300 / 640x480 images;
output lengths of VQA answers, captions and long descriptions), greedy with bench_batch's repetition
penalty, each limited to its target length (at most --max-new-tokens; random weights almost never stop on
their own).

- served: `lfm2vl serve` in a subprocess (or with `--in-process` its app on a thread of this process;
  uvicorn, one engine thread), `--clients` concurrent streaming
  clients (httpx, in this process) taking the requests in turn; images sent inline as
  base64 PNG data: URLs. Time to first token (request sent -> first text delta), inter-token latency (gaps
  between text deltas: an event carries every token decoded since the engine's last look, up to
  `--decode-chunk`), output tokens/s over the whole run.
- offline: `model.batch_engine(processor, slots=--slots)` on the same requests in this process (the
  server idle meanwhile), images as arrays.

Each side first runs the workload untimed until a pass compiles nothing (at most `--max-warmups`): which
prefill groups form on the served side depends on when requests arrive, so one pass does not meet every
program, and a compilation (seconds on a CPU) in a timed pass would measure the compiler, not serving.
Then `--repeats` timed passes of each side, interleaved (alternating which goes first), so that a change
of the machine's load hits both: the ratio is reported with its spread, and with the CPU seconds of the
process doing the work (the server; the offline engine), which other load changes little. Compilations
during the timed passes are counted (the server's from its /metrics). Prints one JSON line, then a
summary.

    python benchmarks/bench_serve.py [--requests 64] [--slots 8] [--clients 16] [--max-new-tokens 128]
        [--repeats 3] [--max-warmups 6] [--in-process]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from bench_batch import PENALTY, build_model, workload
from compile_counter import CompileCounter
from machine import machine_description
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from processor_fixtures import make_checkpoint_dir  # noqa: E402

from lfm2vl_jax import Lfm2VlForConditionalGeneration, Lfm2VlProcessor  # noqa: E402

MODEL = "bench"


def data_url(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def openai_messages(messages: list[dict]) -> list[dict]:
    """bench_batch's messages (images as arrays) with images as data: URLs."""
    encoded = {}

    def part(block: dict) -> dict:
        if block["type"] != "image":
            return block
        key = id(block["image"])
        encoded.setdefault(key, data_url(block["image"]))
        return {"type": "image_url", "image_url": {"url": encoded[key]}}

    return [{**m, "content": [part(b) for b in m["content"]]} for m in messages]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def served_run(url: str, requests: list[dict], clients: int) -> dict:
    """Every request through `clients` concurrent streaming clients: timings and each one's token ids.
    The clients read the server-sent events with plain httpx (as vLLM's serving benchmark uses aiohttp):
    the `openai` client's per-chunk objects would take CPU from the server on a small machine."""
    queue: asyncio.Queue = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    first_token, gaps, outputs = [], [], {}

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            request = queue.get_nowait()
            body = {
                "model": MODEL,
                "messages": request["openai_messages"],
                "max_completion_tokens": request["target"],
                "temperature": 0,
                "stream": True,
                "repetition_penalty": PENALTY,
                "return_token_ids": True,
            }
            sent = time.perf_counter()
            last = None
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    now = time.perf_counter()
                    if not line.startswith("data: {"):
                        continue
                    choice = json.loads(line[len("data: ") :])["choices"][0]
                    if choice["delta"].get("content"):
                        if last is None:
                            first_token.append(now - sent)
                        else:
                            gaps.append(now - last)
                        last = now
                    if choice["finish_reason"] is not None:
                        outputs[request["id"]] = choice["token_ids"]

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "first_token": first_token, "gaps": gaps, "outputs": outputs}


def start_server(directory: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    command = [sys.executable, "-m", "lfm2vl_jax.cli", "serve", "--model", str(directory)]
    command += ["--served-model-name", MODEL, "--port", str(port), "--slots", str(args.slots)]
    command += ["--max-model-len", str(args.max_model_len), "--decode-chunk", str(args.decode_chunk)]
    command += ["--max-queue", str(args.requests), "--log-level", "warning"]
    command += ["--compile-cache", "off"]  # compiles what it meets (the warm-up counts it), as offline
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise SystemExit("the server did not start")
        time.sleep(0.5)


def start_server_thread(model, processor, args: argparse.Namespace):
    """`--in-process`: the server's app on a uvicorn thread of this process."""
    import threading

    import uvicorn

    from lfm2vl_jax.serving.app import create_app
    from lfm2vl_jax.serving.chat import ServerSettings

    settings = ServerSettings(
        model_name=MODEL,
        slots=args.slots,
        max_model_len=args.max_model_len,
        decode_chunk=args.decode_chunk,
        max_queue=args.requests,
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(model, processor, settings), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.1)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


def offline_run(model, processor, requests: list[dict], slots: int, max_model_len: int) -> dict:
    engine = model.batch_engine(processor, slots=slots, max_length=max_model_len)
    start = time.perf_counter()
    outputs = {
        result.id: result.token_ids
        for result in engine.run(
            {
                "id": r["id"],
                "messages": r["messages"],
                "max_new_tokens": r["target"],
                "repetition_penalty": PENALTY,
            }
            for r in requests
        )
    }
    return {"seconds": time.perf_counter() - start, "outputs": outputs}


def server_compilations(url: str) -> float:
    """XLA programs the server has compiled (its /metrics)."""
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "lfm2vl_xla_compilations_total":
                return sample.value
    raise SystemExit("the server's /metrics has no lfm2vl_xla_compilations_total")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux's /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Measured:
    """One side's pass, timed: wall seconds, CPU seconds of the process doing the work, compilations."""

    def __init__(self, run, cpu, compilations):
        self.run, self.cpu, self.compilations = run, cpu, compilations

    def __call__(self) -> dict:
        cpu, compiled = self.cpu(), self.compilations()
        result = self.run()
        result["cpu_s"] = self.cpu() - cpu
        result["compilations"] = self.compilations() - compiled
        return result


def warm_up(side: Measured, most: int) -> int:
    """Runs `side` until a pass compiles nothing (at most `most` passes): the timed passes then measure
    the steady state of a server that has seen these requests' shapes, not compilation. On the served
    side, which prefill groups form (and so which programs run) depends on when requests arrive: one
    pass does not meet them all. Returns the passes run."""
    for passes in range(1, most + 1):
        if side()["compilations"] == 0:
            return passes
    return most


def spread(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("small", "450m"), default="small")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--decode-chunk", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each side, interleaved")
    parser.add_argument(
        "--max-warmups", type=int, default=6, help="untimed passes of each side, until one compiles nothing"
    )
    parser.add_argument(
        "--in-process", action="store_true", help="the server on a thread of this process, not a subprocess"
    )
    args = parser.parse_args()

    requests = workload(args.requests, max(args.max_new_tokens, 128), tiled=0.0)  # its bands reach 128
    for request in requests:
        request["target"] = min(request["target"], args.max_new_tokens)
        request["openai_messages"] = openai_messages(request["messages"])
    with tempfile.TemporaryDirectory() as tmp:
        directory = make_checkpoint_dir(Path(tmp) / "model", "lfm2-vl-450m")
        build_model(args.model).save_pretrained(directory / "weights", progress=False)
        for path in (directory / "weights").iterdir():
            path.rename(directory / path.name)

        model = Lfm2VlForConditionalGeneration.from_pretrained(directory, progress=False)
        processor = Lfm2VlProcessor.from_pretrained(directory)
        if args.in_process:
            server, url = start_server_thread(model, processor, args)
            server_pid = os.getpid()  # its CPU seconds then include the clients'
        else:  # on an accelerator, two processes share its memory: neither takes most of it up front
            os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
            server, url = start_server(directory, args)
            server_pid = server.pid
        compiled = CompileCounter()
        served_side = Measured(
            lambda: asyncio.run(served_run(url, requests, args.clients)),
            lambda: process_cpu_seconds(server_pid),
            lambda: server_compilations(url),
        )
        offline_side = Measured(
            lambda: offline_run(model, processor, requests, args.slots, args.max_model_len),
            time.process_time,
            lambda: compiled.count,
        )
        try:
            warmups = {"served": warm_up(served_side, args.max_warmups)}
            warmups["offline"] = warm_up(offline_side, args.max_warmups)
            # Interleaved, alternating which goes first: a change of the machine's load hits both sides.
            served, offline = [], []
            for repeat in range(args.repeats):
                for side in (served_side, offline_side)[:: 1 if repeat % 2 == 0 else -1]:
                    (served if side is served_side else offline).append(side())
        finally:
            if args.in_process:
                server.should_exit = True
            else:
                server.terminate()
                server.wait(60)

    def rate(run: dict) -> float:
        return sum(len(t) for t in run["outputs"].values()) / run["seconds"]

    pairs = list(zip(served, offline, strict=True))
    ratios = [rate(s) / rate(o) for s, o in pairs]
    # Passes in which neither side compiled (the warm-up can miss a program: group formation varies).
    steady = [rate(s) / rate(o) for s, o in pairs if s["compilations"] == o["compilations"] == 0]
    first_token = [t for run in served for t in run["first_token"]]
    gaps = [t for run in served for t in run["gaps"]]
    reference = offline[0]["outputs"]
    result = {
        "benchmark": "serve",
        "model": args.model,
        **machine_description(),
        "requests": args.requests,
        "slots": args.slots,
        "clients": args.clients,
        "decode_chunk": args.decode_chunk,
        "server": "in-process" if args.in_process else "subprocess",
        "output_tokens": sum(len(t) for t in reference.values()),
        "warmup_passes": warmups,
        "served_s": [round(run["seconds"], 2) for run in served],
        "offline_s": [round(run["seconds"], 2) for run in offline],
        "served_tokens_per_s": spread([rate(run) for run in served]),
        "offline_tokens_per_s": spread([rate(run) for run in offline]),
        "served_vs_offline": spread(ratios),
        "served_vs_offline_uncompiled": spread(steady) if steady else None,
        # CPU seconds of the process doing the work (the server's; the offline engine's): unlike wall
        # time, hardly changed by other load on the machine.
        "served_cpu_s": [round(run["cpu_s"], 2) for run in served],
        "offline_cpu_s": [round(run["cpu_s"], 2) for run in offline],
        "timed_compilations": {
            "served": sum(run["compilations"] for run in served),
            "offline": sum(run["compilations"] for run in offline),
        },
        "ttft_p50_s": round(percentile(first_token, 50), 3),
        "ttft_p99_s": round(percentile(first_token, 99), 3),
        "itl_p50_s": round(percentile(gaps, 50), 4),
        "itl_p99_s": round(percentile(gaps, 99), 4),
        "outputs_agreeing": min(
            sum(run["outputs"].get(i) == tokens for i, tokens in reference.items())
            for run in served + offline
        ),
    }
    print(json.dumps(result))
    ratio = result["served_vs_offline"]
    print(
        f"{args.requests} requests, {args.slots} slots, {args.clients} streaming clients, {args.repeats} "
        f"interleaved passes: served {result['served_tokens_per_s']['median']} tokens/s vs offline "
        f"{result['offline_tokens_per_s']['median']} ({ratio['median']:.2f}x, {ratio['min']:.2f}-"
        f"{ratio['max']:.2f}); CPU s served {result['served_cpu_s']} offline {result['offline_cpu_s']}; "
        f"compilations while timed {result['timed_compilations']}; TTFT p50 {result['ttft_p50_s']} s / p99 "
        f"{result['ttft_p99_s']} s; ITL p50 {result['itl_p50_s']} s / p99 {result['itl_p99_s']} s; "
        f"{result['outputs_agreeing']}/{args.requests} outputs equal; median output "
        f"{statistics.median(len(t) for t in reference.values())} tokens"
    )


if __name__ == "__main__":
    main()
