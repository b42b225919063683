"""Tool calls in LFM2/LFM2.5 answers: `<|tool_call_start|>[f(a="x", b=1), g()]<|tool_call_end|>`, a Python
list of calls with keyword arguments (what the chat template renders for a message's `tool_calls`:
strings in double quotes, mappings as JSON, other values as Python writes them).

Parsed with `ast` (nothing is evaluated): each call becomes
`{"type": "function", "function": {"name": ..., "arguments": {...}}}`, the form a message's `tool_calls`
takes, so a call can be appended to the conversation as the assistant's turn.
"""

from __future__ import annotations

import ast
from typing import Any

from ..errors import Lfm2VlError

TOOL_CALL_START = "<|tool_call_start|>"
TOOL_CALL_END = "<|tool_call_end|>"
_JSON_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


class ToolCallError(Lfm2VlError):
    """Text between the tool-call markers that is not a list of calls with literal keyword arguments."""


def _shown(text: str) -> str:
    return repr(text if len(text) <= 200 else text[:197] + "...")


def _literal(node: ast.expr, where: str) -> Any:
    """A literal value (Python's or JSON's spelling of true/false/null); anything else is an error."""
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(item, where) for item in node.elts]
    if isinstance(node, ast.Dict):
        if any(key is None for key in node.keys):
            raise ToolCallError(f"{where}: '**' in a tool call argument")
        return {_literal(k, where): _literal(v, where) for k, v in zip(node.keys, node.values, strict=True)}
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ToolCallError(f"{where}: argument {ast.unparse(node)!r} is not a literal value") from None


def _call_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (prefix := _call_name(node.value)) is not None:
        return f"{prefix}.{node.attr}"
    return None


def _parse_calls(body: str) -> list[dict[str, Any]]:
    where = f"tool call {_shown(body)}"
    try:
        tree = ast.parse(body.strip(), mode="eval").body
    except SyntaxError as error:
        raise ToolCallError(f"{where} is not a list of calls: {error.msg}") from None
    calls = tree.elts if isinstance(tree, ast.List) else [tree]
    parsed = []
    for call in calls:
        name = _call_name(call.func) if isinstance(call, ast.Call) else None
        if name is None:
            raise ToolCallError(f"{where}: {ast.unparse(call)!r} is not a call of a named function")
        if call.args:
            raise ToolCallError(f"{where}: {name} has positional arguments; tool calls name every argument")
        if any(keyword.arg is None for keyword in call.keywords):
            raise ToolCallError(f"{where}: '**' in the arguments of {name}")
        arguments = {keyword.arg: _literal(keyword.value, where) for keyword in call.keywords}
        parsed.append({"type": "function", "function": {"name": name, "arguments": arguments}})
    return parsed


def parse_tool_calls(
    text: str, start: str = TOOL_CALL_START, end: str = TOOL_CALL_END
) -> list[dict[str, Any]]:
    """Every tool call in a generated answer (decoded with `skip_special_tokens=False`, so that the markers
    remain), in order; [] when it has none. A block that does not parse, or a start marker without its end,
    raises `ToolCallError` naming the text."""
    if not isinstance(text, str):
        raise ToolCallError(f"parse_tool_calls takes the answer's text, got {type(text).__name__}")
    calls: list[dict[str, Any]] = []
    position = text.find(start)
    while position >= 0:
        stop = text.find(end, position + len(start))
        if stop < 0:
            raise ToolCallError(f"{start} without {end} in {_shown(text[position:])}")
        calls.extend(_parse_calls(text[position + len(start) : stop]))
        position = text.find(start, stop + len(end))
    return calls
