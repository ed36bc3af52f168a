"""Tool calls in generated text: the markup each model writes and the calls it stands for
(`qwen2_mlx.output_parser` finds them in the text).

Qwen2.5 and QwQ write each call as
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (the format their chat
template asks for); DeepSeek-R1's template uses its own markers, a
``<｜tool▁calls▁begin｜>`` list of ``type<｜tool▁sep｜>name`` + a ```json block each.

    >>> from qwen2_mlx.output_parser import parse_tool_calls
    >>> text = '<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>'
    >>> parsed = parse_tool_calls(text)
    >>> parsed.tool_calls[0].name, parsed.tool_calls[0].arguments
    ('f', {'x': 1})

(`parse_tool_calls` lives beside the streaming `OutputParser`, which does the work and
imports this module.) A block whose JSON is not a valid call is not an exception: it stays
in the text, and the result's `malformed` flag is set.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from qwen2_mlx.chat_templates import (
    DS_CALL_BEGIN,
    DS_CALL_END,
    DS_CALLS_BEGIN,
    DS_CALLS_END,
    DS_SEP,
)


def new_tool_call_id() -> str:
    """An OpenAI-style call id ("call_" and 24 hex digits)."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ToolCall:
    """One function call the model made: its name, its arguments (a JSON object) and an id."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=new_tool_call_id)

    def to_openai(self) -> dict:
        """The OpenAI chat-completions shape (arguments as JSON text)."""
        return {"id": self.id, "type": "function", "function": {
            "name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}

    def to_message_call(self) -> dict:
        """The shape to put in an assistant message's ``tool_calls`` for the next turn."""
        return self.to_openai()


def _make_call(name: object, arguments: object) -> ToolCall | None:
    """A call if `name` is a non-empty string and `arguments` a JSON object (or its text)."""
    if not isinstance(name, str) or not name.strip():
        return None
    if isinstance(arguments, str):  # some fine-tunes write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return ToolCall(name.strip(), arguments) if isinstance(arguments, dict) else None


def _call_from_json(text: str) -> ToolCall | None:
    """A call from `{"name": str, "arguments": object}` JSON text, or None if it is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict):
        return None
    return _make_call(value.get("name"), value.get("arguments", {}))


_DS_CALL = re.compile(
    re.escape(DS_CALL_BEGIN) + r"(?P<type>[^\n]*?)" + re.escape(DS_SEP) + r"(?P<name>[^\n]+)\n"
    r"```(?:json)?\n(?P<args>.*?)\n```" + re.escape(DS_CALL_END), re.DOTALL,
)


def _deepseek_calls(inner: str) -> list[ToolCall] | None:
    """The calls in the body of a DeepSeek tool-call list, or None if it is not all calls."""
    calls, at = [], 0
    for match in _DS_CALL.finditer(inner):
        if inner[at:match.start()].strip():
            return None
        call = _make_call(match["name"], match["args"])
        if call is None:
            return None
        calls.append(call)
        at = match.end()
    return calls if calls and not inner[at:].strip() else None


@dataclass(frozen=True)
class ToolCallFormat:
    """The markup around a model's tool calls, and how to read what is inside."""

    name: str
    start: str
    end: str

    def parse_block(self, inner: str) -> list[ToolCall] | None:
        """The calls written between `start` and `end`, or None when they are malformed."""
        if self.name == "deepseek":
            return _deepseek_calls(inner)
        call = _call_from_json(inner.strip())
        return None if call is None else [call]


TOOL_CALL_FORMATS = {
    "qwen": ToolCallFormat("qwen", "<tool_call>", "</tool_call>"),
    "deepseek": ToolCallFormat("deepseek", DS_CALLS_BEGIN, DS_CALLS_END),
}
