"""Batch inference on a Ray cluster: one `BatchEngine` replica per Ray Data actor (the 'ray' extra:
`pip install 'lfm2vl-jax[ray]'`; nothing else in the package imports this module).

As vLLM's and SGLang's offline examples do, a callable class runs under `ray.data.Dataset.map_batches`:
Ray Data starts `concurrency` actors, each loads the model once and keeps its engine (and compiled
programs) for every batch it is handed; batches are spread over the actors and a batch whose actor died is
run again on a restarted one.

    ds = ray.data.from_items([{"request": json.dumps({"id": i, "messages": m})} for i, m in ...])
    results = ds.map_batches(
        BatchReplica, fn_constructor_kwargs={"model": "LiquidAI/LFM2-VL-450M", "slots": 64},
        batch_size=256, concurrency=8, num_gpus=1,  # one replica per GPU
    )
    for row in results.iter_rows(): print(json.loads(row["result"]))

`lfm2vl batch --ray` (`RayBatchRunner`) does this for a JSONL file: the driver reads it once as a single
run does (bad lines, duplicate ids and ids already in --output are dealt with there), hands the places of
the lines to run to Ray Data (the workers read the lines from the file, which must be at the same path on
every node, as the images), and writes every result into one JSONL as it arrives, each id once.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow
import ray
import ray.data

from ..compile_cache import enable_compile_cache
from ..errors import Lfm2VlError
from ..inference.batch_io import (
    MAX_LINE_BYTES,
    BatchRequest,
    BatchRequestError,
    BatchResult,
    RequestLine,
    chars_per_token_bound,
    read_request_at,
    text_chars,
)

CONNECT_TIMEOUT_S = 30.0  # how long --ray-address is tried before giving up
REPLICA_RESTARTS = 3  # a replica that keeps dying (a crash on some input, memory) stops the run after these
BUSY_WINDOW_S = 60.0  # a replica that returned a batch this recently counts as busy in the progress line


class RayError(Lfm2VlError):
    """The Ray cluster cannot be used (unreachable address, bad replica settings)."""


def _load(
    model: str, dtype: str | None, mesh: str | None, scan_layers: bool | None, quantize: dict | None = None
) -> tuple[Any, Any]:
    """The processor and model of checkpoint `model`, as `lfm2vl batch` loads them (`quantize`: the
    quantization options of `from_pretrained`)."""
    import jax.numpy as jnp

    from ..api import Lfm2VlForConditionalGeneration
    from ..config import default_dtype_name
    from ..parallel.mesh import make_mesh, parse_mesh
    from ..processing.processor import Lfm2VlProcessor

    processor = Lfm2VlProcessor.from_pretrained(model)
    loaded = Lfm2VlForConditionalGeneration.from_pretrained(
        model,
        dtype=getattr(jnp, dtype or default_dtype_name()),
        mesh=make_mesh(**parse_mesh(mesh)) if mesh else None,
        scan_layers=scan_layers,
        progress=False,
        **(quantize or {}),
    )
    return processor, loaded


def _read_batch_requests(batch: Mapping[str, np.ndarray], requests_path: str | None, max_line_bytes: int):
    """The requests (or error results) of a batch: rows of `number` + `offset` (lines of `requests_path`),
    of `request` (a request line's JSON text) or of `prepared` (pickled by `RequestPreparer`)."""
    if "prepared" in batch:
        return [pickle.loads(data) for data in batch["prepared"]]
    if "request" in batch:
        items = []
        for text in batch["request"]:
            try:
                items.append(BatchRequest.from_dict(json.loads(text)))
            except (ValueError, BatchRequestError) as error:  # json's errors are ValueErrors
                items.append(BatchResult.failure(None, f"bad request: {error}"))
        return items
    if requests_path is None:
        raise RayError("rows of 'number' and 'offset' need requests_path, the file they are lines of")
    return [
        read_request_at(Path(requests_path), int(offset), int(number), max_line_bytes)
        for number, offset in zip(batch["number"], batch["offset"], strict=True)
    ]


class BatchReplica:
    """A callable class for `ray.data.Dataset.map_batches`: one model and `BatchEngine` per actor, loaded
    once, answering every batch handed to it (continuous batching within a batch: make batches a few
    times `slots`).

    model: checkpoint directory or hub id (reachable from every node). dtype, mesh ("data=2,tensor=4":
    the mesh over this actor's devices), scan_layers, quantize (`from_pretrained`'s quantization
    options): as `lfm2vl batch`. slots, max_length,
    max_new_tokens, seed, prefill_batch, workers and the sampling options: the engine's (`BatchEngine`).
    requests_path: the JSONL file that rows of `number` + `offset` are lines of. compile_cache: a
    persistent compilation cache directory on the actor's node (a restarted actor compiles nothing again).

    A batch holds rows of `request` (JSON text of a request line), `prepared` (`RequestPreparer`'s
    output) or `number` + `offset`; returns one row per request: `id` (JSON text), `result` (the result
    line's JSON object as text, as `lfm2vl batch` writes it), `completion_tokens` and `replica` (which
    actor ran it: host:pid).
    """

    def __init__(
        self,
        model: str,
        *,
        requests_path: str | None = None,
        dtype: str | None = None,
        mesh: str | None = None,
        scan_layers: bool | None = None,
        quantize: dict | None = None,
        max_line_bytes: int = MAX_LINE_BYTES,
        compile_cache: str | None = None,
        **engine_options: Any,
    ):
        if compile_cache:
            enable_compile_cache(compile_cache)
        processor, loaded = _load(model, dtype, mesh, scan_layers, quantize)
        self.engine = loaded.batch_engine(processor, **engine_options)
        self.requests_path, self.max_line_bytes = requests_path, max_line_bytes
        self.replica = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = _read_batch_requests(batch, self.requests_path, self.max_line_bytes)
        results = [item for item in items if isinstance(item, BatchResult)]
        results += self.engine.run(item for item in items if not isinstance(item, BatchResult))
        return {
            "id": np.array([json.dumps(r.id) for r in results], dtype=object),
            "result": np.array([json.dumps(r.to_dict(), ensure_ascii=False) for r in results], dtype=object),
            "completion_tokens": np.array([r.completion_tokens for r in results], dtype=np.int64),
            "replica": np.array([self.replica] * len(results), dtype=object),
        }


class RequestPreparer:
    """A callable class for a CPU `map_batches` stage before `BatchReplica`: renders the chat template and
    decodes and preprocesses the images (what the engine's worker threads do otherwise), so that the
    replicas' hosts spend their CPU on feeding the accelerator. Rows as `BatchReplica` takes them in; rows
    of `prepared` out. A request whose text is too long for `max_length` to cover is passed on untouched
    (the replica refuses it, without tokenizing megabytes here)."""

    def __init__(
        self,
        model: str,
        *,
        max_length: int = 4096,
        requests_path: str | None = None,
        max_line_bytes: int = MAX_LINE_BYTES,
    ):
        from ..processing.processor import Lfm2VlProcessor

        self.processor = Lfm2VlProcessor.from_pretrained(model)
        self.max_text_chars = max_length * chars_per_token_bound(self.processor.tokenizer)
        self.requests_path, self.max_line_bytes = requests_path, max_line_bytes

    def _prepare(self, item: BatchRequest | BatchResult) -> BatchRequest | BatchResult:
        if isinstance(item, BatchResult) or item.messages is None:
            return item
        if text_chars(item.messages) > self.max_text_chars:
            return item
        try:
            inputs = self.processor.apply_chat_template(
                item.messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )
        except Lfm2VlError as error:  # as the engine records it: a request's error, not the run's
            return BatchResult.failure(item.id, str(error))
        inputs = {name: np.asarray(value) for name, value in inputs.items() if value is not None}
        return BatchRequest(item.id, None, inputs, item.max_new_tokens, item.seed, item.options)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = _read_batch_requests(batch, self.requests_path, self.max_line_bytes)
        return {"prepared": np.array([pickle.dumps(self._prepare(item)) for item in items], dtype=object)}


def _probe(address: str, timeout: float) -> None:
    """Waits up to `timeout` seconds for a TCP connection to a cluster address ("host:port" or
    "ray://host:port"): `ray.init` itself would retry for minutes."""
    host_port = address.removeprefix("ray://")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise RayError(f"--ray-address {address}: expected HOST:PORT (or ray://HOST:PORT, or 'auto')")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(0.1, min(5.0, timeout))):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise RayError(
                    f"--ray-address {address}: no Ray cluster reachable there after {timeout:g} s ({error})"
                ) from None
            time.sleep(0.5)


def connect(address: str | None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Joins the Ray cluster at `address` (after a bounded wait for it to answer), or, without one, the
    one `ray.init()` finds (RAY_ADDRESS) or starts on this machine. Nothing if Ray is initialised already."""
    if ray.is_initialized():
        return
    if address not in (None, "auto"):
        _probe(address, timeout)
    ray.init(address=address, log_to_driver=False, configure_logging=False)


class RayBatchRunner:
    """`lfm2vl batch --ray`: the lines to run on `replicas` Ray Data actors, results as they arrive.

    engine_options: `BatchReplica`'s (slots, max_length, ... as `lfm2vl batch`). preprocess: "replica"
    (the replicas' engine threads render and preprocess) or "stage" (a separate CPU stage of
    `RequestPreparer` actors, `preprocess_concurrency` of them, before the replicas). replica_resources:
    Ray resources per replica (num_cpus, num_gpus, resources={"TPU": 4}, ...). batch_size: requests per
    replica call (default 4 x slots). replica_class: `BatchReplica` or a subclass of it."""

    def __init__(
        self,
        model: str,
        requests_path: Path,
        *,
        replicas: int,
        engine_options: Mapping[str, Any],
        replica_resources: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
        preprocess: str = "replica",
        preprocess_concurrency: int = 1,
        max_line_bytes: int = MAX_LINE_BYTES,
        replica_class: type | None = None,
    ):
        if preprocess not in ("replica", "stage"):
            raise RayError(f"preprocess must be 'replica' or 'stage', got {preprocess!r}")
        self.model, self.requests_path, self.replicas = model, str(Path(requests_path).resolve()), replicas
        self.engine_options = dict(engine_options)
        self.replica_resources = dict(replica_resources or {"num_cpus": 1})
        self.batch_size = batch_size or 4 * int(self.engine_options.get("slots", 64))
        self.preprocess, self.preprocess_concurrency = preprocess, preprocess_concurrency
        self.max_line_bytes, self.replica_class = max_line_bytes, replica_class or BatchReplica
        self._check_resources()
        self.completion_tokens = 0
        self._start = time.perf_counter()
        self._last_seen: dict[str, float] = {}

    def _check_resources(self) -> None:
        """Refuses replicas (and preprocessing actors) that the cluster's resources cannot all hold at
        once: Ray Data would wait for them forever. (An autoscaling cluster must have its nodes up.)"""
        need: dict[str, float] = {
            "CPU": self.replicas * self.replica_resources.get("num_cpus", 1),
            "GPU": self.replicas * self.replica_resources.get("num_gpus", 0),
        }
        for name, amount in self.replica_resources.get("resources", {}).items():
            need[name] = self.replicas * amount
        if self.preprocess == "stage":
            need["CPU"] += self.preprocess_concurrency
        have = ray.cluster_resources()
        short = {name: amount for name, amount in need.items() if amount > have.get(name, 0)}
        if short:
            listed = ", ".join(
                f"{amount:g} {name} (the cluster has {have.get(name, 0):g})" for name, amount in short.items()
            )
            stage = " and the preprocessing stage" if self.preprocess == "stage" else ""
            raise RayError(
                f"the replicas ({self.replicas}){stage} need {listed}; lower --replicas or the resources per "
                "replica"
            )

    def run(self, lines: Iterable[RequestLine]) -> Iterator[BatchResult]:
        """The results of `lines` (requests of `requests_path`), each id once, in the order they arrive."""
        places = np.array([(line.number, line.offset) for line in lines], dtype=np.int64).reshape(-1, 2)
        if not len(places):
            return
        # Blocks of a replica batch each, made here: no task has to run (and hold a CPU) to split them.
        rows = ray.data.from_arrow(
            [
                pyarrow.table({"number": block[:, 0], "offset": block[:, 1]})
                for block in np.split(places, range(self.batch_size, len(places), self.batch_size))
            ]
        )
        common = {"requests_path": self.requests_path, "max_line_bytes": self.max_line_bytes}
        if self.preprocess == "stage":
            rows = rows.map_batches(
                RequestPreparer,
                fn_constructor_kwargs={
                    "model": self.model,
                    "max_length": self.engine_options.get("max_length", 4096),
                    **common,
                },
                batch_size=self.batch_size,
                concurrency=self.preprocess_concurrency,
                num_cpus=1,
            )
        results = rows.map_batches(
            self.replica_class,
            fn_constructor_kwargs={"model": self.model, **common, **self.engine_options},
            batch_size=self.batch_size,
            concurrency=self.replicas,
            max_restarts=REPLICA_RESTARTS,
            max_task_retries=REPLICA_RESTARTS,
            **self.replica_resources,
        )
        self._start = time.perf_counter()
        written: set[str] = set()  # a batch run twice (its actor died after returning) yields its ids once
        for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
            now = time.perf_counter()
            for replica in set(batch["replica"]):
                self._last_seen[replica] = now
            for key, text, tokens in zip(
                batch["id"], batch["result"], batch["completion_tokens"], strict=True
            ):
                if key in written:
                    continue
                written.add(key)
                self.completion_tokens += int(tokens)
                yield BatchResult(**json.loads(text))

    def progress(self) -> str:
        now = time.perf_counter()
        busy = sum(now - seen < BUSY_WINDOW_S for seen in self._last_seen.values())
        rate = self.completion_tokens / max(now - self._start, 1e-9)
        return f"{rate:.1f} tok/s, {min(busy, self.replicas)}/{self.replicas} replicas busy"

    def summary(self) -> str:
        return f"{self.replicas} Ray replicas"
