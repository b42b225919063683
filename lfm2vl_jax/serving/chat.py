"""A chat completion request from its parsed schema to the engine and back: the prompt and images
(prepared on worker threads), the decoding options with the checkpoint's defaults, admission against the
queue bound, and the choices' text as the engine thread reports tokens."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import itertools
import secrets
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import Lfm2VlError
from ..inference.batch_io import BatchRequest
from ..inference.batching import MAX_STOP_TOKENS
from ..processing.image_processor import Lfm2VlImageProcessor, ProcessorError
from .driver import EngineDriver
from .media import MediaPolicy, load_image_url
from .metrics import ServerMetrics
from .protocol import INT64, ChatCompletionRequest, Message, RequestError
from .text import CompletionText

if TYPE_CHECKING:
    from ..api import Lfm2VlForConditionalGeneration
    from ..processing.processor import Lfm2VlProcessor

GREEDY_TEMPERATURE = 1e-5  # at or below: greedy decoding (vLLM's threshold)
MAX_IMAGE_BUDGETS = 16  # processors kept for per-request image settings


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What `lfm2vl serve`'s flags set (see `cli.py` for each one's meaning)."""

    model_name: str
    max_model_len: int = 4096
    slots: int = 16
    max_queue: int = 256
    top_k: int = 0  # the engine's (a static shape): 0 is off, vLLM's and OpenAI's default
    decode_chunk: int = 8
    workers: int = 2
    api_key: str | None = None
    allowed_local_media_path: Path | None = None
    max_body_bytes: int = 32 * 2**20
    request_timeout: float | None = None
    allow_remote_media: bool = False
    media_fetch_timeout: float = 10.0

    def media_policy(self) -> MediaPolicy:
        return MediaPolicy(
            self.allowed_local_media_path,
            self.allow_remote_media,
            self.media_fetch_timeout,
            self.max_body_bytes,
        )


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A request ready for the engine."""

    inputs: dict[str, Any]  # one row of processor outputs
    prompt_tokens: int
    limit: int  # new tokens per choice
    options: dict[str, Any]
    seed: int


class ChatService:
    """The model, processor and engine thread behind the endpoints."""

    def __init__(
        self,
        model: Lfm2VlForConditionalGeneration,
        processor: Lfm2VlProcessor,
        driver: EngineDriver,
        metrics: ServerMetrics,
        settings: ServerSettings,
    ):
        self.model, self.processor, self.driver = model, processor, driver
        self.metrics, self.settings = metrics, settings
        self.accepted = 0  # choices admitted and not finished (being prepared, waiting or running)
        self._tags = itertools.count()
        self._processors: dict[tuple, Lfm2VlProcessor] = {}  # per image budget
        self._processors_lock = threading.Lock()

    # -- admission -----------------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return max(0, self.accepted - self.driver.engine.busy_slots)

    def admit(self, choices: int) -> None:
        """Refuses at once (429) when the request would wait behind more than `max_queue` others."""
        if not self.driver.alive:
            raise RequestError(
                "the engine has failed; the server cannot answer (see its log)",
                503,
                error_type="server_error",
            )
        if self.accepted + choices > self.settings.slots + self.settings.max_queue:
            raise RequestError(
                f"the server is busy: {self.waiting} requests are waiting for a slot (--max-queue "
                f"{self.settings.max_queue}); retry later",
                429,
                code="rate_limit_exceeded",
                error_type="rate_limit_error",
            )
        self.accepted += choices

    def release(self, choices: int) -> None:
        self.accepted -= choices

    # -- preparation (on a worker thread) -------------------------------------------------------------

    def _message(self, index: int, message: Message) -> dict[str, Any]:
        content: Any = message.content
        if isinstance(content, list):
            blocks = []
            for j, part in enumerate(content):
                if part.type == "text":
                    blocks.append({"type": "text", "text": part.text})
                    continue
                param = f"messages[{index}].content[{j}].image_url"
                image = load_image_url(part.image_url.url, self.settings.media_policy(), param)
                blocks.append({"type": "image", "image": image})
            content = blocks
        # OpenAI's `developer` role is the system prompt of older models.
        return {"role": "system" if message.role == "developer" else message.role, "content": content}

    def _image_budget(self, request: ChatCompletionRequest) -> dict[str, Any]:
        """The request's image settings that differ from the checkpoint's: `detail: "low"` is one tile of
        at most the checkpoint's minimum image tokens; `min_image_tokens`, `max_image_tokens` and
        `do_image_splitting` may only lower what the checkpoint allows (more would exceed what the model
        was trained on, and the padded patch rows every request shares)."""
        details = {
            part.image_url.detail or "auto"
            for message in request.messages
            if isinstance(message.content, list)
            for part in message.content
            if part.type == "image_url"
        }
        if len(details) > 1:
            raise RequestError(f"images of one request must share one detail, got {sorted(details)}")
        ours = self.processor.image_processor
        budget = {}
        if details == {"low"}:  # never upscaled: a minimum equal to the maximum would overshoot it
            budget = {
                "do_image_splitting": False,
                "min_image_tokens": 1,
                "max_image_tokens": ours.min_image_tokens,
            }
        for name, value in (
            ("min_image_tokens", request.min_image_tokens),
            ("max_image_tokens", request.max_image_tokens),
        ):
            if value is not None:
                if value > ours.max_image_tokens:
                    raise RequestError(
                        f"{name}={value}: over the checkpoint's max_image_tokens ({ours.max_image_tokens})",
                        param=name,
                    )
                budget[name] = value
        if request.do_image_splitting is not None:
            if request.do_image_splitting and not ours.do_image_splitting:
                raise RequestError(
                    "do_image_splitting: the checkpoint does not split images", param="do_image_splitting"
                )
            budget["do_image_splitting"] = request.do_image_splitting
        return budget

    def _processor(self, budget: dict[str, Any]) -> Lfm2VlProcessor:
        """The processor with the image settings of `budget` (one per distinct budget, kept)."""
        key = tuple(sorted(budget.items()))
        with self._processors_lock:
            if key not in self._processors:
                if len(self._processors) >= MAX_IMAGE_BUDGETS:
                    self._processors.pop(next(iter(self._processors)))
                settings = {**self.processor.image_processor.to_dict(), **budget}
                variant = copy.copy(self.processor)
                try:
                    variant.image_processor = Lfm2VlImageProcessor(**settings)
                except ProcessorError as error:  # e.g. min_image_tokens over max_image_tokens
                    message = str(error).replace("image processor config: ", "")
                    raise RequestError(f"image budget: {message}") from None
                self._processors[key] = variant
            return self._processors[key]

    def _pad_patches(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Images preprocessed at a smaller budget padded to the checkpoint's patch rows: the engine
        prefills several requests' images together, in one array."""
        pixels = inputs.get("pixel_values")
        width = self.processor.image_processor.max_num_patches
        if pixels is None or pixels.shape[1] == width:
            return inputs
        pad = width - pixels.shape[1]
        return {
            **inputs,
            "pixel_values": np.pad(pixels, ((0, 0), (0, pad), (0, 0))),
            "pixel_attention_mask": np.pad(inputs["pixel_attention_mask"], ((0, 0), (0, pad))),
        }

    def decoding_options(self, request: ChatCompletionRequest) -> dict[str, Any]:
        """generate()'s options for the request; unset ones come from the checkpoint's generation config,
        then OpenAI's defaults (temperature 1: sampling, as vLLM, whatever the config's do_sample)."""
        temperature = request.temperature
        if temperature is None:
            temperature = self.model.generation_config.get("temperature", 1.0)
        greedy = isinstance(temperature, (int, float)) and temperature <= GREEDY_TEMPERATURE
        top_k = request.top_k
        if top_k is not None and not greedy and max(top_k, 0) != self.settings.top_k:
            engine = f"top_k={self.settings.top_k}" if self.settings.top_k else "no top_k (-1)"
            raise RequestError(
                f"top_k={top_k}: this server samples with {engine}, a shape fixed when it starts "
                "(lfm2vl serve --top-k)",
                param="top_k",
            )
        sampling_only = {  # none of them for greedy requests (generate() would warn that it ignores them)
            "temperature": request.temperature,
            "top_k": self.settings.top_k,
            "top_p": request.top_p,
            "min_p": request.min_p,
        }
        options = {
            "do_sample": not greedy,
            **{name: None if greedy else value for name, value in sampling_only.items()},
            "repetition_penalty": request.repetition_penalty,
            "stop_token_ids": request.stop_token_ids,
        }
        _, stop_ids, _ = self.model.decoding_options(options)
        if len(stop_ids) > MAX_STOP_TOKENS:
            raise RequestError(f"stop_token_ids: at most {MAX_STOP_TOKENS - 1} ids", param="stop_token_ids")
        return options

    def prepare(self, request: ChatCompletionRequest) -> Prepared:
        """The prompt (chat template, images decoded and preprocessed), the token budget and the
        options, every problem a `RequestError`. Runs on a worker thread."""
        try:
            budget = self._image_budget(request)
            processor = self._processor(budget) if budget else self.processor
            messages = [self._message(i, message) for i, message in enumerate(request.messages)]
            inputs = processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )
            inputs = self._pad_patches(inputs)
            options = self.decoding_options(request)
        except RequestError:
            raise
        except Lfm2VlError as error:  # a bad option, image, placeholder count, template
            raise RequestError(str(error)) from None
        prompt = int(inputs["attention_mask"].sum())
        context = self.settings.max_model_len
        limit = request.completion_limit()
        if prompt >= context or (limit is not None and prompt + limit > context):
            asked = f"{prompt + limit} tokens ({prompt} in the messages, {limit} in the completion)"
            raise RequestError(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{asked if limit is not None else f'{prompt} tokens in the messages'}. Please reduce the "
                "length of the messages or completion.",
                param="messages",
                code="context_length_exceeded",
            )
        seed = request.seed if request.seed is not None else secrets.randbelow(INT64)
        return Prepared(inputs, prompt, limit or context - prompt, options, seed)

    # -- generation ----------------------------------------------------------------------------------

    def start(self, request: ChatCompletionRequest, prepared: Prepared, arrival: float) -> Generation:
        return Generation(self, request, prepared, arrival, next(self._tags))


@dataclasses.dataclass
class Choice:
    tag: Any
    text: CompletionText
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    last_time: float = 0.0

    @property
    def token_ids(self) -> list[int]:
        return self.tokens[: self.text.tokens_used] if self.text.stopped else self.tokens


class Generation:
    """One request's `n` choices in the engine, seen from the event loop: each choice is an engine
    request of its own (choice i samples from seed + i)."""

    def __init__(
        self,
        service: ChatService,
        request: ChatCompletionRequest,
        prepared: Prepared,
        arrival: float,
        number: int,
    ):
        self.service, self.prepared, self.arrival = service, prepared, arrival
        self.first_token_time: float | None = None
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def decode(tokens: list[int]) -> str:
            return service.processor.decode(tokens, skip_special_tokens=True)

        stops = request.stop_strings()
        # Text as tokens arrive only where it is needed: to stream it, or to find a stop string.
        self.incremental = request.stream or bool(stops)
        self.choices = [Choice((number, i), CompletionText(decode, stops)) for i in range(request.n)]
        for i, choice in enumerate(self.choices):

            def sink(event: tuple, i: int = i) -> None:  # on the engine thread
                # RuntimeError: the event loop is closed, the server is shutting down.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self.queue.put_nowait, (i, *event))

            seed = prepared.seed if i == 0 else (prepared.seed + i) % INT64
            engine_request = BatchRequest(
                id=choice.tag,
                inputs=prepared.inputs,
                max_new_tokens=prepared.limit,
                seed=seed,
                options=prepared.options,
            )
            service.driver.submit(choice.tag, engine_request, sink)

    @property
    def completion_tokens(self) -> int:
        return sum(len(choice.token_ids) for choice in self.choices)

    def cancel(self) -> None:
        """Frees the slots of the choices still running (a client gone, a timeout)."""
        for choice in self.choices:
            if choice.finish_reason is None:
                self.service.driver.cancel(choice.tag)

    def _tokens(self, choice: Choice, tokens: list[int], when: float) -> None:
        metrics = self.service.metrics
        new = len(tokens) - len(choice.tokens)
        if new <= 0:
            return
        if self.first_token_time is None:
            self.first_token_time = when
            metrics.time_to_first_token.observe(when - self.arrival)
        if choice.last_time:
            metrics.observe_tokens(new, when - choice.last_time)
        else:  # the first tokens: their latency is the time to first token
            metrics.generation_tokens.inc(new)
        choice.tokens, choice.last_time = tokens, when

    async def updates(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice index, new text, finish_reason once it has finished) until every choice has finished."""
        timeout = self.service.settings.request_timeout
        deadline = None if timeout is None else self.arrival + timeout
        unfinished = len(self.choices)
        while unfinished:
            wait = None if deadline is None else max(0.0, deadline - time.perf_counter())
            try:
                index, kind, payload, when = await asyncio.wait_for(self.queue.get(), wait)
            except asyncio.TimeoutError:
                raise RequestError(
                    f"the request took longer than the server's --request-timeout ({timeout} s)",
                    504,
                    error_type="timeout_error",
                ) from None
            choice = self.choices[index]
            if choice.finish_reason is not None:
                continue  # a stop string ended it; the engine's later news does not matter
            if kind == "failed":
                raise RequestError(
                    f"internal error in the engine: {type(payload).__name__}: {payload}",
                    500,
                    error_type="server_error",
                )
            if kind == "done" and payload.finish_reason == "error":
                raise RequestError(payload.error or "the engine refused the request")
            tokens = payload if kind == "tokens" else payload.token_ids
            self._tokens(choice, tokens, when)
            if kind == "tokens" and not self.incremental:
                continue
            text = choice.text.update(tokens, final=kind == "done")
            if choice.text.stopped:
                choice.finish_reason = "stop"
                self.service.driver.cancel(choice.tag)
            elif kind == "done":
                choice.finish_reason = payload.finish_reason
            if choice.finish_reason is not None:
                unfinished -= 1
                self._finished(choice, when)
            yield index, text, choice.finish_reason

    def _finished(self, choice: Choice, when: float) -> None:
        metrics = self.service.metrics
        metrics.requests.labels(choice.finish_reason).inc()
        metrics.e2e_latency.observe(when - self.arrival)
        if choice is self.choices[0]:
            metrics.prompt_tokens.inc(self.prepared.prompt_tokens)
