"""Engine events as OpenAI response objects: whole responses, and the chunks of a stream.

`ChatOutput` and `CompletionOutput` gather a job's events into what the endpoint answers
(`response()`), or turn each event into the next server-sent-event chunk (`chunk(event)`).
Shapes follow OpenAI's chat completion / completion objects: `choices[].message` with
`content`, `tool_calls` and (for reasoning models, as vLLM and DeepSeek's API name it)
`reasoning_content`; `finish_reason`; `usage` with `prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import time
import uuid

from qwen2_mlx.server.jobs import ChoiceEvent, JobDone, TokenLogprob


def usage(done: JobDone) -> dict:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


class _Output:
    """What both endpoints keep per job."""

    object_name = ""
    chunk_name = ""

    def __init__(self, model: str, choices: int, tokenizer, include_usage: bool,
                 id_prefix: str) -> None:
        self.id = f"{id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.tokenizer = tokenizer
        self.include_usage = include_usage
        self.text = [""] * choices
        self.finish: list[str | None] = [None] * choices
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(choices)]
        self.done: JobDone | None = None

    def _token_text(self, token: int) -> str:
        # A token may be part of a UTF-8 character: shown with \x escapes, as OpenAI does.
        return self.tokenizer.token_bytes(token).decode("utf-8", errors="backslashreplace")

    def _envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created,
                "model": self.model, "choices": choices}

    def usage_chunk(self) -> dict:
        body = self._envelope(self.chunk_name, [])
        body["usage"] = usage(self.done)
        return body


class ChatOutput(_Output):
    """A chat completion: message content, reasoning, tool calls and logprobs per choice."""

    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"

    def __init__(self, model: str, choices: int, tokenizer, include_usage: bool = False,
                 logprobs: bool = False) -> None:
        super().__init__(model, choices, tokenizer, include_usage, "chatcmpl")
        self.want_logprobs = logprobs
        self.reasoning = [""] * choices
        self.tool_calls: list[list] = [[] for _ in range(choices)]
        self._started = [False] * choices

    def add(self, event: ChoiceEvent) -> None:
        c = event.choice
        self.text[c] += event.text
        self.reasoning[c] += event.reasoning
        self.tool_calls[c] += event.tool_calls
        self.logprobs[c] += event.logprobs
        if event.finish_reason:
            self.finish[c] = event.finish_reason

    def _logprob_entry(self, lp: TokenLogprob) -> dict:
        def entry(token: int, logprob: float) -> dict:
            return {"token": self._token_text(token), "logprob": logprob,
                    "bytes": list(self.tokenizer.token_bytes(token))}

        return {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}

    def response(self) -> dict:
        choices = []
        for c, text in enumerate(self.text):
            message: dict = {"role": "assistant",
                             "content": text if text or not self.tool_calls[c] else None}
            if self.tool_calls[c]:
                message["tool_calls"] = [call.to_openai() for call in self.tool_calls[c]]
            if self.reasoning[c]:
                message["reasoning_content"] = self.reasoning[c]
            logprobs = ({"content": [self._logprob_entry(lp) for lp in self.logprobs[c]]}
                        if self.want_logprobs else None)
            choices.append({"index": c, "message": message, "logprobs": logprobs,
                            "finish_reason": self.finish[c]})
        body = self._envelope(self.object_name, choices)
        body["usage"] = usage(self.done)
        return body

    def chunk(self, event: ChoiceEvent) -> dict | None:
        """The stream chunk for one event (None when it carries nothing)."""
        c = event.choice
        delta: dict = {}
        if not self._started[c]:
            self._started[c] = True
            delta["role"] = "assistant"
            delta["content"] = ""
        if event.text:
            delta["content"] = event.text
        if event.reasoning:
            delta["reasoning_content"] = event.reasoning
        if event.tool_calls:
            first = len(self.tool_calls[c])
            delta["tool_calls"] = [{"index": first + i, **call.to_openai()}
                                   for i, call in enumerate(event.tool_calls)]
        self.add(event)
        if not delta and not event.finish_reason and not (self.want_logprobs and event.logprobs):
            return None
        choice = {"index": c, "delta": delta, "logprobs": None,
                  "finish_reason": event.finish_reason}
        if self.want_logprobs:
            choice["logprobs"] = {"content": [self._logprob_entry(lp) for lp in event.logprobs]}
        body = self._envelope(self.chunk_name, [choice])
        if self.include_usage:
            body["usage"] = None
        return body


class CompletionOutput(_Output):
    """A (legacy) text completion: text and logprobs per choice, the prompt when echoed."""

    object_name = "text_completion"
    chunk_name = "text_completion"

    def __init__(self, model: str, choices: int, tokenizer, include_usage: bool = False,
                 logprobs: int | None = None, echo: list[str] | None = None) -> None:
        super().__init__(model, choices, tokenizer, include_usage, "cmpl")
        self.want_logprobs = logprobs is not None
        self.echo = echo  # per choice: the prompt text to put before the completion
        self._started = [False] * choices

    def add(self, event: ChoiceEvent) -> None:
        c = event.choice
        self.text[c] += event.text
        self.logprobs[c] += event.logprobs
        if event.finish_reason:
            self.finish[c] = event.finish_reason

    def _logprobs(self, entries: list[TokenLogprob], offset: int) -> dict:
        tokens, values, tops, offsets = [], [], [], []
        for lp in entries:
            text = self._token_text(lp.token)
            tokens.append(text)
            values.append(lp.logprob)
            tops.append({self._token_text(t): v for t, v in lp.top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                "text_offset": offsets}

    def _prefix(self, c: int) -> str:
        return self.echo[c] if self.echo else ""

    def response(self) -> dict:
        choices = []
        for c, text in enumerate(self.text):
            prefix = self._prefix(c)
            choices.append({
                "index": c, "text": prefix + text,
                "logprobs": (self._logprobs(self.logprobs[c], len(prefix))
                             if self.want_logprobs else None),
                "finish_reason": self.finish[c]})
        body = self._envelope(self.object_name, choices)
        body["usage"] = usage(self.done)
        return body

    def chunk(self, event: ChoiceEvent) -> dict | None:
        c = event.choice
        text = event.text
        if not self._started[c]:
            self._started[c] = True
            text = self._prefix(c) + text
        offset = len(self._prefix(c)) + len(self.text[c])
        self.add(event)
        if not text and not event.finish_reason and not (self.want_logprobs and event.logprobs):
            return None
        choice = {"index": c, "text": text,
                  "logprobs": self._logprobs(event.logprobs, offset) if self.want_logprobs
                  else None,
                  "finish_reason": event.finish_reason}
        body = self._envelope(self.chunk_name, [choice])
        if self.include_usage:
            body["usage"] = None
        return body
