"""Batch requests and results, and the JSONL files `lfm2vl batch` reads and writes.

Input, one JSON object per line (blank lines are skipped):

    {"id": "q1", "messages": [...chat messages...], "max_new_tokens": 64, "temperature": 0.3, ...}

`id` (a string or an integer) and `messages` are required; `max_new_tokens`, `seed` and the sampling
options of `generate` (`do_sample`, `temperature`, `top_k`, `top_p`, `min_p`, `repetition_penalty`,
`stop_token_ids`) are optional. Image paths in the messages are relative to the input file.

Output, one line per finished request, in the order they finish:

    {"id", "text", "token_ids", "finish_reason": "stop"|"length"|"error", "prompt_tokens",
     "completion_tokens"[, "error"]}

Each line is written whole by a single `write` on a file opened for appending, so a killed run leaves at
most a torn last line, which `ResultWriter(resume=True)` cuts off before appending.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import Lfm2VlError

SAMPLING_FIELDS = (
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "stop_token_ids",
)
REQUEST_FIELDS = ("id", "messages", "max_new_tokens", "seed", *SAMPLING_FIELDS)
_IMAGE_KEYS = ("image", "path", "url")
_NOT_PATHS = ("http://", "https://", "data:")


class BatchRequestError(Lfm2VlError):
    """One request of a batch cannot be run (malformed line, bad option, unreadable image, too long)."""


class OutputFileError(Lfm2VlError):
    """The results file cannot be started or resumed."""


@dataclasses.dataclass(frozen=True)
class BatchRequest:
    """One generation request: a conversation (`messages`, rendered by the engine's processor) or ready
    model inputs for one row (`inputs`: input_ids, attention_mask and the image arrays, as the processor
    returns them); unset limits and options fall back to the engine's."""

    id: Any
    messages: list | None = None
    inputs: Mapping[str, Any] | None = None
    max_new_tokens: int | None = None
    seed: int | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: Path | None = None) -> BatchRequest:
        """A request from a JSONL line's object; image paths resolved against `base_dir`."""
        if not isinstance(data, Mapping):
            raise BatchRequestError(f"a request must be a JSON object, got {type(data).__name__}")
        request_id = data.get("id")
        if isinstance(request_id, bool) or not isinstance(request_id, (str, int)):
            raise BatchRequestError(f"'id' must be a string or an integer, got {request_id!r}")
        unknown = sorted(set(data) - set(REQUEST_FIELDS))
        if unknown:
            raise BatchRequestError(f"unknown fields {unknown}; a request takes {', '.join(REQUEST_FIELDS)}")
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BatchRequestError("'messages' must be a non-empty list of chat messages")
        for name in ("max_new_tokens", "seed"):
            value = data.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise BatchRequestError(f"'{name}' must be an integer, got {value!r}")
        if base_dir is not None:
            messages = resolve_image_paths(messages, base_dir)
        return cls(
            id=request_id,
            messages=messages,
            max_new_tokens=data.get("max_new_tokens"),
            seed=data.get("seed"),
            options={key: data[key] for key in SAMPLING_FIELDS if data.get(key) is not None},
        )


@dataclasses.dataclass(frozen=True)
class BatchResult:
    """What became of one request. `text` is None when the engine has no processor to decode with."""

    id: Any
    text: str | None
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token ended it), "length" (max_new_tokens or max_length), "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None

    @classmethod
    def failure(cls, request_id: Any, error: str, prompt_tokens: int = 0) -> BatchResult:
        return cls(request_id, "", [], "error", prompt_tokens, 0, error)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.error is None:
            del data["error"]
        return data


def resolve_image_paths(messages: list, base_dir: Path) -> list:
    """A copy of `messages` whose relative image paths (image blocks' `image`/`path`/`url`, OpenAI
    `image_url` blocks, `file://` URLs) are made absolute against `base_dir`."""

    def resolve(value: Any) -> Any:
        if not isinstance(value, str) or value.startswith(_NOT_PATHS):
            return value
        path = value[len("file://") :] if value.startswith("file://") else value
        return str(base_dir / path) if not os.path.isabs(path) else path

    resolved = []
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            resolved.append(message)
            continue
        blocks = []
        for block in content:
            if isinstance(block, Mapping) and block.get("type") == "image":
                block = {k: resolve(v) if k in _IMAGE_KEYS else v for k, v in block.items()}
            elif isinstance(block, Mapping) and block.get("type") == "image_url":
                url = block.get("image_url")
                url = {**url, "url": resolve(url.get("url"))} if isinstance(url, Mapping) else resolve(url)
                block = {**block, "image_url": url}
            blocks.append(block)
        resolved.append({**message, "content": blocks})
    return resolved


def line_id(line_number: int) -> str:
    """The id given to a line whose own id cannot be read (so that --resume skips it too)."""
    return f"<line {line_number}>"


def read_requests(path: Path) -> Iterator[tuple[int, BatchRequest | BatchResult]]:
    """(line number, request) for each non-blank line, or (line number, error result) for a line that is
    not a valid request. Lazy: a file of millions of lines is never held in memory."""
    path = Path(path)
    base_dir = path.resolve().parent
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as error:
                yield number, BatchResult.failure(line_id(number), f"line {number}: invalid JSON: {error}")
                continue
            try:
                yield number, BatchRequest.from_dict(data, base_dir)
            except BatchRequestError as error:
                good_id = isinstance(data, Mapping) and isinstance(data.get("id"), (str, int))
                request_id = data["id"] if good_id and not isinstance(data["id"], bool) else line_id(number)
                yield number, BatchResult.failure(request_id, f"line {number}: {error}")


def count_lines(path: Path) -> int:
    """Non-blank lines of a file (the progress bar's total), read in binary blocks."""
    count = 0
    with open(path, "rb") as f:
        for line in f:
            count += bool(line.strip())
    return count


class ResultWriter:
    """Appends results to a JSONL file, one whole line per `write` call.

    resume: keep the existing file (cutting off a torn last line left by a killed run) and report the ids
    it already holds in `done_ids`; otherwise an existing file is refused unless `overwrite`.
    """

    def __init__(self, path: Path, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.done_ids: set = set()
        exists = self.path.exists()
        if exists and not (resume or overwrite) and self.path.stat().st_size:
            raise OutputFileError(
                f"{self.path} exists; pass --resume to continue it (skipping the ids it holds) or "
                "--overwrite to replace it"
            )
        if exists and resume:
            self.done_ids = self._repair_and_read()
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if not resume else 0)
        self._fd = os.open(self.path, flags, 0o644)

    def _repair_and_read(self) -> set:
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):  # a torn line: the run was killed in the middle of writing it
            with open(self.path, "r+b") as f:
                f.truncate(complete)
        ids = set()
        for number, line in enumerate(data[:complete].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                ids.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise OutputFileError(
                    f"{self.path}, line {number}: not a result line ({error}); is this the right file?"
                ) from error
        return ids

    def write(self, result: BatchResult) -> None:
        data = (json.dumps(result.to_dict(), ensure_ascii=False) + "\n").encode("utf-8")
        while data:  # a regular file takes it in one call; loop in case it does not
            data = data[os.write(self._fd, data) :]

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
