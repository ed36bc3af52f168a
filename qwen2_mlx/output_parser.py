"""Splitting a model's output, while it streams, into answer text, reasoning and tool calls.

Reasoning models (QwQ, DeepSeek-R1-Distill) think first, in ``<think>...</think>``; their
templates often open the ``<think>`` in the prompt, so the output starts inside it. Tool calls
are markup (tools.TOOL_CALL_FORMATS) that the caller gets as parsed `ToolCall`s instead of text.
Markup is held back while it may still be completing, so no piece of text ever shows a partial
``</think>`` or ``<tool_call>``; what is held back is released as soon as it cannot be one. Fed
in any chunks, the parser splits a text exactly as it splits it fed whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen2_mlx.chat_messages import check_tools
from qwen2_mlx.tools import TOOL_CALL_FORMATS, ToolCall, ToolCallFormat

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass
class ParsedDelta:
    """The answer text and the reasoning that became printable after one chunk."""

    text: str = ""
    reasoning: str = ""

    def __add__(self, other: ParsedDelta) -> ParsedDelta:
        return ParsedDelta(self.text + other.text, self.reasoning + other.reasoning)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (and is shorter than it)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class OutputParser:
    """Incremental splitter of generated text.

    Args:
        tool_format: the markup tool calls are parsed from; None leaves any markup as text.
        in_reasoning: the prompt left a ``<think>`` open, so the output begins as reasoning.
        detect_reasoning: an output that begins (after whitespace) with ``<think>`` is reasoning
            up to ``</think>``; only this first block counts.
    """

    def __init__(self, tool_format: ToolCallFormat | None = None, *, in_reasoning: bool = False,
                 detect_reasoning: bool = True) -> None:
        self._tool = tool_format
        self._state = "reasoning" if in_reasoning else ("start" if detect_reasoning else "content")
        self._buf = ""
        self._after_call = False  # whitespace right after a call belongs to the markup
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self.tool_calls: list[ToolCall] = []
        self.malformed = False

    @classmethod
    def for_prompt(cls, tokenizer, prompt_ids, tools) -> OutputParser:
        """The parser for generating after `prompt_ids`: tool calls are parsed when `tools` were
        given, in the tokenizer's format; the output starts as reasoning when the prompt ends
        with an open ``<think>`` (QwQ's and DeepSeek-R1's generation prompts)."""
        tool_format = TOOL_CALL_FORMATS[tokenizer.tool_call_format] if check_tools(tools) else None
        tail = tokenizer.decode(list(prompt_ids)[-8:])
        return cls(tool_format, in_reasoning=tail.rstrip().endswith(THINK_OPEN))

    @property
    def text(self) -> str:
        """All answer text so far (without reasoning and tool-call markup)."""
        return "".join(self._text)

    @property
    def reasoning(self) -> str:
        """All reasoning so far."""
        return "".join(self._reasoning)

    def feed(self, piece: str) -> ParsedDelta:
        """Add generated text; return what became printable."""
        self._buf += piece
        return self._drain(final=False)

    def finish(self) -> ParsedDelta:
        """The output ended: release everything held back. An unclosed reasoning block stays
        reasoning; an unclosed tool call is parsed if it is complete JSON, else it is text."""
        return self._drain(final=True)

    def _emit(self, delta: ParsedDelta, text: str = "", reasoning: str = "") -> None:
        delta.text += text
        delta.reasoning += reasoning
        self._text.append(text)
        self._reasoning.append(reasoning)

    def _drain(self, final: bool) -> ParsedDelta:
        delta = ParsedDelta()
        while True:
            buf = self._buf
            if self._state == "start":
                stripped = buf.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self._buf, self._state = stripped[len(THINK_OPEN):], "reasoning"
                    continue
                if not final and THINK_OPEN.startswith(stripped):
                    return delta  # may still become <think>
                self._state = "content"
                continue
            if self._state == "reasoning":
                at = buf.find(THINK_CLOSE)
                if at >= 0:
                    self._emit(delta, reasoning=buf[:at])
                    self._buf, self._state = buf[at + len(THINK_CLOSE):], "content"
                    continue
                keep = 0 if final else _partial_suffix(buf, THINK_CLOSE)
                self._emit(delta, reasoning=buf[:len(buf) - keep])
                self._buf = buf[len(buf) - keep:]
                return delta
            if self._state == "content":
                start = self._tool.start if self._tool else None
                at = buf.find(start) if start else -1
                if at >= 0:
                    before = buf[:at]
                    if before.strip() or not self._after_call:
                        self._emit(delta, text=before)
                    self._buf, self._state = buf[at + len(start):], "tool"
                    continue
                keep = 0 if final or not start else _partial_suffix(buf, start)
                shown = buf[:len(buf) - keep]
                if self._after_call and not shown.strip():
                    if final:
                        self._buf = ""  # trailing whitespace after the last call
                    return delta
                self._emit(delta, text=shown)
                self._after_call = False
                self._buf = buf[len(buf) - keep:]
                return delta
            # inside a tool call
            at = buf.find(self._tool.end)
            if at < 0 and not final:
                return delta
            inner = buf[:at] if at >= 0 else buf
            calls = self._tool.parse_block(inner)
            if calls:
                self.tool_calls.extend(calls)
                self._after_call = True
            else:
                self.malformed = True
                closing = self._tool.end if at >= 0 else ""
                self._emit(delta, text=self._tool.start + inner + closing)
                self._after_call = False
            self._buf = buf[at + len(self._tool.end):] if at >= 0 else ""
            self._state = "content"
            if not self._buf and final:
                return delta


@dataclass
class ParsedToolCalls:
    """Generated text split into the answer text and the tool calls.

    `text` is everything outside well-formed tool-call markup (malformed blocks are left in it
    verbatim); `malformed` says whether there was such a block.
    """

    text: str
    tool_calls: list[ToolCall]
    malformed: bool = False


def parse_tool_calls(text: str, format: str = "qwen") -> ParsedToolCalls:
    """Find the tool calls in a model's complete output `text`.

    `format` is "qwen" (Qwen2.5, QwQ, and most qwen2 fine-tunes) or "deepseek". Whitespace
    between and after calls is part of the markup; text before and between them is kept.
    """
    if format not in TOOL_CALL_FORMATS:
        raise ValueError(f"unknown tool-call format {format!r}; known: "
                         f"{', '.join(TOOL_CALL_FORMATS)}")
    # The streaming parser does the work, fed the whole text at once.
    parser = OutputParser(tool_format=TOOL_CALL_FORMATS[format], detect_reasoning=False)
    parser.feed(text)
    parser.finish()
    return ParsedToolCalls(parser.text, parser.tool_calls, parser.malformed)
