"""Checking and normalising chat messages and tool schemas before a template renders them.

Messages follow the OpenAI chat shape that transformers' `apply_chat_template` also takes:
``{"role": ..., "content": ...}``, where content is a string, None (an assistant message that
only calls tools), or a list of text parts (``{"type": "text", "text": ...}``), and an assistant
message may carry ``tool_calls`` (``{"type": "function", "function": {"name", "arguments"}}``,
arguments as a dict or a JSON string). Bad input is a `ValueError` that names the message.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def check_message_list(messages: object) -> list[dict]:
    """Raise ValueError unless `messages` is a non-empty list of dicts with a string 'role'."""
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence):
        raise ValueError(
            f"messages must be a list of dicts with 'role' and 'content', "
            f"got {type(messages).__name__}"
        )
    if len(messages) == 0:
        raise ValueError("messages must not be empty")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        if "role" not in message:
            raise ValueError(f"messages[{i}] has no 'role' key")
        if not isinstance(message["role"], str):
            raise ValueError(
                f"messages[{i}]['role'] must be a str, got {type(message['role']).__name__}"
            )
    return list(messages)


def content_text(content: object, where: str) -> str | None:
    """A message's content as text: a string as is, text parts joined by newlines (as vLLM
    joins them), None kept as None."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ValueError(
                    f"{where}['content'][{j}] must be a text part "
                    f"{{'type': 'text', 'text': ...}}; qwen2 models read text only"
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(f"{where}['content'] must be a str, got {type(content).__name__}")


def _tool_call(call: object, where: str, arguments_as: str) -> dict:
    """One tool call in the canonical OpenAI shape, with arguments as a dict or a JSON string."""
    if not isinstance(call, dict):
        raise ValueError(f"{where} must be a dict, got {type(call).__name__}")
    function = call.get("function", call)
    if not isinstance(function, dict):
        raise ValueError(f"{where}['function'] must be a dict")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where} has no function name")
    arguments: Any = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} arguments are not valid JSON: {e}") from e
        # JSON text stays verbatim where the template concatenates it (DeepSeek's does).
        if arguments_as == "object":
            arguments = parsed
    elif arguments_as == "json":
        arguments = json.dumps(arguments, ensure_ascii=False)
    kind = call.get("type", "function")
    if not isinstance(kind, str):
        raise ValueError(f"{where}['type'] must be a str")
    out = {"type": kind, "function": {"name": name, "arguments": arguments}}
    if "id" in call:
        out["id"] = call["id"]
    return out


def normalize_messages(messages: object, roles: frozenset[str] | None,
                       arguments_as: str = "object") -> list[dict]:
    """Messages as the built-in renderers read them: {'role', 'content', 'tool_calls'?}.

    `roles` are the roles the template renders (None: any); a role it would silently drop is an
    error instead. Content may be None (or missing) only in an assistant message with tool
    calls. Tool-call arguments become dicts (`arguments_as="object"`: what Qwen's templates
    render with `tojson`, so a JSON string renders like the object it encodes, as vLLM does) or
    JSON text (`"json"`, kept verbatim when given as text).
    """
    out = []
    for i, message in enumerate(check_message_list(messages)):
        where = f"messages[{i}]"
        role = message["role"]
        if roles is not None and role not in roles:
            raise ValueError(
                f"{where} has role {role!r}, which this model's chat template does not render "
                f"(it renders {', '.join(sorted(roles))})"
            )
        content = content_text(message.get("content"), where)
        calls = message.get("tool_calls")
        if content is None and not (role == "assistant" and calls):
            raise ValueError(f"{where} (role {role!r}) has no content")
        normalized = {"role": role, "content": content}
        if calls:
            if role != "assistant":
                raise ValueError(f"{where}: only assistant messages carry tool_calls")
            if not isinstance(calls, list):
                raise ValueError(f"{where}['tool_calls'] must be a list")
            normalized["tool_calls"] = [
                _tool_call(call, f"{where}['tool_calls'][{j}]", arguments_as)
                for j, call in enumerate(calls)
            ]
        out.append(normalized)
    return out


def check_tools(tools: object) -> list[dict] | None:
    """Raise ValueError unless `tools` is None or a list of OpenAI function schemas (dicts with
    a function name, bare or under 'function'). The schemas are passed to the template as is."""
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, dict)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of function schemas, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise ValueError(
                f"tools[{i}] must be a JSON schema dict (callables are not converted), "
                f"got {type(tool).__name__}"
            )
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                f"'parameters': ...}}}}"
            )
    return list(tools)
