"""Structured output: JSON, JSON Schema and regular expressions enforced while decoding.

A response format (OpenAI's ``response_format`` shapes, plus ``{"type": "regex"}``) is compiled
by llguidance (the optional extra ``pip install "qwen2-mlx[structured]"``) into a matcher over
the tokenizer's byte-level vocabulary. Before every sampling step the matcher's token mask sets
the logit of each token that cannot continue a valid output to -inf; EOS survives only once the
output is complete. The mask is applied as a logits processor, so temperature, top-k, top-p and
min-p only ever see valid tokens and even a random-weight model produces valid output.

Pipelining (see ``StructuredLogitsProcessor``): the decode loop builds step t+1 before it reads
token t, but the mask of step t+1 depends on token t. The processor therefore queues step t+1's
forward pass itself (``mx.async_eval``), then waits for token t, advances the matcher and
computes the mask on the CPU while the model computes; only the (cheap) sampling waits for the
mask.

JSON is written compactly with ``", "`` and ``": "`` separators (``json.dumps``' default style)
and object keys in the schema's order; no other whitespace is allowed, so a model cannot pad
its answer with blank space until max_tokens runs out.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

__all__ = [
    "EXTRA_HINT",
    "GrammarMatcher",
    "GrammarTokenMask",
    "MaskTimings",
    "StructuredLogitsProcessor",
    "make_grammar_matcher",
    "parse_response_format",
]

EXTRA_HINT = 'install the structured-output extra: pip install "qwen2-mlx[structured]"'

FORMAT_TYPES = ("text", "json_object", "json_schema", "regex")

# Compact JSON in json.dumps' default style. `lenient: False` overrides any "x-guidance"
# options inside the schema: an unsupported keyword is an error, never silently dropped.
_JSON_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": False,
}

_UNIMPLEMENTED = re.compile(r"Unimplemented keys: (\[[^\]]*\])")


def _llguidance():
    try:
        import llguidance
    except ImportError as e:
        raise ImportError(f"response_format needs llguidance: {EXTRA_HINT}") from e
    return llguidance


# --- response_format -------------------------------------------------------------------------


def parse_response_format(response_format: dict | None) -> tuple[str, object] | None:
    """Check an OpenAI-style ``response_format`` and return ``(kind, payload)``.

    Returns None for no constraint (None or ``{"type": "text"}``); otherwise ``kind`` is
    "json_schema" (payload: the schema dict; ``json_object`` gives ``{"type": "object"}``)
    or "regex" (payload: the pattern). Raises ValueError on a malformed format.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ValueError(
            f"response_format must be a dict such as {{'type': 'json_object'}}, "
            f"got {type(response_format).__name__}"
        )
    kind = response_format.get("type")
    if kind not in FORMAT_TYPES:
        raise ValueError(
            f"response_format type must be one of {', '.join(FORMAT_TYPES)}, got {kind!r}"
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_schema", {"type": "object"}
    if kind == "regex":
        pattern = response_format.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("response_format regex needs a non-empty 'pattern' string")
        return "regex", pattern
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ValueError(
            "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}"
        )
    return "json_schema", spec["schema"]


# --- schema checks -----------------------------------------------------------------------------

# Keywords whose value is a subschema, a list of them, or a name -> subschema map. Only
# these positions hold schemas; a property *named* "not" is not a keyword.
_SUBSCHEMA = ("items", "additionalProperties", "unevaluatedProperties", "additionalItems",
              "unevaluatedItems", "contains", "propertyNames", "not", "if", "then", "else")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions",
                   "dependentSchemas")


def _drop_keywords(schema: object, keywords: set[str]) -> None:
    """Remove `keywords` from every (sub)schema of `schema`, in place."""
    if not isinstance(schema, dict):
        return
    for key in keywords & schema.keys():
        del schema[key]
    for key in _SUBSCHEMA:
        _drop_keywords(schema.get(key), keywords)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for sub in schema[key]:
                _drop_keywords(sub, keywords)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for sub in schema[key].values():
                _drop_keywords(sub, keywords)


def _one_line(error: str) -> str:
    """llguidance's errors span lines (a caret diagram); keep the line that says what is wrong."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    return lines[0] if lines else error


def _schema_error(llg, schema: dict, tokenizer) -> str | None:
    """None if llguidance can enforce `schema`; else a one-line message. Unsupported keywords
    are all listed: llguidance names those of one subschema per try, so drop and retry."""
    unsupported: list[str] = []
    current = copy.deepcopy(schema)
    first_error = None
    for _ in range(64):
        grammar = llg.LLMatcher.grammar_from_json_schema(current, overrides=_JSON_OPTIONS)
        error = llg.LLMatcher.validate_grammar(grammar, tokenizer)
        if not error:
            break
        first_error = first_error or error
        match = _UNIMPLEMENTED.search(error)
        if match is None:
            if not unsupported:
                return f"the JSON schema cannot be enforced: {_one_line(error)}"
            break
        keys = [k for k in json.loads(match.group(1)) if k not in unsupported]
        if not keys:
            break
        unsupported += keys
        _drop_keywords(current, set(keys))
    if unsupported:
        return (
            "the JSON schema uses keywords that cannot be enforced while decoding: "
            f"{', '.join(unsupported)} (remove them, or check them after generation)"
        )
    return None


# --- tokenizer tables, built once per tokenizer -------------------------------------------

_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()


def _llg_tokenizer(tokenizer, vocab_size: int):
    """llguidance's token table for `tokenizer` padded to `vocab_size` rows (cached: ~0.6 s for
    Qwen2's 151,646 tokens). It reads tokenizer.json itself, so byte-level tokens (including the
    ones that hold part of a UTF-8 character) are matched byte by byte."""
    llg = _llguidance()
    if vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"the model has {vocab_size} vocabulary rows but the tokenizer has "
            f"{tokenizer.vocab_size} tokens"
        )
    key = (vocab_size, tuple(tokenizer.eos_token_ids))
    with _TABLES_LOCK:
        per_tokenizer = _TABLES.setdefault(tokenizer, {})
        table = per_tokenizer.get(key)
        if table is None:
            table = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                    eos_token=list(tokenizer.eos_token_ids))
            per_tokenizer[key] = table
    return table


# --- the matcher ---------------------------------------------------------------------------


class GrammarMatcher:
    """Which tokens may come next in one constrained output, and moving through it.

    Token ids are the model's (padding rows past the tokenizer's vocabulary are never
    allowed). EOS is handled here rather than by llguidance: it is allowed only when the
    output is complete, after it nothing but EOS is allowed, and it rolls back like any token.

    For speculative decoding: `allows`, `advance`, `rollback`, `fork` and `draft_masks`.
    """

    def __init__(self, llg_matcher, table, tokenizer, grammar: str, vocab_size: int) -> None:
        self._matcher = llg_matcher
        self._table = table
        self._tokenizer = tokenizer
        self._grammar = grammar
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(tokenizer.eos_token_ids)
        self._tokens: list[int] = []
        self._ended = False  # EOS consumed
        self._mask: np.ndarray | None = None  # mask of the current state, until it moves

    # -- state
    @property
    def num_tokens(self) -> int:
        """Tokens consumed so far (EOS included)."""
        return len(self._tokens)

    @property
    def tokens(self) -> list[int]:
        """The tokens consumed so far."""
        return list(self._tokens)

    @property
    def is_complete(self) -> bool:
        """The output so far is a complete match: EOS is allowed (or was taken)."""
        return self._ended or self._matcher.is_accepting()

    @property
    def is_finished(self) -> bool:
        """Nothing but EOS can follow (or EOS was taken)."""
        return self._ended or self._matcher.is_stopped()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise RuntimeError(f"structured output failed: {_one_line(self._matcher.get_error())}")

    # -- masks
    def mask_words(self) -> np.ndarray:
        """The allowed tokens as a bitmask: bit ``i % 32`` of uint32 word ``i // 32``.

        Read-only; valid until the matcher moves."""
        if self._mask is None:
            words = np.zeros((self.vocab_size + 31) // 32, dtype=np.uint32)
            if self._ended:
                for eos in self.eos_token_ids:
                    words[eos // 32] |= np.uint32(1 << (eos % 32))
            else:
                # Drops the GIL: the model's computation goes on meanwhile.
                self._matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
                self._check()
            words.flags.writeable = False
            self._mask = words
        return self._mask

    def allowed(self) -> np.ndarray:
        """Boolean array of length `vocab_size`: True where a token may come next."""
        bits = np.unpackbits(self.mask_words().view(np.uint8), bitorder="little")
        return bits[: self.vocab_size].astype(bool)

    def allows(self, token: int) -> bool:
        """Whether `token` may come next (exactly the mask's verdict)."""
        token = int(token)
        if not 0 <= token < self.vocab_size:
            return False
        return bool((int(self.mask_words()[token // 32]) >> (token % 32)) & 1)

    # -- moving
    def advance(self, token: int) -> None:
        """Consume `token`; ValueError (state unchanged) if the mask forbids it."""
        token = int(token)
        if not self.allows(token):
            raise ValueError(f"token {token} is not allowed by the response format here")
        if token in self.eos_token_ids:
            self._ended = True
        elif not self._matcher.consume_token(token):
            self._check()
            raise RuntimeError(f"structured output failed: token {token} was refused")
        self._tokens.append(token)
        self._mask = None

    def rollback(self, n: int) -> None:
        """Undo the last `n` consumed tokens."""
        if not 0 <= n <= len(self._tokens):
            raise ValueError(f"cannot roll back {n} of {len(self._tokens)} tokens")
        if n == 0:
            return
        undone = self._tokens[-n:]
        del self._tokens[-n:]
        grammar_tokens = sum(1 for t in undone if t not in self.eos_token_ids)
        # Only EOS can follow EOS, so the output has ended iff its last token is EOS.
        self._ended = bool(self._tokens) and self._tokens[-1] in self.eos_token_ids
        if grammar_tokens and not self._matcher.rollback(grammar_tokens):
            self._check()
            raise RuntimeError("structured output failed: the grammar engine refused to roll back")
        self._mask = None

    def reset(self) -> None:
        """Back to the empty output."""
        self.rollback(len(self._tokens))

    def fork(self) -> GrammarMatcher:
        """An independent copy in the same state."""
        twin = copy.copy(self)
        twin._matcher = self._matcher.deep_copy()
        twin._tokens = list(self._tokens)
        return twin

    def draft_masks(self, draft: Sequence[int]) -> tuple[np.ndarray, int]:
        """Masks for verifying drafted tokens, leaving this matcher's state unchanged.

        Returns ``(masks, n_allowed)``: ``n_allowed`` is how many leading drafted tokens the
        grammar allows, and ``masks[i]`` (bool, ``(n_allowed + 1, vocab_size)``) is the mask
        after ``draft[:i]``, i.e. the one for the position where ``draft[i]`` is verified;
        the last row is where the target model's own token goes.
        """
        masks = [self.allowed()]
        n_allowed = 0
        for token in draft:
            if not self.allows(token):
                break
            self.advance(token)
            n_allowed += 1
            masks.append(self.allowed())
        self.rollback(n_allowed)
        return np.stack(masks), n_allowed

    def accepts_text(self, text: str) -> bool:
        """Whether `text` (tokenized afresh) is a complete match of the format."""
        probe = self._fresh()
        for token in self._tokenizer.encode(text):
            if not probe.allows(token):
                return False
            probe.advance(token)
        return probe.is_complete

    def _fresh(self) -> GrammarMatcher:
        llg = _llguidance()
        matcher = llg.LLMatcher(self._table, self._grammar, log_level=0)
        return GrammarMatcher(matcher, self._table, self._tokenizer, self._grammar,
                              self.vocab_size)


def make_grammar_matcher(tokenizer, response_format: dict | None,
                         vocab_size: int | None = None) -> GrammarMatcher | None:
    """Compile `response_format` for `tokenizer`; None when it asks for no constraint.

    `vocab_size` is the model's number of vocabulary rows (default: the tokenizer's).
    Raises ImportError naming the extra when llguidance is missing, and ValueError (one line)
    for a malformed format, an invalid regex or schema, or schema keywords that cannot be
    enforced.
    """
    parsed = parse_response_format(response_format)
    if parsed is None:
        return None
    kind, payload = parsed
    llg = _llguidance()
    table = _llg_tokenizer(tokenizer, vocab_size or tokenizer.vocab_size)
    if kind == "regex":
        grammar = llg.LLMatcher.grammar_from_regex(payload)
        error = llg.LLMatcher.validate_grammar(grammar, table)
        if error:
            raise ValueError(f"invalid regex {payload!r}: {_one_line(error)}")
    else:
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(payload, overrides=_JSON_OPTIONS)
        except ValueError as e:
            raise ValueError(f"the JSON schema is not valid JSON: {e}") from e
        error = _schema_error(llg, payload, table)
        if error:
            raise ValueError(error)
    matcher = llg.LLMatcher(table, grammar, log_level=0)
    if matcher.is_error():
        raise ValueError(f"the response format cannot be enforced: "
                         f"{_one_line(matcher.get_error())}")
    return GrammarMatcher(matcher, table, tokenizer, grammar, vocab_size or tokenizer.vocab_size)


# --- the logits processor ------------------------------------------------------------------


@dataclass
class MaskTimings:
    """Where the processor's time went (seconds, summed over steps)."""

    steps: int = 0
    wait: float = 0.0  # blocked on the previous token (the model's compute, not ours)
    mask: float = 0.0  # advancing the matcher and computing the mask, on the CPU


def _bits(words: np.ndarray, vocab_size: int) -> mx.array:
    """uint32 bit words -> (vocab_size,) bool, unpacked by MLX (on the GPU on a Mac)."""
    shifts = mx.arange(32, dtype=mx.uint32)
    bits = (mx.array(words)[:, None] >> shifts) & 1
    return bits.reshape(-1)[:vocab_size].astype(mx.bool_)


class StructuredLogitsProcessor:
    """Logits processor ``(tokens, logits) -> logits`` that masks tokens a format forbids.

    ``tokens`` is the history (prompt, then every sampled token), 1-D or ``(1, L)``; the first
    call fixes the prompt length. On each later call the processor consumes the tokens sampled
    since its last call, so the mask for a position always reflects every token before it,
    however far ahead the decode loop builds its graph. With `overlap`, it queues the forward
    pass that produced `logits` before it blocks on the newest token, so the model computes
    step t+1 while the CPU advances the matcher and computes the mask (turn it off only to
    measure the gain).
    """

    def __init__(self, matcher: GrammarMatcher, overlap: bool = True) -> None:
        self.matcher = matcher
        self.overlap = overlap
        self.timings = MaskTimings()
        self._prompt_length: int | None = None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if logits.ndim != 2 or logits.shape[0] != 1:
            raise ValueError(f"structured output decodes one sequence, got logits of shape "
                             f"{tuple(logits.shape)}")
        if logits.shape[-1] != self.matcher.vocab_size:
            raise ValueError(f"logits have {logits.shape[-1]} columns, the format was built "
                             f"for {self.matcher.vocab_size}")
        history = tokens.reshape(-1)
        tic = time.perf_counter()
        if self._prompt_length is None:
            self._prompt_length = history.size
            waited = tic
        else:
            new = history[self._prompt_length + self.matcher.num_tokens:]
            if self.overlap:
                # A stream runs its work in order: queue the read of the new token(s) before
                # the forward pass, or reading them would wait for that pass to finish.
                mx.async_eval(new)
                mx.async_eval(logits)
            new = new.tolist()
            waited = time.perf_counter()
            for token in new:
                self.matcher.advance(token)
        words = self.matcher.mask_words()
        done = time.perf_counter()
        self.timings.steps += 1
        self.timings.wait += waited - tic
        self.timings.mask += done - waited
        allowed = _bits(words, self.matcher.vocab_size)
        return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))

    def output_complete(self, generated: Sequence[int], text: str | None = None) -> bool:
        """Whether the output is a complete match: the `generated` tokens (a continuation of
        what was consumed) or, when a stop string cut the text, the returned `text`."""
        if text is not None:
            return self.matcher.accepts_text(text)
        for token in generated[self.matcher.num_tokens:]:
            if not self.matcher.allows(token):
                return False
            self.matcher.advance(token)
        return self.matcher.is_complete


class GrammarTokenMask:
    """The response format as speculative decoding's ``token_mask(history)``.

    Speculative decoding asks for the mask after any history: the committed output, then
    drafted tokens that may be rejected, and then a shorter history again. This moves one
    matcher to the output part of each history it is asked about (rolling back to the common
    prefix, then advancing), so nothing drafted stays committed. A history that runs through a
    token the format forbids (a prompt-lookup draft) gets no mask: the forbidden token has
    probability 0 under the target's masked distribution and is always rejected, so the rows
    after it are never used.
    """

    def __init__(self, matcher: GrammarMatcher, prompt_length: int) -> None:
        self.matcher = matcher
        self.prompt_length = prompt_length

    def sync(self, output: Sequence[int]) -> bool:
        """Move the matcher to `output` (the tokens after the prompt); False if the format
        forbids one of them (the matcher then stands at the longest allowed prefix)."""
        consumed = self.matcher.tokens
        common = 0
        for mine, theirs in zip(consumed, output, strict=False):
            if mine != theirs:
                break
            common += 1
        self.matcher.rollback(len(consumed) - common)
        for token in output[common:]:
            if not self.matcher.allows(token):
                return False
            self.matcher.advance(token)
        return True

    def __call__(self, history: Sequence[int]) -> mx.array | None:
        if not self.sync(list(history[self.prompt_length:])):
            return None
        return _bits(self.matcher.mask_words(), self.matcher.vocab_size)

    def output_complete(self, generated: Sequence[int], text: str | None = None) -> bool:
        """As `StructuredLogitsProcessor.output_complete`."""
        if text is not None:
            return self.matcher.accepts_text(text)
        return self.sync(list(generated)) and self.matcher.is_complete
