"""A conversation that keeps its KV cache between turns: `ChatSession`, for apps and the CLI.

    >>> chat = ChatSession(model, tokenizer, system="You are terse.")
    >>> for r in chat.stream("Hello!"):
    ...     print(r.text, end="")
    >>> reply = chat.send("And in French?")

The invariant everything else rests on: after every completed turn the KV cache holds exactly
the token ids of ``tokenizer.apply_chat_template(chat.messages, tools=..., add_generation_prompt=
False)``, so the session's state is a function of `messages` alone (what `save`/`load` and a
server's prefix cache rely on). A turn renders the whole conversation plus the generation
prompt, keeps the longest cached prefix of it and prefills only the rest, normally the new user
message and the generation prompt. After the reply, the conversation (now with the reply) is
rendered again and compared with the cache, because the ids a reply was generated as need not
be the ids its text encodes to (byte-level BPE is not unique); from the first difference the
cache is trimmed and re-prefilled. The same happens, from the first changed token, when the
template renders history differently from the live turn: QwQ's and DeepSeek-R1's templates
drop earlier turns' reasoning, so the session stores a reply's reasoning apart
(``message["reasoning_content"]``, which the templates do not render) and re-prefills the
answer after each reasoning reply. `stats` counts these re-syncs.

One thread at a time: a session used from a second thread while it generates (or from its own
consumer loop) raises `ChatSessionBusyError`; `cancel()` is the one call any thread may make at
any time.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from qwen2_mlx.cache import ModelCache, kv_cache_bytes_per_token, load_cache, save_cache
from qwen2_mlx.chat_messages import check_message_list, check_tools
from qwen2_mlx.files import apply_default_mode
from qwen2_mlx.fingerprint import model_fingerprint
from qwen2_mlx.generate import (
    ContextLengthError,
    GenerationResponse,
    GenerationResult,
    prefill,
    stream_generate,
)
from qwen2_mlx.memory import wired_limit
from qwen2_mlx.speculative import draft_view
from qwen2_mlx.validation import check_token_ids

__all__ = ["ChatResponse", "ChatSession", "ChatSessionBusyError", "ChatStats"]

# The key of a session's data in the metadata of its safetensors file.
SESSION_KEY = "qwen2_mlx.chat_session"
SESSION_FORMAT = 1
# stream_generate arguments the session owns (the prompt, the caches and their format, cancel).
_OWNED = {"model", "tokenizer", "prompt", "cache", "kv_bits", "cancel", "draft_cache"}
_REPLY_ROLES = ("user", "tool")
DEFAULT_MAX_TOKENS = 256


class ChatSessionBusyError(RuntimeError):
    """The session is generating a reply (on another thread, or in the caller's own loop over
    `stream`), and a second turn or change would corrupt its cache."""


@dataclass
class ChatResponse(GenerationResponse):
    """A `GenerationResponse` of a chat turn, plus how the turn used the conversation:

    `truncated_messages`: messages dropped from the start of the conversation (after the
    system message) so the turn fits the context; `cached_prompt_tokens`: prompt tokens read
    from the KV cache instead of prefilled (`prompt_tokens` counts those prefilled).
    """

    truncated_messages: int = 0
    cached_prompt_tokens: int = 0


@dataclass
class ChatStats:
    """Running totals of a session (the CLI's /stats).

    `resynced_replies` counts replies after which the cache's ids differed from the rendered
    conversation (a reply whose text encodes to other ids than it was generated as, or
    reasoning the template drops), `resynced_tokens` the tokens re-prefilled because of them.
    """

    turns: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generation_tokens: int = 0
    resynced_replies: int = 0
    resynced_tokens: int = 0
    truncated_messages: int = 0
    last_prompt_tps: float = 0.0
    last_generation_tps: float = 0.0
    peak_memory: float = 0.0  # GB


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@functools.cache
def _generation_options() -> frozenset[str]:
    """The keyword arguments of `stream_generate` a session passes through (sampling,
    max_tokens, stop, and whatever later versions add: a draft model, a response format)."""
    names = {p.name for p in inspect.signature(stream_generate).parameters.values()
             if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return frozenset(names - _OWNED)


def _check_options(options: dict, where: str) -> None:
    allowed = _generation_options()
    for name in options:
        if name in _OWNED:
            raise ValueError(f"{where}: {name!r} is managed by the chat session")
        if name not in allowed:
            raise ValueError(f"{where}: unknown generation option {name!r} (the session passes "
                             f"these to stream_generate: {', '.join(sorted(allowed))})")


class ChatSession:
    """A multi-turn conversation with a model, continued from its KV cache each turn.

    Args:
        model, tokenizer: as `qwen2_mlx.load` returns them.
        system: the system prompt; None uses the template's own default (Qwen2.5's "You are
            Qwen...") once at the top, as the template renders it.
        tools: OpenAI function schemas offered every turn (a turn may override them).
        max_kv_size: the most tokens the conversation may hold (default: the model's context);
            older exchanges are dropped to stay under it.
        kv_bits: keep the KV cache quantized to 8 or 4 bits.
        **defaults: generation options for every turn, as `stream_generate` takes them
            (temperature, top_p, max_tokens, stop, seed, response_format, draft_model,
            num_draft_tokens, prompt_lookup, ...); a turn's keyword arguments override them.
            With a `draft_model` the session keeps the draft's KV cache too, so each turn the
            draft, like the model, prefills only the new tokens.
    """

    def __init__(self, model, tokenizer, system: str | None = None,
                 tools: Sequence[dict] | None = None, max_kv_size: int | None = None,
                 kv_bits: int | None = None, **defaults) -> None:
        _check_options(defaults, "ChatSession")
        if max_kv_size is not None and (not isinstance(max_kv_size, int)
                                        or isinstance(max_kv_size, bool) or max_kv_size < 2):
            raise ValueError(f"max_kv_size must be an integer >= 2, got {max_kv_size!r}")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"system must be a str or None, got {type(system).__name__}")
        if getattr(tokenizer, "chat_template", "") is None:
            raise ValueError("this model's tokenizer has no chat template, which a chat session "
                             "needs (a base model? generate from plain text instead)")
        self.model, self.tokenizer = model, tokenizer
        self.tools = check_tools(tools)
        self.defaults = dict(defaults)
        self.max_kv_size = max_kv_size
        self.kv_bits = kv_bits
        self.cache: ModelCache = model.make_cache(kv_bits=kv_bits)
        self.stats = ChatStats()
        self._messages: list[dict] = [] if system is None else [
            {"role": "system", "content": system}]
        self._rendered_tools = self.tools  # the tools the cached conversation was rendered with
        self._lock = threading.Lock()
        self._busy: int | None = None  # the ident of the thread running a turn
        self._cancel = threading.Event()
        self._draft: tuple[object, ModelCache] | None = None  # (draft model, its cache)

    # ------------------------------------------------------------------ the conversation
    @property
    def messages(self) -> list[dict]:
        """The conversation as message dicts (a copy; set it to replace the conversation)."""
        return copy.deepcopy(self._messages)

    @messages.setter
    def messages(self, messages: Sequence[dict]) -> None:
        messages = copy.deepcopy(check_message_list(messages)) if messages else []
        with self._exclusive("replacing the messages"):
            if messages:
                self._render(messages, self._rendered_tools, False)  # fails on bad messages
            self._messages = messages
            self._trim_to_conversation()

    @property
    def system(self) -> str | None:
        """The system prompt (None: the template's default). Setting it changes the first
        message; the next turn re-prefills from there."""
        first = self._messages[0] if self._messages else None
        return first["content"] if first and first["role"] == "system" else None

    @system.setter
    def system(self, text: str | None) -> None:
        if text is not None and not isinstance(text, str):
            raise ValueError(f"system must be a str or None, got {type(text).__name__}")
        messages = self.messages
        if messages and messages[0]["role"] == "system":
            messages = messages[1:]
        if text is not None:
            messages.insert(0, {"role": "system", "content": text})
        self.messages = messages

    @property
    def cached_tokens(self) -> int:
        """Tokens held in the KV cache now."""
        return self.cache.offset

    @property
    def context_budget(self) -> int:
        """The most tokens the conversation may hold: the model's context or `max_kv_size`."""
        context = self.model.config.context_length
        return min(context, self.max_kv_size) if self.max_kv_size else context

    def template_ids(self) -> list[int]:
        """The ids of the rendered conversation (no generation prompt): what the cache holds
        after every completed turn."""
        return self._render(self._messages, self._rendered_tools, False) if self._messages else []

    # ---------------------------------------------------------------------------- turns
    def stream(self, message: str | dict | Sequence[dict] | None = None,
               **options) -> Iterator[ChatResponse]:
        """Send `message` and stream the reply as `ChatResponse`s (as `stream_generate`).

        `message` is the user's text, a message dict (e.g. ``{"role": "tool", ...}``), a list
        of them, or None to answer the conversation as it stands (it must end with a user or
        tool message). `options` override the session's generation defaults for this turn
        (temperature, max_tokens, stop, tools, ...). Stopping early (`cancel()`, or leaving
        the loop) keeps the partial reply as the assistant's message.
        """
        new = _new_messages(message)
        _check_options({k: v for k, v in options.items() if k != "tools"}, "stream")
        return self._start(new, options, regenerate=False)

    def send(self, message: str | dict | Sequence[dict] | None = None,
             **options) -> GenerationResult:
        """`stream` to the end; returns the reply text (a str with `finish_reason`,
        `tool_calls`, `reasoning` and the last `response`)."""
        return _collect(self.stream(message, **options))

    def stream_regenerate(self, **options) -> Iterator[ChatResponse]:
        """Drop the last reply and stream a new one, continued from the cache (only the
        generation prompt is prefilled)."""
        _check_options({k: v for k, v in options.items() if k != "tools"}, "regenerate")
        return self._start([], options, regenerate=True)

    def regenerate(self, **options) -> GenerationResult:
        """`stream_regenerate` to the end; returns the new reply text."""
        return _collect(self.stream_regenerate(**options))

    def add_tool_result(self, call_id: str, content: str | dict | list) -> None:
        """Record the result of the last reply's tool call `call_id` without answering yet
        (use it for all calls but the last; `send_tool_result` the last)."""
        with self._exclusive("adding a tool result"):
            self._messages.append(self._tool_message(call_id, content))

    def send_tool_result(self, call_id: str, content: str | dict | list,
                         **options) -> GenerationResult:
        """Record the result of the tool call `call_id` and generate the reply that uses it
        (every call of the last reply must have its result by then)."""
        message = self._tool_message(call_id, content, last=True)
        return self.send(message, **options)

    def stream_tool_result(self, call_id: str, content: str | dict | list,
                           **options) -> Iterator[ChatResponse]:
        """`send_tool_result`, streamed."""
        message = self._tool_message(call_id, content, last=True)
        return self.stream(message, **options)

    def cancel(self) -> None:
        """Stop the reply being generated, from any thread: its stream ends within one token
        (or one prefill step) with finish_reason "cancelled". A stream already made but not
        yet iterated (an app hands it to its worker thread) ends at once when it starts;
        streams made after the call are not affected."""
        self._cancel.set()

    def undo(self) -> list[dict]:
        """Remove the last exchange (the last user message and everything after it) and trim
        the cache back to the conversation before it (nothing is prefilled). Returns the
        removed messages."""
        with self._exclusive("undo"):
            users = [i for i, m in enumerate(self._messages) if m["role"] == "user"]
            if not users:
                raise ValueError("nothing to undo: the conversation has no user message")
            removed = self._messages[users[-1]:]
            del self._messages[users[-1]:]
            self._trim_to_conversation()
            return removed

    def reset(self) -> None:
        """Forget the conversation, keeping the system prompt (and its cached tokens)."""
        with self._exclusive("reset"):
            self._messages = [m for m in self._messages[:1] if m["role"] == "system"]
            self._trim_to_conversation()

    # ---------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the conversation, generation defaults, a fingerprint of the model and the KV
        cache to one safetensors file, atomically. An existing file is replaced only with
        `overwrite=True`. Options that are not JSON (a draft model) are left out, with a
        warning: pass them to `load` again."""
        path = Path(path)
        with self._exclusive("saving"):
            if path.exists() and not overwrite:
                raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
            defaults, skipped = {}, []
            for name, value in self.defaults.items():
                try:
                    json.dumps(value)
                    defaults[name] = value
                except (TypeError, ValueError):
                    skipped.append(name)
            if skipped:
                warnings.warn(f"not saved (not JSON): {', '.join(skipped)}; pass them to "
                              "ChatSession.load again", RuntimeWarning, stacklevel=2)
            digest, description = model_fingerprint(self.model)
            data = {
                "format": SESSION_FORMAT, "messages": self._messages, "defaults": defaults,
                "tools": self.tools, "rendered_tools": self._rendered_tools,
                "max_kv_size": self.max_kv_size, "kv_bits": self.kv_bits,
                "model": digest, "model_description": description,
                "chat_template_sha256": hashlib.sha256(
                    (self.tokenizer.chat_template or "").encode()).hexdigest(),
            }
            _write_session_file(path, self.cache, json.dumps(data, ensure_ascii=False),
                                overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, model, tokenizer, **options) -> ChatSession:
        """A session from a file `save` wrote, resumed without re-prefilling. Refuses a file
        saved with another model (ValueError). `options` override the saved defaults."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such chat session file: {path}")
        cache, meta = load_cache(path)
        if SESSION_KEY not in meta:
            raise ValueError(f"{path} is not a chat session file (ChatSession.save writes one)")
        try:
            data = json.loads(meta[SESSION_KEY])
            if data.get("format") != SESSION_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            digest, description = model_fingerprint(model)
            saved_with = data["model_description"]
            messages, defaults = data["messages"], data["defaults"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} holds a damaged chat session ({e})") from None
        if data["model"] != digest:
            raise ValueError(f"{path} was saved with another model ({saved_with}); this one is "
                             f"{description}: load it with the model it was saved with")
        session = cls(model, tokenizer, tools=data["tools"], max_kv_size=data["max_kv_size"],
                      kv_bits=data["kv_bits"], **{**defaults, **options})
        if messages:
            check_message_list(messages)
        session._messages = messages
        session._rendered_tools = data["rendered_tools"]
        # Read the arrays now: a lazy array can only be evaluated by the thread that made it.
        mx.eval([c.state for c in cache])
        session.cache = cache
        session._trim_to_conversation()  # a no-op unless the tokenizer renders differently
        return session

    # ---------------------------------------------------------------------- machinery
    @contextmanager
    def _exclusive(self, action: str) -> Iterator[None]:
        me = threading.get_ident()
        with self._lock:
            if self._busy is not None:
                where = ("in this thread's loop over its stream" if self._busy == me
                         else "on another thread")
                raise ChatSessionBusyError(
                    f"the chat session is generating a reply {where}: finish or close that "
                    f"stream (or cancel() it) before {action}; a session serves one thread "
                    "at a time")
            self._busy = me
        try:
            yield
        finally:
            with self._lock:
                self._busy = None

    def _render(self, messages: list[dict], tools, generation_prompt: bool) -> list[int]:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=True)

    def _trim_to_conversation(self) -> None:
        """Trim the cache to its longest prefix that the rendered conversation shares."""
        held = self.cache.tokens
        keep = _common_prefix(held, self.template_ids())
        if keep < len(held):
            self.cache.trim(len(held) - keep)

    def _tool_message(self, call_id: str, content, last: bool = False) -> dict:
        if not isinstance(content, str):
            content = json.dumps(content, ensure_ascii=False)
        pending = _pending_calls(self._messages)
        if call_id not in pending:
            known = ", ".join(pending) or "none"
            raise ValueError(f"no tool call {call_id!r} waits for a result (waiting: {known})")
        others = [c for c in pending if c != call_id]
        if last and others:
            raise ValueError(f"tool calls {', '.join(others)} still wait for results: record "
                             "them with add_tool_result() before sending the last one")
        return {"role": "tool", "tool_call_id": call_id, "content": content}

    def _start(self, new: list[dict], options: dict,
               regenerate: bool) -> Iterator[ChatResponse]:
        """A new turn's stream; a cancel() from now on applies to it."""
        with self._lock:
            if self._busy is None:  # else the running turn keeps its cancel
                self._cancel.clear()
        return self._turn(new, options, regenerate)

    def _turn(self, new: list[dict], options: dict,
              regenerate: bool) -> Iterator[ChatResponse]:
        with self._exclusive("starting another turn"):
            options = {**self.defaults, **options}
            tools = check_tools(options.pop("tools", self.tools))
            max_tokens = options.pop("max_tokens", DEFAULT_MAX_TOKENS)
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
                raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
            conversation = copy.deepcopy(self._messages)
            if regenerate:
                while conversation and conversation[-1]["role"] == "assistant":
                    conversation.pop()
                if len(conversation) == len(self._messages):
                    raise ValueError("nothing to regenerate: the conversation does not end "
                                     "with a reply")
            conversation += copy.deepcopy(new)
            if not conversation or conversation[-1]["role"] not in _REPLY_ROLES:
                raise ValueError("nothing to answer: the conversation must end with a user or "
                                 "tool message (send a message, or regenerate())")
            ids, conversation, dropped, closing = self._fit(conversation, tools, max_tokens)
            cached = self._sync(ids)
            draft_cache = self._sync_draft(options.get("draft_model"))
            room = self.context_budget - len(ids) - closing
            stream = stream_generate(self.model, self.tokenizer, ids[cached:], cache=self.cache,
                                     max_tokens=max(1, min(max_tokens, room)), tools=tools,
                                     cancel=self._cancel, draft_cache=draft_cache, **options)
            kv_bytes = kv_cache_bytes_per_token(
                self.model.config.num_hidden_layers, self.model.config.num_key_value_heads,
                self.model.config.head_dim, self.kv_bits or 16) * (len(ids) + max_tokens)
            pieces: list[GenerationResponse] = []
            started = False
            try:
                with wired_limit(self.model, extra_bytes=int(kv_bytes)):
                    for response in stream:
                        if not started:  # the turn happens: commit the new messages
                            self._messages, self._rendered_tools = conversation, tools
                            started = True
                        pieces.append(response)
                        yield ChatResponse(**vars(response), truncated_messages=dropped,
                                           cached_prompt_tokens=cached)
            finally:
                stream.close()
                if started:
                    self._finish_turn(pieces, dropped, cached)
                mx.clear_cache()  # between turns, return freed buffers to the OS

    def _fit(self, conversation: list[dict], tools, max_tokens: int
             ) -> tuple[list[int], list[dict], int, int]:
        """The turn's prompt ids after dropping the oldest exchanges that do not fit: room
        is kept for `max_tokens` reply tokens (at most a quarter of the budget) and the
        template's closing tokens. Returns (ids, conversation, messages dropped, closing)."""
        budget = self.context_budget
        dropped = 0
        while True:
            ids = self._render(conversation, tools, True)
            closing = max(0, len(self._render(
                conversation + [{"role": "assistant", "content": ""}], tools, False)) - len(ids))
            if len(ids) + min(max_tokens, budget // 4) + closing <= budget:
                break
            span = _oldest_exchange(conversation)
            if span is None:
                break
            del conversation[span[0]:span[1]]
            dropped += span[1] - span[0]
        if len(ids) + 1 + closing > budget:
            limit = (f"max_kv_size={self.max_kv_size}" if budget == self.max_kv_size
                     else f"the model's context of {budget} tokens")
            raise ContextLengthError(
                f"the message is too long for {limit}: the prompt needs {len(ids)} tokens "
                f"(with the system prompt) and the reply at least one more; shorten it")
        return ids, conversation, dropped, closing

    def _sync(self, ids: list[int]) -> int:
        """Trim the cache to its longest prefix shared with `ids` (keeping the last id out,
        which must be fed to get the first logits); returns how many ids it holds."""
        held = self.cache.tokens
        keep = min(_common_prefix(held, ids), len(ids) - 1)
        if keep < len(held):
            self.cache.trim(len(held) - keep)
        return keep

    def _sync_draft(self, draft_model) -> ModelCache | None:
        """The draft model's cache, made to hold what the session's cache holds (speculative
        decoding needs that, or an empty draft cache): trimmed to their common prefix, then
        fed the rest. Empty when the conversation fills more than half the draft's context
        (the drafter then keeps a recent window itself)."""
        if draft_model is None:
            return None
        if self._draft is None or self._draft[0] is not draft_model:
            self._draft = (draft_model, draft_model.make_cache(kv_bits=self.kv_bits))
        cache = self._draft[1]
        target = self.cache.tokens
        if len(target) > draft_model.config.context_length // 2:
            cache.trim(cache.offset)
            return cache
        shown = draft_view(target, draft_model.config.vocab_size)  # as the drafter shows them
        keep = _common_prefix(cache.tokens, shown)
        if keep < cache.offset:
            cache.trim(cache.offset - keep)
        if keep < len(shown):
            prefill(draft_model, cache, mx.array(shown[keep:], dtype=mx.uint32),
                    step_size=self.defaults.get("prefill_step_size", 512))
        return cache

    def _finish_turn(self, pieces: list[GenerationResponse], dropped: int, cached: int) -> None:
        """Store the reply and make the cache hold exactly the rendered conversation."""
        last = pieces[-1] if pieces else None
        final = last is not None and last.finish_reason is not None
        text = last.full_text if final else "".join(p.text for p in pieces)
        reasoning = last.reasoning_text if final else "".join(p.reasoning for p in pieces)
        text = text or ""
        if reasoning:  # the answer without the newlines after </think> (QwQ's history form)
            text = text.lstrip("\n")
        reply: dict = {"role": "assistant", "content": text}
        if final and last.tool_calls:
            reply["tool_calls"] = [call.to_openai() for call in last.tool_calls]
        if reasoning:
            reply["reasoning_content"] = reasoning
        self._messages.append(reply)

        target = self.template_ids()
        held = self.cache.tokens
        keep = _common_prefix(held, target)
        resynced = keep < len(held)
        if resynced:
            self.cache.trim(len(held) - keep)
        missing = target[keep:]
        # Cancelled before the first token: the user stopped this prefill; the next turn
        # prefills what is missing. Past the budget: the next turn drops old exchanges first.
        stopped_in_prefill = last is not None and last.token is None and not last.generation_tokens
        if missing and not stopped_in_prefill and len(target) <= self.context_budget:
            ids = mx.array(check_token_ids(missing, self.model.config.vocab_size), mx.uint32)
            prefill(self.model, self.cache, ids,
                    step_size=self.defaults.get("prefill_step_size", 512))
        s = self.stats
        s.turns += 1
        s.truncated_messages += dropped
        s.cached_prompt_tokens += cached
        if resynced:
            s.resynced_replies += 1
            s.resynced_tokens += len(missing)
        if last is not None:
            s.prompt_tokens += last.prompt_tokens
            s.generation_tokens += last.generation_tokens
            s.last_prompt_tps, s.last_generation_tps = last.prompt_tps, last.generation_tps
            s.peak_memory = max(s.peak_memory, last.peak_memory)


def _new_messages(message) -> list[dict]:
    if message is None:
        return []
    if isinstance(message, str):
        return [{"role": "user", "content": message}]
    if isinstance(message, dict):
        return check_message_list([message])
    return check_message_list(list(message))


def _collect(responses: Iterator[ChatResponse]) -> GenerationResult:
    pieces, last = [], None
    for last in responses:
        pieces.append(last.text)
    return GenerationResult("".join(pieces), last)


def _oldest_exchange(conversation: list[dict]) -> tuple[int, int] | None:
    """(start, end) of the oldest exchange that may be dropped: from after the system message
    to the second user message; None when only the current exchange is left."""
    start = 1 if conversation and conversation[0]["role"] == "system" else 0
    users = [i for i, m in enumerate(conversation) if i >= start and m["role"] == "user"]
    return (start, users[1]) if len(users) >= 2 else None


def _pending_calls(messages: list[dict]) -> list[str]:
    """Ids of the tool calls of the last assistant message that have no result yet."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            calls = [c.get("id") for c in messages[i].get("tool_calls") or []]
            answered = {m.get("tool_call_id") for m in messages[i + 1:] if m["role"] == "tool"}
            return [c for c in calls if c and c not in answered]
        if messages[i]["role"] == "user":
            return []
    return []


def _write_session_file(path: Path, cache: ModelCache, data: str, overwrite: bool) -> None:
    """`save_cache` to a temporary file beside `path`, then move it into place: replacing a
    file only when `overwrite`, else linking it (which fails if `path` appeared meanwhile)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.safetensors")
    try:
        save_cache(tmp, cache, {SESSION_KEY: data})
        apply_default_mode(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
            except OSError:  # a file system without hard links: check, then rename
                if path.exists():
                    raise FileExistsError(
                        f"{path} exists; pass overwrite=True to replace it") from None
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
