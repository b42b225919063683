"""Chat templates compiled and rendered as transformers (5.x) renders them.

The sandboxed jinja2 environment of `transformers.utils.chat_template_utils` (trim/lstrip blocks, loop
controls, its `tojson`, `raise_exception`, `strftime_now`, `dict` and `namespace`) plus its
`{% generation %}` block extension: the LFM2.5-VL templates wrap each assistant turn in
`{% generation %}...{% endgeneration %}`, which renders the body unchanged and, when the caller asks for
the assistant mask, records the body's character span in the rendered text. `continue_final_message` is
ported from transformers too (the final message is rendered with a tag after it and the text is cut at
the tag).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .image_processor import ProcessorError

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# transformers' test for a template that marks assistant turns
_GENERATION_TAG = re.compile(r"\{\%-?\s*generation\s*-?\%\}")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "

Span = tuple[int, int]


class _GenerationBlocks(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: the body, unchanged; while a render is tracked, the body's
    (start, end) character span in the output so far is recorded (transformers' AssistantTracker)."""

    tags = {"generation"}

    def __init__(self, environment: jinja2.Environment) -> None:
        super().__init__(environment)
        # (blocks rendered so far, spans) of the render being tracked, or None
        self.tracking: ContextVar[tuple[list[str], list[Span]] | None] = ContextVar(
            "generation_spans", default=None
        )
        environment.extend(generation_tracking=self.tracking)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_record"), [], [], body).set_lineno(lineno)

    def _record(self, caller: Any) -> str:
        body = caller()
        tracking = self.tracking.get()
        if tracking is not None:
            blocks, spans = tracking
            start = len("".join(blocks))
            spans.append((start, start + len(body)))
        return body


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' override: no HTML escaping, json.dumps options exposed
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _TemplateNamespace(jinja2.utils.Namespace):
    """transformers' `namespace`: no underscore-prefixed attributes (a way towards CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Namespace's signature trick: `namespace(self=...)`
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}"
            )


def _template_dict(*args: Any, **kwargs: Any) -> dict:
    # transformers' `dict`: a plain function, not the type (no attribute access to the class)
    return dict(*args, **kwargs)


def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlocks, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    environment.globals["dict"] = _template_dict
    environment.globals["namespace"] = _TemplateNamespace
    return environment


def template_data(value: Any) -> Any:
    """What the template sees, as transformers builds it: plain JSON-like data (subclasses reduced to their
    base type); media and any other object become an inert '<TypeName>' string."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {template_data(key): template_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [template_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(template_data(item) for item in value)
    if isinstance(value, np.generic):
        return template_data(value.item())
    return f"<{type(value).__name__}>"


def alias_reasoning_fields(message: dict[str, Any]) -> dict[str, Any]:
    # as transformers: a message's reasoning is readable as `reasoning_content` and `thinking`
    reasoning = next((message[key] for key in REASONING_FIELDS if message.get(key) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


class ChatTemplate:
    """A compiled chat template; `origin` (a file, or "the chat_template argument") is named in errors."""

    def __init__(self, source: str, origin: str) -> None:
        self.source = source
        self.origin = origin
        environment = _environment()
        try:
            self._template = environment.from_string(source)
            # names the template reads from its context (transformers routes other keywords elsewhere)
            self.variables = frozenset(jinja2.meta.find_undeclared_variables(environment.parse(source)))
        except jinja2.exceptions.TemplateSyntaxError as error:
            raise ProcessorError(
                f"chat template {origin}, line {error.lineno}: does not compile: {error.message}"
            ) from None
        self._tracking = environment.generation_tracking
        self.has_generation_markers = bool(_GENERATION_TAG.search(source))

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool | str,
        track_generation: bool,
        context: Mapping[str, Any],
    ) -> tuple[str, list[Span]]:
        """The rendered text of one conversation (plain data, see `template_data`) and, with
        `track_generation`, the character spans of its `{% generation %}` blocks. Template errors
        (`raise_exception`, undefined names, ...) raise `jinja2.TemplateError`; misuse of
        `continue_final_message` raises `ProcessorError`."""
        messages = [alias_reasoning_fields(message) for message in messages]
        final_text = None
        if continue_final_message:
            messages, final_text = self._tag_final_message(messages, continue_final_message)
        variables = {"messages": messages, "add_generation_prompt": add_generation_prompt, **context}
        spans: list[Span] = []
        if track_generation:
            blocks: list[str] = []
            token = self._tracking.set((blocks, spans))
            try:
                for block in self._template.generate(**variables):
                    blocks.append(block)
            finally:
                self._tracking.reset(token)
            text = "".join(blocks)
        else:
            text = self._template.render(**variables)
        if final_text is not None:
            text = self._cut_at_tag(text, final_text)
        return text, spans

    def _tag_final_message(
        self, messages: list[dict[str, Any]], continue_final_message: bool | str
    ) -> tuple[list[dict[str, Any]], str]:
        """transformers' continue_final_message: the final message's field (`content` unless named) with a
        tag appended, so that the render can be cut right after that text."""
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final = dict(messages[-1])
        final_message = final.get(field)
        if final_message is None:
            raise ProcessorError(f'continue_final_message: the final message has no "{field}" to continue')
        fields = [field]
        if field in REASONING_FIELDS:
            fields = [name for name in REASONING_FIELDS if final.get(name) == final_message]
        if not any(name in self.source for name in fields):
            raise ProcessorError(
                f'continue_final_message is "{field}", a field the chat template ({self.origin}) never reads'
            )
        if isinstance(final_message, (list, tuple)):
            blocks = [dict(block) for block in final_message]
            for block in reversed(blocks):
                if "text" in block:
                    final_message = block["text"]
                    block["text"] = block["text"] + _CONTINUE_TAG
                    break
            else:
                raise ProcessorError("continue_final_message: the final message has no text to continue")
            final[field] = blocks
        else:
            for name in fields:
                final[name] = final[name] + _CONTINUE_TAG
        return [*messages[:-1], final], final_message

    @staticmethod
    def _cut_at_tag(text: str, final_message: str) -> str:
        if final_message.strip() not in text or _CONTINUE_TAG.strip() not in text:
            raise ProcessorError(
                "continue_final_message: the final message does not appear in the rendered chat (the "
                "template changes it)"
            )
        tag = text.rindex(_CONTINUE_TAG.strip())
        if text[tag : tag + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            return text[:tag]
        return text[:tag].rstrip()  # the template trimmed the tag's trailing space


def check_tools_and_documents(tools: Any, documents: Any) -> None:
    """Tools must be JSON-schema dicts (transformers also converts Python functions; we do not) and
    documents dicts."""
    for name, values in (("tools", tools), ("documents", documents)):
        if values is None:
            continue
        if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
            raise ProcessorError(f"{name} must be a list of dicts, got {type(values).__name__}")
        for index, value in enumerate(values):
            if not isinstance(value, Mapping):
                raise ProcessorError(
                    f"{name}[{index}] is a {type(value).__name__}; pass a JSON-schema dict"
                    if name == "tools"
                    else f"{name}[{index}] is a {type(value).__name__}; pass a dict"
                )
