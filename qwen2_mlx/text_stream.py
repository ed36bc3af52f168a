"""Generated token ids to text, one token at a time: stop strings, reasoning and tool calls.

`TextStream` is what a decode loop feeds each sampled token: it detokenizes (never splitting a
UTF-8 character), ends the sequence at an EOS id or at the first stop string (which is not
returned), holds back text that may still turn into a stop string, and splits what it releases
into answer text, reasoning and completed tool calls (`OutputParser`). It knows nothing of
models or caches, so any loop can use it: the server runs one per sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from qwen2_mlx.output_parser import OutputParser
from qwen2_mlx.tools import ToolCall


@dataclass
class TextDelta:
    """What one token released: answer text, reasoning, tool calls completed with it, and
    the finish reason once the sequence ended ("stop", "tool_calls" or "length")."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None


def stop_hold_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could still begin a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-k:]):
                longest = k
                break
    return longest


class TextStream:
    """Incremental text of one generated sequence.

    Args:
        tokenizer: gives the detokenizer, EOS ids and the tool-call format.
        prompt_ids: the prompt (a generation prompt that opens ``<think>`` starts in reasoning).
        stops: strings that end the sequence (not returned).
        tools: the request's tools, when tool calls are parsed out of the text.
        prefix: text the model is taken to have written already (e.g. a forced tool-call
            opening); it goes through the parser first, never to the client as is.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int], *, stops: Sequence[str] = (),
                 tools: Sequence[dict] | None = None, prefix: str = "") -> None:
        self._eos = frozenset(tokenizer.eos_token_ids)
        self._detokenizer = tokenizer.detokenizer()
        self._stops = list(stops)
        self.parser = OutputParser.for_prompt(tokenizer, prompt_ids, tools)
        self._pending = ""  # decoded text not yet released (it may begin a stop string)
        self._calls_seen = 0
        self.finish_reason: str | None = None
        if prefix:
            self.parser.feed(prefix)

    @property
    def text(self) -> str:
        """All answer text released so far."""
        return self.parser.text

    @property
    def reasoning(self) -> str:
        return self.parser.reasoning

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.parser.tool_calls

    def add(self, token: int) -> TextDelta:
        """Feed one generated token; the delta has `finish_reason` set when it ended the text
        (an EOS id, which is not printed, or a stop string)."""
        if self.finish_reason is not None:
            raise ValueError("the text already finished")
        if token in self._eos:
            self._pending += self._detokenizer.finalize()
            return self._release(self._pending, "stop")
        self._pending += self._detokenizer.add_token(token)
        hit = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0),
                  default=-1)
        if hit >= 0:
            return self._release(self._pending[:hit], "stop")
        keep = stop_hold_back(self._pending, self._stops) if self._stops else 0
        shown = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep:]
        return self._release(shown, None)

    def finish(self, reason: str = "length") -> TextDelta:
        """End the text for a reason outside it (max_tokens, the context end, a cancel):
        release everything held back."""
        if self.finish_reason is not None:
            return TextDelta(finish_reason=self.finish_reason)
        self._pending += self._detokenizer.finalize()
        return self._release(self._pending, reason)

    def _release(self, text: str, finish: str | None) -> TextDelta:
        if finish is not None:
            self._pending = ""
        parsed = self.parser.feed(text)
        if finish is not None:
            parsed = parsed + self.parser.finish()
            if finish == "stop" and self.parser.tool_calls:
                finish = "tool_calls"
            self.finish_reason = finish
        calls = self.parser.tool_calls[self._calls_seen:]
        self._calls_seen = len(self.parser.tool_calls)
        return TextDelta(parsed.text, parsed.reasoning, list(calls), finish)
