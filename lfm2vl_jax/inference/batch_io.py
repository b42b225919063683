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
most a torn last line, which `ResultWriter(resume=True)` cuts off before appending (after checking that
every line of the file is a result line: another file is refused unchanged).

A bad input line (not UTF-8, not JSON, nested over `MAX_NESTING` levels, over `max_line_bytes` long,
wrong fields or types) becomes an error result for that line; the others still run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

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
FINISH_REASONS = ("stop", "length", "error")
RESULT_LINE_START = b'{"id": '  # how `ResultWriter.write` starts every line
# A request line is held whole while parsed; longer ones are refused unread (images can be inline data
# URLs, hence megabytes).
MAX_LINE_BYTES = 64 * 2**20
MAX_NESTING = 100  # chat messages nest a few levels; tool-call arguments a few more
READ_BLOCK = 2**20
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


def chars_per_token_bound(tokenizer: Any) -> int:
    """An upper bound on the characters one token stands for (a `tokenizers.Tokenizer`'s longest
    vocabulary entry; byte-level entries count bytes, at least the characters), times 4 for normalizers
    that merge characters: a text of more than `max_length` times this cannot fit, and is refused
    without tokenizing it."""
    return 4 * max(map(len, tokenizer.get_vocab(with_added_tokens=True)), default=1)


def text_chars(messages: Any) -> int:
    """Characters of text in chat messages (string contents and text blocks; images not counted)."""
    total = 0
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str):
            total += len(content)
        for block in content if isinstance(content, list) else ():
            text = block.get("text") if isinstance(block, Mapping) else None
            total += len(text) if isinstance(text, str) else 0
    return total


def line_id(line_number: int) -> str:
    """The id given to a line whose own id cannot be read (so that --resume skips it too)."""
    return f"<line {line_number}>"


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (iterative: no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _parse_line(raw: bytes, number: int) -> Any:
    """A line's JSON value; `BatchRequestError` naming the problem (encoding, syntax, nesting)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        hint = ""
        if number == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            hint = "; the file starts with a UTF-16 byte-order mark: save it as UTF-8"
        byte = raw[error.start]
        raise BatchRequestError(f"not UTF-8: byte {byte:#04x} at offset {error.start}{hint}") from None
    if number == 1:
        text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise BatchRequestError(f"invalid JSON: {error}") from None
    except RecursionError:
        raise BatchRequestError(f"JSON nested more than {MAX_NESTING} levels deep") from None
    if _depth(data) > MAX_NESTING:
        raise BatchRequestError(f"JSON nested more than {MAX_NESTING} levels deep")
    return data


def _lines(file: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, int, bytes | None]]:
    """(line number, byte offset, bytes) per line, or (line number, offset, None) for a line over
    `max_line_bytes`, which is skipped in bounded reads rather than held in memory."""
    number, offset = 0, 0
    while True:
        line = file.readline(max_line_bytes + 1)
        if not line:
            return
        number += 1
        start, offset = offset, offset + len(line)
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # the rest of the line, a bounded read at a time
                line = file.readline(READ_BLOCK)
                offset += len(line)
            yield number, start, None
        else:
            yield number, start, line


def _request_of_line(raw: bytes | None, number: int, base_dir: Path, max_line_bytes: int):
    """The request of one line, or its error result (see `read_requests`); None for a blank line."""
    if raw is None:
        error = f"line {number}: longer than {max_line_bytes} bytes (--max-line-bytes); not read"
        return BatchResult.failure(line_id(number), error)
    if not raw.strip():
        return None
    try:
        data = _parse_line(raw, number)
    except BatchRequestError as error:
        return BatchResult.failure(line_id(number), f"line {number}: {error}")
    try:
        return BatchRequest.from_dict(data, base_dir)
    except BatchRequestError as error:
        good_id = isinstance(data, Mapping) and isinstance(data.get("id"), (str, int))
        request_id = data["id"] if good_id and not isinstance(data["id"], bool) else line_id(number)
        return BatchResult.failure(request_id, f"line {number}: {error}")


def read_requests(
    path: Path, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[tuple[int, BatchRequest | BatchResult]]:
    """(line number, request) for each non-blank line, or (line number, error result) for a line that is
    not a valid request (not UTF-8, not JSON, nested too deeply, longer than `max_line_bytes`, wrong
    fields): one bad line never stops the others. Lazy: a file of millions of lines is never held in
    memory, nor is an over-long line."""
    for line in read_request_lines(path, max_line_bytes):
        yield line.number, line.item


@dataclasses.dataclass(frozen=True)
class RequestLine:
    """One non-blank line of a requests file as `lfm2vl batch` runs it: `item` is its request, or the
    error result it gets (bad line, or `id` already taken by an earlier line: then it is known by its
    line, `line_id(number)`); `key` is the id the line itself gives (what a shard is chosen by);
    `offset` its first byte in the file."""

    number: int
    offset: int
    key: Any
    item: BatchRequest | BatchResult


def read_request_lines(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[RequestLine]:
    """Every non-blank line of a requests file (lazily), as `read_requests`."""
    path = Path(path)
    base_dir = path.resolve().parent
    with open(path, "rb") as file:
        for number, offset, raw in _lines(file, max_line_bytes):
            item = _request_of_line(raw, number, base_dir, max_line_bytes)
            if item is not None:
                yield RequestLine(number, offset, item.id, item)


def unique_request_lines(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[RequestLine]:
    """`read_request_lines`, each id once: a line repeating an earlier line's id becomes an error result
    known by its own line (`line_id`), so that every line has one result of its own id."""
    first_line: dict = {}
    for line in read_request_lines(path, max_line_bytes):
        if line.key in first_line:
            message = f"line {line.number}: duplicate id {line.key!r} (first on line {first_line[line.key]})"
            line = dataclasses.replace(line, item=BatchResult.failure(line_id(line.number), message))
        else:
            first_line[line.key] = line.number
        yield line


def read_request_at(path: Path, offset: int, number: int, max_line_bytes: int = MAX_LINE_BYTES):
    """The request (or error result) of line `number`, which starts at byte `offset` of `path`: how a
    worker that was handed a line's place reads it."""
    path = Path(path)
    with open(path, "rb") as file:
        file.seek(offset)
        _, _, raw = next(_lines(file, max_line_bytes))
    return _request_of_line(raw, number, path.resolve().parent, max_line_bytes)


def count_lines(path: Path) -> int:
    """Non-blank lines of a file (the progress bar's total), read in fixed-size blocks: memory does not
    grow with the length of a line."""
    count, blank = 0, True  # blank: the current line holds only whitespace so far
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            for i, part in enumerate(block.split(b"\n")):
                if i:  # a line ended
                    count += not blank
                    blank = True
                blank = blank and not part.strip()
    return count + (not blank)


def is_result_line(line: bytes) -> bool:
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return False
    return isinstance(data, dict) and "id" in data and data.get("finish_reason") in FINISH_REASONS


class ResultWriter:
    """Appends results to a JSONL file, one whole line per `write` call.

    Constructing it only reads and checks (nothing is written until `open`, so a run can check all else
    before touching its output). resume: keep the existing file, which must hold result lines only (a
    torn last line left by a killed run is cut off at `open`), and report the ids it holds in
    `done_ids`; otherwise an existing file is refused unless `overwrite` (which empties it at `open`).
    """

    def __init__(self, path: Path, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.resume = resume
        self.done_ids: set = set()
        self._fd = -1
        self._keep: int | None = None  # resume: the bytes of complete lines, where a torn line is cut
        if resume and overwrite:
            raise OutputFileError("--resume continues the output and --overwrite replaces it: pass one")
        exists = self.path.exists()
        if exists and not self.path.is_file() and self.path != Path(os.devnull):
            raise OutputFileError(f"{self.path} is not a regular file")
        if exists and not (resume or overwrite) and self.path.stat().st_size:
            raise OutputFileError(
                f"{self.path} exists; pass --resume to continue it (skipping the ids it holds) or "
                "--overwrite to replace it"
            )
        if exists and resume and self.path.is_file():
            self.done_ids = self._read_results()

    def _read_results(self) -> set:
        """The ids of an existing results file, every line checked first: nothing is changed in a file
        that is not one (a torn last line must look like the start of a result line)."""
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        torn = data[complete:]
        ids = set()
        for number, line in enumerate(data[:complete].splitlines(), start=1):
            if line.strip() and not is_result_line(line):
                raise OutputFileError(
                    f"--resume: {self.path}, line {number} is not a result line of lfm2vl batch; is this the "
                    "right file? (left unchanged)"
                )
            if line.strip():
                ids.add(json.loads(line)["id"])
        if torn and not RESULT_LINE_START.startswith(torn[: len(RESULT_LINE_START)]):
            raise OutputFileError(
                f"--resume: {self.path} ends in a line that is not a result line of lfm2vl batch; is this "
                "the right file? (left unchanged)"
            )
        self._keep = complete if torn else None
        return ids

    def open(self) -> ResultWriter:
        """Starts writing: cuts a torn last line (resume) or empties the file (overwrite), then appends."""
        if self._keep is not None:  # a torn line: the run was killed in the middle of writing it
            with open(self.path, "r+b") as f:
                f.truncate(self._keep)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if not self.resume else 0)
        self._fd = os.open(self.path, flags, 0o644)
        return self

    def write(self, result: BatchResult) -> None:
        data = (json.dumps(result.to_dict(), ensure_ascii=False) + "\n").encode("utf-8")
        while data:  # a regular file takes it in one call; loop in case it does not
            data = data[os.write(self._fd, data) :]

    def close(self) -> None:
        if self._fd >= 0:
            if self.path.is_file():
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ResultWriter:
        return self.open() if self._fd < 0 else self

    def __exit__(self, *exc: object) -> None:
        self.close()
