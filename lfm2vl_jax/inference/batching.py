"""Continuous batching: a fixed set of decode slots sharing one cache, each refilled with the next request
as soon as its own finishes, while the others keep decoding (what vLLM and JetStream do). This file is
the scheduler; the device programs are the decoding core's (`step.py`), with per-row options.

`BatchEngine` (`model.batch_engine(...)`): requests are rendered and their images decoded and
preprocessed on worker threads ahead of the device; each turn, the loop prefills a group of ready
requests (of one prompt-length bucket) into free slots, dispatches decode steps until enough slots are
free to be refilled, and yields each result as its request finishes. Every slot carries its own options
and PRNG stream, split as `generate` splits a request's stream, so each request gets exactly the tokens
`generate` gives it alone, whatever shares the batch and whenever it was inserted.

The cache capacity (positions per slot) grows in buckets (`buckets.bucket`) as requests need it, up to
`max_length`: the attention reads every cached position, so a cache sized for the longest possible
request would make every step pay for it. The table of seen tokens a repetition penalty needs exists
only while a running request asks for a penalty (two decode programs at most).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from ..errors import Lfm2VlError
from ..inputs import MODEL_INPUTS, as_numpy_inputs, check_inputs, check_int
from ..parallel.sharding import batch_sharding
from .batch_io import BatchRequest, BatchRequestError, BatchResult, chars_per_token_bound, text_chars
from .buckets import MIN_STOP_WIDTH, bucket
from .engine import prepare_batch
from .options import check_decoding_fits, generation_length
from .sampling import SEED_RANGE, SamplingParams, seed_key
from .step import (
    Rows,
    decode_steps,
    decode_steps_on,
    embed_prompts,
    encode_images,
    grow_capacity,
    init_rows,
    insert_rows,
    prefill_rows,
    release_rows,
    set_penalty_table,
)

if TYPE_CHECKING:
    from ..api import Lfm2VlForConditionalGeneration
    from ..processing.processor import Lfm2VlProcessor

MAX_STOP_TOKENS = MIN_STOP_WIDTH  # stop ids per request (eos and `stop_token_ids`): one slot table width
DEFAULT_MAX_NEW_TOKENS = 256  # when neither the request, the engine nor generation_config.json says
MIN_CAPACITY = 256  # cache positions per slot to start with
POLL_STEPS = 4  # decode steps between looks at the workers while a slot waits for a request
SAMPLING_FLOATS = ("temperature", "top_p", "min_p")


def _float(sampling: SamplingParams, name: str) -> float:
    """A request's sampling float as a slot array entry: no repetition penalty (None) is a penalty of 1.0,
    which leaves every logit unchanged."""
    value = getattr(sampling, name)
    return 1.0 if value is None else value


# ---------------------------------------------------------------------------------------------------------
# Host side.


@dataclasses.dataclass
class _Ready:
    """A request rendered, preprocessed and validated, waiting for a slot."""

    request: BatchRequest
    input_ids: np.ndarray  # (L,) the prompt, from its first token to its last
    mask: np.ndarray | None  # (L,) False between tokens (masked in the request's inputs); None: no holes
    images: dict[str, np.ndarray] | None  # pixel_values, pixel_attention_mask, spatial_shapes
    limit: int
    stop_ids: tuple[int, ...]
    sampling: SamplingParams
    key: np.ndarray  # key data of sampling.seed_key(seed)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids) if self.mask is None else int(self.mask.sum())


@dataclasses.dataclass
class _Running:
    tag: Any  # the caller's handle on the request
    ready: _Ready
    tokens: list[int]
    first: Any  # the device array of its group's first tokens, until read
    row: int


@dataclasses.dataclass
class _Turn:
    """The host loop's bookkeeping."""

    free: list[int]  # slots without a request
    running: dict[int, _Running] = dataclasses.field(default_factory=dict)  # slot -> its request
    pending: set = dataclasses.field(default_factory=set)  # futures of requests being prepared
    ready: collections.deque = dataclasses.field(default_factory=collections.deque)  # (tag, _Ready)
    exhausted: bool = False  # the request source is used up
    withdrawn: set = dataclasses.field(default_factory=set)  # cancelled tags, possibly still being prepared
    on_tokens: Callable[[Any, list[int]], None] | None = None  # progress of running requests (`serve`)


NOTHING_YET = object()  # what a live request source yields when no request is waiting (`RequestInbox`)


class RequestInbox:
    """Requests handed to an engine that is running (`BatchEngine.serve`), from other threads.

    Other threads `put` (tag, request) pairs and `cancel` tags; the engine thread takes what has arrived
    between decode steps, frees the slots of cancelled requests, and sleeps here when it has nothing to
    do. `close` ends `serve` once the requests put before it have finished.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._queue: collections.deque = collections.deque()  # (tag, request) not yet taken
        self._cancelled: set = set()  # tags taken by the engine, then cancelled
        self._closed = False

    def put(self, tag: Any, request: BatchRequest | Mapping[str, Any]) -> None:
        with self._changed:
            if self._closed:
                raise Lfm2VlError("the engine is shut down; no more requests")
            self._queue.append((tag, request))
            self._changed.notify()

    def cancel(self, tag: Any) -> None:
        """Withdraws a request: dropped if not yet taken, else its slot is freed at the engine's next look
        (its result is then never yielded)."""
        with self._changed:
            kept = [item for item in self._queue if item[0] != tag]
            if len(kept) == len(self._queue):
                self._cancelled.add(tag)
            self._queue = collections.deque(kept)
            self._changed.notify()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()

    # The engine's side.

    def arrivals(self) -> Iterator[Any]:
        """(tag, request) pairs as they arrive, NOTHING_YET when none is waiting; ends once closed and
        drained."""
        while True:
            with self._changed:
                if self._queue:
                    item = self._queue.popleft()
                elif self._closed:
                    return
                else:
                    item = NOTHING_YET
            yield item

    def take_cancelled(self) -> set:
        with self._changed:
            cancelled, self._cancelled = self._cancelled, set()
        return cancelled

    def wait(self) -> None:
        """Blocks until a request, a cancellation or the close arrives (the engine is idle)."""
        with self._changed:
            while not (self._queue or self._cancelled or self._closed):
                self._changed.wait()


@dataclasses.dataclass
class BatchStats:
    """Counters of a `BatchEngine` since it was created."""

    slots: int
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    decode_steps: int = 0
    busy_slot_steps: int = 0  # sum over decode steps of the slots holding a running request
    prefill_groups: int = 0
    seconds: float = 0.0  # inside `run`

    @property
    def occupancy(self) -> float:
        """Mean share of slots busy per decode step."""
        return self.busy_slot_steps / max(1, self.decode_steps * self.slots)


class BatchEngine:
    """Generates for a stream of requests with continuous batching: `slots` rows decode together and each
    is refilled with the next request as soon as its own finishes.

    >>> engine = model.batch_engine(processor, slots=64, max_length=4096, max_new_tokens=256)
    >>> for result in engine.run(requests):  # BatchRequest or dicts: {"id", "messages", ...}
    ...     print(result.id, result.finish_reason, result.text)

    Each request gets exactly the tokens `model.generate` gives it alone (greedy, or sampled from its own
    `seed`). Results come in the order requests finish; a request that cannot run (unreadable image,
    prompt of `max_length` tokens or more, bad option) yields a result with `finish_reason="error"` and
    the run goes on. `generate(requests)` returns every result in input order instead.

    Arguments:
        processor: renders `messages` (chat template, images) and decodes the text; without one, requests
            must carry `inputs` and results have `text=None`.
        slots: rows decoded together (a multiple of the mesh's batch axes).
        max_length: prompt + generated tokens per request; a request's `max_new_tokens` is cut to fit.
        max_new_tokens: default for requests that do not set it; None: generation_config.json's
            max_new_tokens, else its max_length minus the prompt, else DEFAULT_MAX_NEW_TOKENS (256).
        seed, **options: defaults for requests that do not set them (options as
            `generate`: do_sample, temperature, top_k, top_p, min_p, repetition_penalty, eos_token_id,
            stop_token_ids). `top_k` is per engine (a static shape): a sampling request that sets another
            value fails.
        prefill_batch: most requests prefilled together (default slots // 4, at least 1).
        workers: threads rendering and preprocessing requests ahead of the device (default: the CPU
            count - 1, at least 1, at most 4).
        chunk: most decode steps between two looks of the host at the slots.
    """

    def __init__(
        self,
        model: Lfm2VlForConditionalGeneration,
        processor: Lfm2VlProcessor | None = None,
        *,
        slots: int = 64,
        max_length: int = 4096,
        max_new_tokens: int | None = None,
        seed: int = 0,
        prefill_batch: int | None = None,
        workers: int | None = None,
        chunk: int = 32,
        **options: Any,
    ):
        self.model, self.processor, self.config = model, processor, model.config
        if processor is not None:
            processor.check_model(model.config.image_token_id)
        optional = {"prefill_batch": prefill_batch, "workers": workers}  # None: the defaults below
        sizes = {"slots": slots, "max_length": max_length, "chunk": chunk}  # chunk 0 would never decode
        sizes |= {name: value for name, value in optional.items() if value is not None}
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise Lfm2VlError(f"{name} must be a positive integer, got {value!r}")
        if max_length < 2:
            raise Lfm2VlError(f"max_length must be >= 2 (a prompt token and a new one), got {max_length}")
        positions = model.config.text.max_position_embeddings
        if max_length > positions:
            raise Lfm2VlError(
                f"max_length={max_length} is more than the model's {positions} positions "
                "(text_config.max_position_embeddings)"
            )
        self.row_multiple = 1
        if model.mesh is not None:
            for axis in self.config.runtime.rules.mesh_axes("batch"):
                self.row_multiple *= model.mesh.shape.get(axis, 1)
        if slots % self.row_multiple:
            raise Lfm2VlError(
                f"slots ({slots}) must be a multiple of the mesh's batch axes ({self.row_multiple} devices)"
            )
        check_int("seed", seed, *SEED_RANGE)
        generation_length(max_new_tokens, model.generation_config, 0, DEFAULT_MAX_NEW_TOKENS)  # checks it
        sampling, stop_ids, pad_id = model.decoding_options(options)
        self.slots, self.max_length, self.max_new_tokens, self.seed = slots, max_length, max_new_tokens, seed
        check_decoding_fits(  # the largest the cache can grow: refused now, not after hours of work
            self.config,
            slots,
            bucket(max_length, minimum=MIN_CAPACITY),
            f"slots={slots}, max_length={max_length}",
            "lower slots or max_length",
        )
        self.options = dict(options)
        self.top_k, self.pad_id = sampling.top_k, pad_id
        self.prefill_batch = max(1, min(slots, prefill_batch or slots // 4))
        self.max_text_chars = (
            None if processor is None else max_length * chars_per_token_bound(processor.tokenizer)
        )
        # One core left to the device's host threads (on a CPU backend, the device itself).
        self.workers = workers or max(1, min(4, (os.cpu_count() or 2) - 1))
        self.chunk = chunk
        self.key_shape = tuple(jax.random.key_data(seed_key(0)).shape)
        self.stats = BatchStats(slots)
        self._busy = 0
        self._submitted: collections.deque = collections.deque()
        self._state: Rows | None = None

    # -- public --------------------------------------------------------------------------------------------

    def submit(self, request: BatchRequest | Mapping[str, Any]) -> None:
        """Queues a request for the next `run()`."""
        self._submitted.append(request)

    def generate(self, requests: Iterable[BatchRequest | Mapping[str, Any]]) -> list[BatchResult]:
        """Every request's result, in input order."""
        results: dict[int, BatchResult] = {}
        for index, result in self._run(enumerate(requests)):
            results[index] = result
        return [results[index] for index in range(len(results))]

    def run(
        self, requests: Iterable[BatchRequest | Mapping[str, Any]] | None = None
    ) -> Iterator[BatchResult]:
        """Results as requests finish: the submitted ones, then `requests` (consumed lazily, a bounded
        number ahead of the device)."""

        def source() -> Iterator[tuple[None, BatchRequest | Mapping[str, Any]]]:
            while self._submitted:
                yield None, self._submitted.popleft()
            for request in requests or ():
                yield None, request

        for _, result in self._run(source()):
            yield result

    def serve(
        self, inbox: RequestInbox, on_tokens: Callable[[Any, list[int]], None] | None = None
    ) -> Iterator[tuple[Any, BatchResult]]:
        """(tag, result) for the requests other threads put into `inbox` while this runs (on one thread,
        the engine's), as they finish, until the inbox is closed and every request has finished.
        Requests join free slots between decode steps; a cancelled one leaves its slot at the next look of
        the host and yields nothing (unless it had finished already). `on_tokens(tag, tokens)` is called
        on this thread with each running request's tokens so far whenever new ones have been decoded
        (for streaming)."""
        return self._run(inbox.arrivals(), inbox, on_tokens)

    @property
    def busy_slots(self) -> int:
        return self._busy

    # -- requests ------------------------------------------------------------------------------------------

    @staticmethod
    def _as_request(request: BatchRequest | Mapping[str, Any]) -> BatchRequest:
        if isinstance(request, BatchRequest):
            return request
        if isinstance(request, Mapping) and "inputs" in request:
            data = dict(request)
            return BatchRequest(
                id=data.pop("id", None),
                inputs=data.pop("inputs"),
                max_new_tokens=data.pop("max_new_tokens", None),
                seed=data.pop("seed", None),
                options=data,
            )
        return BatchRequest.from_dict(request)

    def _prepare(self, request: BatchRequest) -> _Ready:
        """Renders, preprocesses and validates one request (on a worker thread)."""
        options = {**self.options, **request.options}
        sampling, stop_ids, _ = self.model.decoding_options(options)
        if sampling.do_sample and sampling.top_k != self.top_k:
            raise BatchRequestError(
                f"top_k={sampling.top_k}: this engine samples with top_k={self.top_k} (set per engine)"
            )
        if len(stop_ids) > MAX_STOP_TOKENS:
            raise BatchRequestError(f"{len(stop_ids)} stop tokens; at most {MAX_STOP_TOKENS}")
        if request.messages is not None:
            if self.processor is None:
                raise BatchRequestError("a request with 'messages' needs an engine with a processor")
            chars = text_chars(request.messages)
            if chars > self.max_text_chars:  # refused before tokenizing megabytes
                raise BatchRequestError(
                    f"the messages hold {chars} characters of text, more than max_length={self.max_length} "
                    "tokens can cover; shorten them or raise max_length"
                )
            inputs = self.processor.apply_chat_template(
                request.messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )
        elif request.inputs is not None:
            inputs = request.inputs
        else:
            raise BatchRequestError("a request needs 'messages' or 'inputs'")
        inputs = as_numpy_inputs(**{name: inputs.get(name) for name in MODEL_INPUTS})
        if inputs["input_ids"].ndim == 1:
            inputs["input_ids"] = inputs["input_ids"][None]
            if inputs["attention_mask"] is not None:
                inputs["attention_mask"] = inputs["attention_mask"][None]
        if inputs["input_ids"].ndim != 2 or len(inputs["input_ids"]) != 1:
            raise BatchRequestError(f"inputs must hold one row, got input_ids {inputs['input_ids'].shape}")
        check_inputs(self.config, **inputs)
        prompt, mask = inputs["input_ids"][0], inputs["attention_mask"]
        if mask is not None:  # padding on either side dropped, zeros between tokens kept (as `generate`)
            mask = mask[0].astype(bool)
            kept = np.flatnonzero(mask)
            prompt, mask = prompt[kept[0] : kept[-1] + 1], mask[kept[0] : kept[-1] + 1]
            mask = None if mask.all() else mask
        num_tokens = len(prompt) if mask is None else int(mask.sum())
        if num_tokens >= self.max_length:
            raise BatchRequestError(
                f"the prompt is {num_tokens} tokens, over max_length={self.max_length} "
                "(prompt and new tokens); raise max_length"
            )
        max_new = self.max_new_tokens if request.max_new_tokens is None else request.max_new_tokens
        max_new = generation_length(
            max_new, self.model.generation_config, len(prompt), DEFAULT_MAX_NEW_TOKENS
        )
        seed = check_int("seed", self.seed if request.seed is None else request.seed, *SEED_RANGE)
        images = None
        if inputs["pixel_values"] is not None:
            images = {k: inputs[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}
        return _Ready(
            request=request,
            input_ids=prompt.astype(np.int32),
            mask=mask,
            images=images,
            limit=min(max_new, self.max_length - num_tokens),
            stop_ids=stop_ids,
            sampling=sampling,
            key=np.asarray(jax.random.key_data(seed_key(seed))),
        )

    def _prepare_or_fail(self, tag: Any, request: BatchRequest | Mapping[str, Any]) -> tuple[Any, Any]:
        """(tag, `_Ready`) or (tag, error result): a bad request must not stop the run. Only the errors
        validation raises about a request (`Lfm2VlError`s) become its error record; anything else is a bug
        of ours and propagates, ending the run (the results already written stay)."""
        request_id = request.id if isinstance(request, BatchRequest) else None
        if isinstance(request, Mapping):
            request_id = request.get("id")
        try:
            return tag, self._prepare(self._as_request(request))
        except Lfm2VlError as error:
            return tag, BatchResult.failure(request_id, str(error))

    # -- device --------------------------------------------------------------------------------------------

    def _ensure_capacity(self, need: int) -> None:
        # Buckets (at most 25% over): a new capacity compiles the decode and insert programs again, but
        # the capacity only grows, and each step reads all of it.
        capacity = bucket(need, minimum=MIN_CAPACITY)
        if self._state is None:
            self._state = init_rows(self.config, self.slots, capacity, self.top_k, self.key_shape)
        elif self._state.cache.capacity < capacity:
            self._state = grow_capacity(self.config, self._state, capacity)

    def _match_penalty_table(self, requests: Iterable[_Ready]) -> None:
        """Gives the slots a table of seen tokens while one of `requests` (running or about to be) asks
        for a repetition penalty, and drops it after: without it, the step carries and updates no (S, V)
        array."""
        needed = any(r.sampling.repetition_penalty is not None for r in requests)
        if self._state is not None and (self._state.seen is not None) != needed:
            self._state = set_penalty_table(self.config, self._state, needed)

    def _insert(self, group: list[_Ready], slots: list[int], running: list[_Ready]) -> Any:
        """Prefills `group` and inserts it into `slots` (`running`: the requests in the other slots);
        returns the device array of first tokens."""
        n = len(group)
        rows = bucket(n, minimum=self.row_multiple, per_doubling=1)  # powers of two: few programs
        rows = -(-rows // self.row_multiple) * self.row_multiple
        width = max(len(r.input_ids) for r in group)
        ids = np.full((n, width), self.pad_id, np.int32)
        mask = np.zeros((n, width), np.int32)
        for i, ready in enumerate(group):
            ids[i, : len(ready.input_ids)] = ready.input_ids
            mask[i, : len(ready.input_ids)] = 1 if ready.mask is None else ready.mask
        with_images = [r.images for r in group if r.images is not None]
        images = {
            k: np.concatenate([im[k] for im in with_images]) if with_images else None
            for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")
        }
        batch = prepare_batch(self.config, ids, mask, **images, pad_id=self.pad_id, row_multiple=rows)
        self._ensure_capacity(max(batch.input_ids.shape[1], max(r.num_tokens + r.limit for r in group)))
        self._match_penalty_table([*running, *group])

        def column(values: list, fill: Any, dtype: Any) -> np.ndarray:
            out = np.full((rows, *np.shape(values[0])), fill, dtype)
            out[:n] = values
            return out

        floats = SAMPLING_FLOATS + (() if self._state.seen is None else ("repetition_penalty",))
        sampling = SamplingParams(
            do_sample=True,
            top_k=self.top_k,
            **{k: column([_float(r.sampling, k) for r in group], 1.0, np.float32) for k in floats},
        )
        do_sample = column([r.sampling.do_sample for r in group], False, bool)
        keys = column([r.key for r in group], 0, np.uint32)
        arrays = [batch.input_ids, batch.attention_mask]
        if self.model.mesh is not None:
            arrays = [jax.device_put(a, batch_sharding(self.config, a.shape)) for a in arrays]
        params = self.model.params
        features = valid = None
        if batch.pixel_values is not None:
            images = (batch.pixel_values, batch.pixel_attention_mask, batch.spatial_shapes)
            features, valid = encode_images(params, self.config, *images)
        embeds = embed_prompts(params, self.config, arrays[0], features, valid)
        prefilled = prefill_rows(
            params, self.config, *arrays, embeds, keys, sampling, do_sample, any_mask=batch.holes
        )
        stops = np.full((rows, MAX_STOP_TOKENS), -1, np.int32)
        for i, ready in enumerate(group):
            stops[i, : len(ready.stop_ids)] = ready.stop_ids
        self._state = insert_rows(
            self.config,
            self._state,
            prefilled,
            column(slots, self.slots, np.int32),  # padding rows: out of range, dropped
            column([r.limit for r in group], 1, np.int32),
            stops,
            sampling,
            do_sample,
        )
        self.stats.prefill_groups += 1
        return prefilled.token

    # -- the loop ------------------------------------------------------------------------------------------

    def _run(
        self,
        source: Iterator[Any],
        inbox: RequestInbox | None = None,
        on_tokens: Callable[[Any, list[int]], None] | None = None,
    ) -> Iterator[tuple[Any, BatchResult]]:
        """(tag, result) for each (tag, request) of `source`, as requests finish.

        Each turn: collect what the workers have prepared, prefill ready requests into free slots,
        dispatch a decode program, and only then hand the previous turn's finished results to the caller,
        so that the device decodes while the caller writes them out. With an `inbox` (a live source that
        yields NOTHING_YET when empty), cancelled requests are dropped first, and an idle loop sleeps
        until something arrives.
        """
        start = time.perf_counter()
        turn = _Turn(free=list(range(self.slots)), on_tokens=on_tokens)
        finished: list[tuple[Any, BatchResult]] = []
        with concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="lfm2vl-prep") as pool:
            try:
                while True:
                    if inbox is not None:
                        self._withdraw(turn, inbox.take_cancelled())
                    yield from self._collect_prepared(turn, source, pool)
                    self._refill(turn)
                    self._busy = len(turn.running)
                    decoding = self._dispatch_decode(turn) if turn.running else None
                    yield from finished
                    finished = []
                    if decoding is not None:
                        finished = self._collect_tokens(turn, *decoding)
                    elif turn.exhausted and not turn.pending and not turn.ready:
                        return
                    elif turn.pending:  # nothing to decode: wait for the workers
                        concurrent.futures.wait(turn.pending, return_when=concurrent.futures.FIRST_COMPLETED)
                    elif inbox is not None and not turn.ready:  # idle: sleep until something arrives
                        inbox.wait()
            finally:
                for future in turn.pending:
                    future.cancel()
                self.stats.seconds += time.perf_counter() - start

    def _collect_prepared(
        self, turn: _Turn, source: Iterator[tuple[Any, Any]], pool: concurrent.futures.Executor
    ) -> Iterator[tuple[Any, BatchResult]]:
        """Keeps a bounded number of requests in the workers' hands; moves the prepared ones to the ready
        queue and yields the ones that failed."""
        lookahead = 2 * self.prefill_batch + self.workers
        while not turn.exhausted and len(turn.pending) + len(turn.ready) < lookahead:
            item = next(source, None)
            if item is NOTHING_YET:
                break
            if item is None:
                turn.exhausted = True
            else:
                turn.pending.add(pool.submit(self._prepare_or_fail, *item))
        for future in [f for f in turn.pending if f.done()]:
            turn.pending.remove(future)
            tag, prepared = future.result()
            if tag in turn.withdrawn:
                turn.withdrawn.discard(tag)
            elif isinstance(prepared, BatchResult):
                self._count(prepared)
                yield tag, prepared
            else:
                turn.ready.append((tag, prepared))

    def _withdraw(self, turn: _Turn, tags: set) -> None:
        """Drops cancelled requests: out of the ready queue, out of their slots (freed on the device
        too); the ones still being prepared are dropped when they come back."""
        turn.withdrawn |= tags
        if not turn.withdrawn:
            return
        turn.ready = collections.deque(item for item in turn.ready if item[0] not in turn.withdrawn)
        released = np.zeros((self.slots,), bool)
        for slot in [slot for slot, item in turn.running.items() if item.tag in turn.withdrawn]:
            del turn.running[slot]
            turn.free.append(slot)
            released[slot] = True
        if released.any():
            self._state = release_rows(self.config, self._state, released)
        if not turn.pending:  # the others had finished already
            turn.withdrawn.clear()

    def _refill(self, turn: _Turn) -> None:
        """Prefills ready requests into free slots: the oldest with up to `prefill_batch - 1` others whose
        prompts fall in its length bucket (a group is padded to its longest prompt: mixing a long prompt
        with short ones would mostly compute padding)."""
        while turn.free and turn.ready:
            size = min(len(turn.free), self.prefill_batch)
            width = bucket(len(turn.ready[0][1].input_ids), minimum=16)
            group = [item for item in turn.ready if bucket(len(item[1].input_ids), minimum=16) == width]
            group = group[:size]
            for item in group:
                turn.ready.remove(item)
            slots, turn.free = turn.free[: len(group)], turn.free[len(group) :]
            first = self._insert([item for _, item in group], slots, [r.ready for r in turn.running.values()])
            for row, (slot, (tag, item)) in enumerate(zip(slots, group, strict=True)):
                turn.running[slot] = _Running(tag, item, [], first, row)

    def _dispatch_decode(self, turn: _Turn) -> tuple[jax.Array, jax.Array, jax.Array, np.ndarray | None]:
        """Starts decoding (asynchronously) until enough slots are free for the requests at hand. Returns
        the tokens, steps run, done flags, and the slots the tokens' rows are (None: every slot)."""
        coming = bool(turn.pending or not turn.exhausted)
        if turn.ready:  # come back when a few slots are free (one, up to 16 slots): few idle slot-steps
            max_steps, refill = self.chunk, len(turn.free) + min(len(turn.ready), max(1, self.slots // 16))
        elif coming:  # requests on their way: look again soon if a slot is already free
            max_steps, refill = (POLL_STEPS if turn.free else self.chunk), len(turn.free) + 1
        else:
            max_steps, refill = self.chunk, self.slots + 1
        max_steps = min(max_steps, self.chunk)  # the token buffer holds `chunk` steps
        self._match_penalty_table(item.ready for item in turn.running.values())
        busy = sorted(turn.running)
        rows = bucket(len(busy), per_doubling=1)  # powers of two: few programs
        if self.model.mesh is not None or rows >= self.slots:
            self._state, tokens, steps = decode_steps(
                self.model.params,
                self.config,
                self._state,
                np.int32(max_steps),
                np.int32(refill),
                chunk=self.chunk,
            )
            return tokens, steps, self._state.done, None
        # Only the busy slots (padded with free ones) are decoded: a step then costs their rows, not all.
        chosen = np.asarray(busy + turn.free[: rows - len(busy)], np.int32)
        self._state, tokens, steps = decode_steps_on(
            self.model.params,
            self.config,
            self._state,
            chosen,
            np.int32(max_steps),
            np.int32(refill - (self.slots - rows)),  # the slots outside `chosen` are all free
            chunk=self.chunk,
        )
        return tokens, steps, self._state.done, chosen

    def _collect_tokens(
        self, turn: _Turn, tokens: jax.Array, steps: jax.Array, done: jax.Array, slots: np.ndarray | None
    ) -> list[tuple[Any, BatchResult]]:
        """Waits for the decode program; appends each slot's new tokens (rows of `slots`, or of every
        slot); frees and returns the finished."""
        tokens, steps, done = np.asarray(tokens), int(steps), np.asarray(done)
        if slots is not None:
            rows, tokens = tokens, np.full((self.slots, tokens.shape[1]), -1, np.int32)
            tokens[slots] = rows
        self.stats.decode_steps += steps
        self.stats.busy_slot_steps += int((tokens[:, :steps] >= 0).sum())
        finished = []
        for slot in list(turn.running):
            item = turn.running[slot]
            if item.first is not None:  # its first token, from the prefill
                item.tokens.append(int(np.asarray(item.first)[item.row]))
                item.first = None
            produced = tokens[slot, :steps]
            item.tokens.extend(produced[produced >= 0].tolist())
            if turn.on_tokens is not None:
                turn.on_tokens(item.tag, list(item.tokens))
            if done[slot]:
                del turn.running[slot]
                turn.free.append(slot)
                result = self._result(item)
                self._count(result)
                finished.append((item.tag, result))
        return finished

    def _result(self, item: _Running) -> BatchResult:
        tokens = item.tokens
        stopped = bool(tokens) and tokens[-1] in item.ready.stop_ids
        text = None if self.processor is None else self.processor.decode(tokens, skip_special_tokens=True)
        return BatchResult(
            id=item.ready.request.id,
            text=text,
            token_ids=tokens,
            finish_reason="stop" if stopped else "length",
            prompt_tokens=item.ready.num_tokens,
            completion_tokens=len(tokens),
        )

    def _count(self, result: BatchResult) -> None:
        self.stats.requests += 1
        self.stats.errors += result.finish_reason == "error"
        self.stats.prompt_tokens += result.prompt_tokens
        self.stats.completion_tokens += result.completion_tokens
