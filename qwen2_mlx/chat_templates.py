"""The chat templates of the qwen2 family, rendered exactly and without jinja.

Every checkpoint ships its template as jinja text (tokenizer_config.json "chat_template" or
chat_template.jinja). `recognize_chat_template` maps the published texts of the family onto
the hand-written renderers below; each renderer reproduces its template character for
character, quirks included (tests/test_chat_templates.py compares them with transformers on
the real texts, which tests/data/chat_templates/SOURCES.md traces to the checkpoints).

- Qwen2-Instruct: ChatML with a default system message.
- Qwen2.5-Instruct, -Coder, -Math and QwQ-32B-Preview: one template text that differs only in
  its default system prompt; it adds a `<tools>` system block, renders assistant tool calls as
  `<tool_call>` JSON and groups consecutive tool results as `<tool_response>` blocks in one
  user turn. Its first release (2024-09) wrote the call example with doubled braces.
- QwQ-32B: the Qwen2.5 layout without a default system prompt; earlier assistant turns lose
  their reasoning (text up to `</think>`), and the generation prompt opens `<think>`.
- DeepSeek-R1-Distill-Qwen: its own markers (`<｜User｜>`, `<｜Assistant｜>`), the system prompt
  right after BOS, reasoning stripped from earlier turns, and (since 2025-02) a generation
  prompt that opens `<think>`.

Recognition is by fingerprint: the SHA-256 of the template text (one trailing newline after a
closing `%}` dropped, since jinja's trim_blocks drops it too), and for the Qwen2.5 layout the
fingerprint of the text with its default-system literal cut out, so that any default system
prompt in that exact layout is recognised and rendered with that prompt. Anything else is left
to the jinja fallback (qwen2_mlx.jinja_template).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from qwen2_mlx.chat import IM_END, IM_START, chatml
from qwen2_mlx.chat_messages import check_tools, normalize_messages

QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

_TOOLS_INTRO = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{example}\n"
    "</tool_call><|im_end|>\n"
)
CALL_EXAMPLE = '{"name": <function-name>, "arguments": <args-json-object>}'
# The 2024-09 Qwen2.5 text wrote {{...}} inside a jinja string, where braces are literal.
CALL_EXAMPLE_DOUBLED = "{" + CALL_EXAMPLE + "}"

_CHATML_ROLES = frozenset({"system", "user", "assistant", "tool"})


def tojson(value: object) -> str:
    """transformers' `tojson` filter: json.dumps keeping non-ASCII and key order."""
    return json.dumps(value, ensure_ascii=False)


def _without_thinking(content: str) -> str:
    """QwQ's history rule: drop everything up to the last `</think>` and leading newlines."""
    return content.split("</think>")[-1].lstrip("\n")


def render_qwen2(messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool,
                 bos_token: str | None = None) -> str:
    """Qwen2-Instruct's ChatML: a default system message when the first is not a system one."""
    return chatml(messages, add_generation_prompt)


def render_qwen25(messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool,
                  bos_token: str | None = None, *, default_system: str | None,
                  call_example: str = CALL_EXAMPLE, strip_thinking: str | None = None,
                  generation_prompt: str = f"{IM_START}assistant\n") -> str:
    """The Qwen2.5 template layout, shared by Qwen2.5, Qwen2.5-Coder/Math and QwQ.

    `default_system` None is QwQ's rule: no system block unless one is given ('' before the
    tools). `strip_thinking` is "every" (QwQ's first text: all assistant turns) or
    "before_last" (every turn but the conversation's last); None keeps content as written.
    """
    parts = []
    first_is_system = messages[0]["role"] == "system"
    if tools:
        system = messages[0]["content"] if first_is_system else (default_system or "")
        parts.append(f"{IM_START}system\n{system}{_TOOLS_INTRO}")
        parts.extend("\n" + tojson(tool) for tool in tools)
        parts.append(_TOOLS_OUTRO.format(example=call_example))
    elif first_is_system:
        parts.append(f"{IM_START}system\n{messages[0]['content']}{IM_END}\n")
    elif default_system is not None:
        parts.append(f"{IM_START}system\n{default_system}{IM_END}\n")

    last = len(messages) - 1
    for i, m in enumerate(messages):
        role, content, calls = m["role"], m["content"], m.get("tool_calls")
        if role == "assistant" and strip_thinking and content is not None and (
            strip_thinking == "every" or i != last
        ):
            shown = _without_thinking(content)
        else:
            shown = content
        if role == "user" or (role == "system" and i > 0) or (role == "assistant" and not calls):
            parts.append(f"{IM_START}{role}\n{shown}{IM_END}\n")
        elif role == "assistant":
            parts.append(f"{IM_START}{role}")
            if content:  # the template tests the message's own content, not the stripped text
                parts.append("\n" + shown)
            for call in calls:
                fn = call["function"]
                parts.append(f'\n<tool_call>\n{{"name": "{fn["name"]}", "arguments": '
                             f'{tojson(fn["arguments"])}}}\n</tool_call>')
            parts.append(f"{IM_END}\n")
        elif role == "tool":
            if i == 0 or messages[i - 1]["role"] != "tool":
                parts.append(f"{IM_START}user")
            parts.append(f"\n<tool_response>\n{content}\n</tool_response>")
            if i == last or messages[i + 1]["role"] != "tool":
                parts.append(f"{IM_END}\n")
    if add_generation_prompt:
        parts.append(generation_prompt)
    return "".join(parts)


# DeepSeek-R1's markers use FULLWIDTH VERTICAL LINE (U+FF5C) and LOWER ONE EIGHTH BLOCK (U+2581).
DS_USER = "<｜User｜>"
DS_ASSISTANT = "<｜Assistant｜>"
DS_EOS = "<｜end▁of▁sentence｜>"
DS_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
DS_CALLS_END = "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN = "<｜tool▁call▁begin｜>"
DS_CALL_END = "<｜tool▁call▁end｜>"
DS_SEP = "<｜tool▁sep｜>"
DS_OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
DS_OUTPUTS_END = "<｜tool▁outputs▁end｜>"
DS_OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
DS_OUTPUT_END = "<｜tool▁output▁end｜>"


def _ds_call(call: dict) -> str:
    fn = call["function"]
    return (f"{call['type']}{DS_SEP}{fn['name']}\n```json\n{fn['arguments']}\n```{DS_CALL_END}")


def render_deepseek_r1(messages: list[dict], tools: list[dict] | None,
                       add_generation_prompt: bool, bos_token: str | None = None, *,
                       generation_prompt: str = DS_ASSISTANT) -> str:
    """DeepSeek-R1-Distill's template, its namespace flags kept exactly as the jinja has them.

    Quirks reproduced on purpose: the last system message wins and goes right after BOS; an
    assistant message calls tools only when its content is None; the "first call" and "first
    output" flags never reset across turns, and only non-first calls close the call list.
    """
    system = ""
    for m in messages:
        if m["role"] == "system":
            system = m["content"]
    parts = [bos_token or "", system]
    is_first, is_tool, is_output_first = False, False, True
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "user":
            is_tool = False
            parts.append(DS_USER + content)
        if role == "assistant" and content is None:
            is_tool = False
            for call in m.get("tool_calls") or []:
                if not is_first:
                    parts.append(f"{DS_ASSISTANT}{DS_CALLS_BEGIN}{DS_CALL_BEGIN}{_ds_call(call)}")
                    is_first = True
                else:
                    parts.append(f"\n{DS_CALL_BEGIN}{_ds_call(call)}{DS_CALLS_END}{DS_EOS}")
        if role == "assistant" and content is not None:
            if is_tool:
                parts.append(DS_OUTPUTS_END + content + DS_EOS)
                is_tool = False
            else:
                if "</think>" in content:
                    content = content.split("</think>")[-1]
                parts.append(DS_ASSISTANT + content + DS_EOS)
        if role == "tool":
            is_tool = True
            if is_output_first:
                parts.append(f"{DS_OUTPUTS_BEGIN}{DS_OUTPUT_BEGIN}{content}{DS_OUTPUT_END}")
                is_output_first = False
            else:
                parts.append(f"\n{DS_OUTPUT_BEGIN}{content}{DS_OUTPUT_END}")
    if is_tool:
        parts.append(DS_OUTPUTS_END)
    if add_generation_prompt and not is_tool:
        parts.append(generation_prompt)
    return "".join(parts)


@dataclass(frozen=True)
class ChatFormat:
    """A chat template that qwen2-mlx renders natively.

    `tool_call_format` names how the model writes tool calls ("qwen": `<tool_call>` JSON,
    "deepseek": DeepSeek's call markers, None: the template has none); `reasoning` is whether
    the model thinks in `<think>...</think>` first.
    """

    name: str
    description: str
    renderer: Callable[..., str]
    roles: frozenset[str] | None
    arguments_as: str = "object"
    renders_tools: bool = True
    tool_call_format: str | None = "qwen"
    reasoning: bool = False

    def render(self, messages: list[dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = True, bos_token: str | None = None) -> str:
        """The prompt text for `messages` (and `tools`), exactly as the jinja template renders
        it; ValueError for input the template cannot express."""
        tools = check_tools(tools)
        if tools and not self.renders_tools:
            raise ValueError(
                f"this model's chat template ({self.description}) does not show tools to the "
                f"model; call it without tools"
            )
        normalized = normalize_messages(messages, self.roles, self.arguments_as)
        if self.tool_call_format is None and any("tool_calls" in m for m in normalized):
            raise ValueError(
                f"this model's chat template ({self.description}) cannot render assistant "
                f"tool calls"
            )
        return self.renderer(normalized, tools, bool(add_generation_prompt), bos_token)


def _qwen25_format(default_system: str, call_example: str) -> ChatFormat:
    if call_example == CALL_EXAMPLE_DOUBLED:
        description = "Qwen2.5-Instruct, first release (2024-09)"
    elif default_system == QWEN25_DEFAULT_SYSTEM:
        description = "Qwen2.5-Instruct / Qwen2.5-Coder-Instruct"
    else:
        description = f"Qwen2.5 layout, default system prompt {default_system!r}"
    return ChatFormat(
        "qwen2.5", description,
        functools.partial(render_qwen25, default_system=default_system, call_example=call_example),
        _CHATML_ROLES,
    )


QWEN2 = ChatFormat("qwen2", "Qwen2-Instruct", render_qwen2, None, renders_tools=False,
                   tool_call_format=None)
QWQ = ChatFormat(
    "qwq", "QwQ-32B (keeps the last turn's reasoning)",
    functools.partial(render_qwen25, default_system=None, strip_thinking="before_last",
                      generation_prompt=f"{IM_START}assistant\n<think>\n"),
    _CHATML_ROLES, reasoning=True,
)
QWQ_STRIP_ALL = ChatFormat(
    "qwq", "QwQ-32B (strips reasoning from every assistant turn)",
    functools.partial(render_qwen25, default_system=None, strip_thinking="every",
                      generation_prompt=f"{IM_START}assistant\n<think>\n"),
    _CHATML_ROLES, reasoning=True,
)
DEEPSEEK_R1 = ChatFormat(
    "deepseek-r1-distill", "DeepSeek-R1-Distill (2025-02: the generation prompt opens <think>)",
    functools.partial(render_deepseek_r1, generation_prompt=DS_ASSISTANT + "<think>\n"),
    _CHATML_ROLES, arguments_as="json", renders_tools=False, tool_call_format="deepseek",
    reasoning=True,
)
DEEPSEEK_R1_2025_01 = ChatFormat(
    "deepseek-r1-distill", "DeepSeek-R1-Distill (2025-01 release)", render_deepseek_r1,
    _CHATML_ROLES, arguments_as="json", renders_tools=False, tool_call_format="deepseek",
    reasoning=True,
)

# template_fingerprint of each published text (tests/data/chat_templates/SOURCES.md).
_EXACT_FINGERPRINTS = {
    "793202280c0910ab26bc6eb57c8212c2417324c6d8c4efd0d10d59092ab3e3eb": QWEN2,
    "cb2d7aa140bed098f4ac8ab1a403980e6768d58ec95ef701668fc7dd017e0762": QWQ,
    "3487c45e3264dacd700300db2d9c63f97dc7fb68057c8cb805fb5dd5c6366811": QWQ_STRIP_ALL,
    "56a1447ad31926fdc21fb07e56e5642bd9c850c4f52d8c8af7bbe5f079a84f5f": DEEPSEEK_R1,
    "b6835114b7303ddd78919a82e4d9f7d8c26ed0d7dfc36beeb12d524f6144eab1": DEEPSEEK_R1_2025_01,
}
# template_fingerprint of the Qwen2.5 layout, its default-system literal replaced by SYSTEM_SLOT.
_QWEN25_LAYOUT_FINGERPRINTS = {
    "0e6f40109d1a6ba4fb814586dbd782b00790d55200c7fe72323af9323b1953bb": CALL_EXAMPLE,
    "7aa1d1a4275f24115d082002085bf7d0d2b26db752b3562a796bf1bcb6027c9b": CALL_EXAMPLE_DOUBLED,
}
SYSTEM_SLOT = "\x00SYSTEM\x00"

# The no-tools branch of the Qwen2.5 layout writes the default system message as one literal.
_QWEN25_DEFAULT_SYSTEM_LINE = re.compile(
    r"\{\{- '<\|im_start\|>system\\n((?:[^'\\]|\\.)*)<\|im_end\|>\\n' \}\}"
)


def template_fingerprint(template: str) -> str:
    """SHA-256 of a template text, one trailing newline after a closing `%}` dropped (jinja's
    trim_blocks drops it when rendering, so both spellings render alike)."""
    if template.endswith("%}\n"):
        template = template[:-1]
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def _jinja_string_value(literal: str) -> str:
    """The value of a jinja string literal's body, unescaped as jinja's lexer does."""
    literal = re.sub(r"\r\n|\r", "\n", literal)
    return literal.encode("ascii", "backslashreplace").decode("unicode-escape")


def recognize_chat_template(template: str | None) -> ChatFormat | None:
    """The built-in renderer for `template`, or None when it is not one the family ships."""
    if not isinstance(template, str):
        return None
    found = _EXACT_FINGERPRINTS.get(template_fingerprint(template))
    if found is not None:
        return found
    match = _QWEN25_DEFAULT_SYSTEM_LINE.search(template)
    if match is None:
        return None
    literal = match.group(1)
    in_tools_branch = "{{- '" + literal + "' }}"
    if template.count(in_tools_branch) != 1 or SYSTEM_SLOT in template:
        return None
    line_with_slot = "{{- '<|im_start|>system\\n" + SYSTEM_SLOT + "<|im_end|>\\n' }}"
    layout = template.replace(in_tools_branch, "{{- '" + SYSTEM_SLOT + "' }}").replace(
        match.group(0), line_with_slot
    )
    call_example = _QWEN25_LAYOUT_FINGERPRINTS.get(template_fingerprint(layout))
    if call_example is None:
        return None
    return _qwen25_format(_jinja_string_value(literal), call_example)
