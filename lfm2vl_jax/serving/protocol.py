"""OpenAI's chat completion API as `lfm2vl serve` speaks it: the request schema, the error object, and the
response and stream chunk objects.

The schema is strict, as OpenAI's own API is: an unknown field is refused ("Unrecognized request argument
supplied"), not ignored, and so is a field whose effect is not implemented (`logprobs`, penalties, tools,
...), so that a client never gets an answer that silently ignored what it asked for. docs/serve.md lists
every field.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from ..errors import Lfm2VlError

MAX_N = 16  # choices per request (each takes a slot)
MAX_STOP_STRINGS = 16
INT64 = 2**63


class RequestError(Lfm2VlError):
    """A refused request: OpenAI's error object with its HTTP status."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        error_type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, error_type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI; max_completion_tokens wins
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    user: str | None = None  # accepted, unused
    # Refused unless neutral (their effect is not implemented).
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # vLLM's extras.
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False
    # Per-request image budget (vLLM's `mm_processor_kwargs` names), within the checkpoint's limits.
    min_image_tokens: int | None = Field(None, ge=1)
    max_image_tokens: int | None = Field(None, ge=1)
    do_image_splitting: bool | None = None

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def _param(loc: tuple) -> str | None:
    """A pydantic error location as OpenAI names parameters: messages[0].content[1].image_url.url.
    pydantic puts in which member of a union was tried (`str`, `list[...]`) and, in a list of tagged
    union members, the member's tag after its index: neither is a parameter."""
    name, skip_tag_at = "", None
    for position, part in enumerate(loc):
        if part == "str" or "[" in str(part):
            if "tagged-union[" in str(part):
                skip_tag_at = position + 2  # the index, then the tag
            continue
        if position == skip_tag_at:
            continue
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name or None


def _refuse_unsupported(request: ChatCompletionRequest) -> None:
    """Fields whose effect this server does not implement: refused unless neutral."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            raise RequestError(f"{name} is not supported by this server (only 0)", param=name)
    if request.logprobs or request.top_logprobs:
        name = "logprobs" if request.logprobs else "top_logprobs"
        raise RequestError(f"{name} is not supported by this server", param=name)
    if request.logit_bias:
        raise RequestError("logit_bias is not supported by this server", param="logit_bias")
    if request.response_format is not None and request.response_format.get("type") != "text":
        raise RequestError(
            "response_format: only {'type': 'text'} is supported by this server", param="response_format"
        )
    if request.tools:
        raise RequestError("tools (function calling) are not supported by this server", param="tools")
    if request.tool_choice not in (None, "none"):
        raise RequestError("tool_choice: only 'none' is supported by this server", param="tool_choice")


def parse_request(body: bytes) -> ChatCompletionRequest:
    """The request of a JSON body, or a `RequestError` naming the first problem (OpenAI's wording where it
    has one)."""
    try:
        request = ChatCompletionRequest.model_validate_json(body)
    except pydantic.ValidationError as error:
        # The most specific error: in a union, the member that got furthest.
        first = max(error.errors(include_url=False), key=lambda e: len(e["loc"]))
        if first["type"] == "json_invalid":
            raise RequestError(f"the body is not valid JSON: {first['msg']}") from None
        if first["type"] == "model_type":
            raise RequestError("the body must be a JSON object") from None
        param = _param(first["loc"])
        if first["type"] == "extra_forbidden":
            raise RequestError(f"Unrecognized request argument supplied: {param}", param=param) from None
        raise RequestError(f"{param}: {first['msg']}" if param else first["msg"], param=param) from None
    if not request.messages:
        raise RequestError("messages must hold at least one message", param="messages")
    for i, message in enumerate(request.messages):
        if message.content is None and message.role != "assistant":
            raise RequestError(f"a {message.role} message needs content", param=f"messages[{i}].content")
    if request.stream_options is not None and not request.stream:
        raise RequestError(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options"
        )
    stops = request.stop_strings()
    if len(stops) > MAX_STOP_STRINGS or not all(stops):
        raise RequestError(f"stop: at most {MAX_STOP_STRINGS} non-empty strings", param="stop")
    _refuse_unsupported(request)
    return request


# -- responses -------------------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    request_id: str, model: str, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A `chat.completion` object; `choices` as `choice` makes them."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def choice(index: int, text: str, finish_reason: str, token_ids: list[int] | None) -> dict[str, Any]:
    data = {
        "index": index,
        "message": {"role": "assistant", "content": text, "refusal": None},
        "logprobs": None,
        "finish_reason": finish_reason,
    }
    if token_ids is not None:  # vLLM's `return_token_ids`
        data["token_ids"] = token_ids
    return data


def chunk(
    request_id: str,
    model: str,
    created: int,
    choices: list[dict[str, Any]],
    include_usage: bool,
    usage_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A `chat.completion.chunk`: with `stream_options.include_usage`, every chunk has `usage` (null but in
    the last one, whose `choices` is empty)."""
    data = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if include_usage:
        data["usage"] = usage_counts
    return data


def delta(index: int, content: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": content, "logprobs": None, "finish_reason": finish_reason}
