"""The HTTP side of `lfm2vl serve`: a FastAPI app with OpenAI's chat completion endpoints.

- `POST /v1/chat/completions` (JSON or server-sent events), `GET /v1/models`, `GET /v1/models/{id}`;
  with `--api-key`, these need `Authorization: Bearer KEY`.
- `GET /health` (200, or 503 once the engine has failed) and `GET /metrics` (Prometheus text).
Every refusal is OpenAI's error object with its status; a bug answers 500 with its message (the traceback
goes to the log) and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol
from .chat import ChatService, Generation, ServerSettings
from .driver import EngineDriver
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, RequestError

if TYPE_CHECKING:
    from ..api import Lfm2VlForConditionalGeneration
    from ..processing.processor import Lfm2VlProcessor

logger = logging.getLogger("lfm2vl_jax.serve")


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _EventStream(StreamingResponse):
    """A streaming response that runs `on_close` however it ends (finished, client gone, cancelled),
    even when the client left before the first event was produced."""

    def __init__(self, events: AsyncIterator[str], on_close: Any):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past `limit` bytes without reading more than that."""
    too_large = RequestError(f"the request body is over the server's limit of {limit} bytes", 413)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(
    model: Lfm2VlForConditionalGeneration, processor: Lfm2VlProcessor, settings: ServerSettings
) -> FastAPI:
    """The server's app; its engine thread runs from the app's startup to its shutdown."""
    engine = model.batch_engine(
        processor,
        slots=settings.slots,
        max_length=settings.max_model_len,
        chunk=settings.decode_chunk,
        workers=1,  # requests reach the engine prepared: it only checks them
        do_sample=True,  # so that the engine's static top_k is ours; every request sets do_sample
        top_k=settings.top_k,
    )
    driver = EngineDriver(engine)
    service: ChatService
    metrics = ServerMetrics(running=lambda: engine.busy_slots, waiting=lambda: service.waiting)
    service = ChatService(model, processor, driver, metrics, settings)
    preparing = concurrent.futures.ThreadPoolExecutor(settings.workers, thread_name_prefix="lfm2vl-request")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics.watch_compilations()
        driver.start()
        try:
            yield
        finally:
            driver.close()
            metrics.unwatch_compilations()
            preparing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lfm2vl-jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    def error_response(error: RequestError) -> JSONResponse:
        metrics.errors.labels(str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(RequestError(str(error.detail), error.status_code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        logger.error("internal error answering %s", request.url.path, exc_info=error)
        message = f"internal error (a bug in lfm2vl-jax): {type(error).__name__}: {error}"
        return error_response(RequestError(message, 500, error_type="server_error"))

    def check_api_key(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise RequestError("Incorrect API key provided.", 401, code="invalid_api_key")

    def model_card() -> dict[str, Any]:
        return {
            "id": settings.model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "lfm2vl-jax",
            "max_model_len": settings.max_model_len,
        }

    @app.get("/health")
    async def health() -> Response:
        if not driver.alive:
            raise RequestError("the engine has failed (see the server's log)", 503, error_type="server_error")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_api_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str, request: Request) -> dict[str, Any]:
        check_api_key(request)
        if name != settings.model_name:
            raise RequestError(f"The model `{name}` does not exist.", 404, "model", "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrival = time.perf_counter()
        check_api_key(request)
        chat = protocol.parse_request(await _read_body(request, settings.max_body_bytes))
        if chat.model != settings.model_name:
            raise RequestError(f"The model `{chat.model}` does not exist.", 404, "model", "model_not_found")
        service.admit(chat.n)
        generation = None

        def close() -> None:
            if generation is not None:
                generation.cancel()
            service.release(chat.n)

        try:
            prepared = await asyncio.get_running_loop().run_in_executor(preparing, service.prepare, chat)
            generation = service.start(chat, prepared, arrival)
            if chat.stream:
                response = _EventStream(_stream(chat, generation, settings.model_name), close)
                close = None  # the response closes it
                return response
            return JSONResponse(await _complete(request, chat, generation, settings.model_name))
        finally:
            if close is not None:
                close()

    return app


async def _complete(
    request: Request, chat: ChatCompletionRequest, generation: Generation, model_name: str
) -> dict[str, Any]:
    """The `chat.completion` object, once every choice has finished; a client that leaves first frees
    its slots at once (the caller cancels what still runs)."""

    async def finish() -> None:
        async for _ in generation.updates():
            pass

    finishing = asyncio.ensure_future(finish())
    watching = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({finishing, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not finishing.done():
            finishing.cancel()
    if not finishing.done() or finishing.cancelled():
        raise RequestError("the client disconnected", 499)
    finishing.result()  # raises what the generation raised
    choices = [
        protocol.choice(
            i,
            choice.text.text,
            choice.finish_reason,
            choice.token_ids if chat.return_token_ids else None,
        )
        for i, choice in enumerate(generation.choices)
    ]
    return protocol.completion(
        protocol.completion_id(),
        model_name,
        choices,
        generation.prepared.prompt_tokens,
        generation.completion_tokens,
    )


async def _stream(chat: ChatCompletionRequest, generation: Generation, model_name: str) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: the role first, text deltas, a chunk with each choice's
    finish_reason, with `include_usage` a last chunk of usage, then `[DONE]`; an error after the stream
    has begun is an `error` event."""
    request_id, created = protocol.completion_id(), int(time.time())
    include_usage = bool(chat.stream_options and chat.stream_options.include_usage)

    def event(choices: list[dict[str, Any]]) -> str:
        return _sse(protocol.chunk(request_id, model_name, created, choices, include_usage))

    for i in range(chat.n):
        yield event([protocol.delta(i, {"role": "assistant", "content": "", "refusal": None})])
    try:
        async for index, text, finish_reason in generation.updates():
            if text:
                yield event([protocol.delta(index, {"content": text})])
            if finish_reason is not None:
                final = protocol.delta(index, {}, finish_reason)
                if chat.return_token_ids:
                    final["token_ids"] = generation.choices[index].token_ids
                yield event([final])
        if include_usage:
            counts = protocol.usage(generation.prepared.prompt_tokens, generation.completion_tokens)
            yield _sse(protocol.chunk(request_id, model_name, created, [], True, counts))
    except RequestError as error:
        yield _sse(error.body())
    except Exception as error:  # a bug: logged; the client gets an error event, the server goes on
        logger.exception("internal error while streaming")
        message = f"internal error (a bug in lfm2vl-jax): {type(error).__name__}: {error}"
        yield _sse(RequestError(message, 500, error_type="server_error").body())
    yield "data: [DONE]\n\n"
