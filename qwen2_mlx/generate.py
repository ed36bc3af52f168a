"""Text generation: chunked prefill, pipelined decode, streaming text with stop handling."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from qwen2_mlx.cache import UNKNOWN_TOKEN, KVCache, ModelCache
from qwen2_mlx.errors import HintedError
from qwen2_mlx.output_parser import OutputParser
from qwen2_mlx.prefill import PromptProgress, prefill, prepare_cache
from qwen2_mlx.sampling import (
    LogitsProcessor,
    SamplingParams,
    apply_logits_processors,
    make_logits_processors,
    make_sampler,
)
from qwen2_mlx.speculative import SpeculativeStats, check_draft_model, speculative_generate_step
from qwen2_mlx.text_stream import stop_hold_back
from qwen2_mlx.tools import ToolCall
from qwen2_mlx.validation import TokenIdError, check_token_ids

Prompt = str | Sequence[int] | Sequence[dict]


class ContextLengthError(HintedError):
    """A prompt (with what the cache holds) longer than the model's context."""


@dataclass
class GenerationResponse:
    """One generated token and the text it completed, plus running statistics.

    `text` is the newly printable answer text (it may be empty while a multi-byte character,
    a possible stop string or possible markup is held back) and `reasoning` the newly printable
    reasoning (text inside ``<think>...</think>``). The last response has `finish_reason` set to
    "stop" (EOS or a stop string), "tool_calls" (it stopped after calling tools) or "length"
    (max_tokens or the context end) or "cancelled" (the `cancel` event was set), and carries
    the whole answer (`full_text`), the whole reasoning (`reasoning_text`), the parsed
    `tool_calls` (when tools were given) and whether some tool-call markup was malformed and
    passed on as text (`malformed_tool_call`). A cancelled stream ends with a response that
    carries no new token (`token` None, `logprob` NaN): the text held back until then, if any.
    """

    text: str
    token: int | None
    logprob: float
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    full_text: str | None = None
    reasoning_text: str | None = None
    malformed_tool_call: bool = False
    from_draft: bool = False  # speculative decoding: drafted and accepted
    speculative: SpeculativeStats | None = None  # speculative decoding: counts so far
    # With a response_format: True on the last response when the text does not complete the
    # format (max_tokens or a stop string came first).
    incomplete: bool = False


def generate_step(
    prompt: mx.array | Sequence[int],
    model,
    *,
    sampling: SamplingParams,
    cache: list[KVCache] | None = None,
    max_tokens: int = 256,
    prefill_step_size: int = 512,
    cancel=None,
    prompt_progress: PromptProgress | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
) -> Iterator[tuple[int, mx.array]]:
    """Yield `(token, logprobs)` for up to `max_tokens` new tokens after `prompt` (1-D ids).

    The prompt is prefilled in steps of `prefill_step_size` tokens so no step builds an
    attention matrix larger than step x length. Decoding queues step t+1 with
    `mx.async_eval` before it hands out token t, so graph building overlaps compute.

    `cancel` (a `threading.Event`, or anything with `is_set()`) is checked before each prefill
    step and before each token after the first: once it is set, the generator returns (after
    at most the token being computed). `prompt_progress(done, total)` is called after each
    prefill step and once more, with done == total, when the first token is ready.
    `logits_processors` run after the sampling ones (repetition penalty), before sampling.

    `cache` (a `ModelCache` from `model.make_cache()`, or a plain list of layer caches) is
    continued; the repetition penalty sees the ids it already holds (`cache.tokens`) before
    the prompt. The prompt ids are checked (TokenIdError) before anything is written.

    Cache invariant: whenever this generator is suspended at a yield, and once it has
    finished or been closed (whatever the reason: `max_tokens`, the consumer stopping at
    EOS or a stop string, `close()` after any number of tokens, an exception), every layer
    of the cache holds exactly the positions it held before, plus the prompt, plus every
    token yielded so far, and `cache.tokens` lists those ids. (An exception or a cancel before
    the first token leaves the cache as it was.) Nothing in the cache is left lazy, so another
    thread may read or continue it (MLX cannot evaluate arrays another thread recorded).
    """
    check_cancel(cancel)
    if prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be >= 1, got {prefill_step_size}")
    prompt_ids = check_token_ids(prompt, model.config.vocab_size)
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    prompt = mx.array(prompt_ids, dtype=mx.uint32)
    cache = ModelCache.wrap(cache) if cache is not None else model.make_cache()
    start = cache.offset
    prepare_cache(cache, prompt.size, room=max_tokens)
    sampler = make_sampler(sampling)
    processors = make_logits_processors(sampling) + list(logits_processors)
    history = None
    if processors:
        earlier = cache.tokens
        window = earlier[len(earlier) - sampling.repetition_context_size:]
        if UNKNOWN_TOKEN in window:
            warnings.warn(
                "the cache's token ids are unknown (a plain list of layer caches, or a cache "
                "file without them): the repetition penalty sees only the tokens of this "
                "call. Use model.make_cache() (a ModelCache) to carry them.",
                RuntimeWarning, stacklevel=2)
        # The processors read only the last repetition_context_size ids of the history.
        history = mx.array(window + prompt_ids, dtype=mx.int32)
    forward = getattr(model, "forward", model)  # ids were checked above

    def step(tokens: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal history
        logits = forward(tokens[None], cache=cache)[:, -1, :].astype(mx.float32)
        if processors:
            logits = apply_logits_processors(processors, history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logits)
        if processors:
            history = mx.concatenate([history, token.astype(mx.int32)])
        return token, logprobs[0]

    yielded = 0
    total = len(prompt_ids)
    try:
        # Prefill all but the last prompt token; that one produces the first logits.
        if not prefill(model, cache, prompt[:-1], step_size=prefill_step_size, cancel=cancel,
                       progress=prompt_progress, total=total) or _is_set(cancel):
            return
        token, logprobs = step(prompt[-1:])
        mx.async_eval(token, logprobs)
        while yielded < max_tokens:
            if yielded and _is_set(cancel):
                return
            if yielded + 1 < max_tokens:
                # Writes `token`'s keys and values and samples the next one.
                next_token, next_logprobs = step(token)
                mx.async_eval(next_token, next_logprobs)
            else:
                # The last token: only its keys and values (the invariant), no logits.
                _write_tokens(model, cache, token)
            value = token.item()
            if not yielded and prompt_progress is not None:
                prompt_progress(total, total)
            yielded += 1
            yield value, logprobs
            if yielded % 256 == 0:
                mx.clear_cache()
            if yielded < max_tokens:
                token, logprobs = next_token, next_logprobs
    finally:
        failure = sys.exc_info()[1]
        # Normally a no-op; after an exception mid-step, undo that step's partial writes.
        _settle(cache, start + len(prompt_ids) + yielded if yielded else start)
        try:
            _materialize(cache)
        except Exception:
            if failure is None or isinstance(failure, GeneratorExit):
                raise  # else the step's own exception is the one to report


def check_cancel(cancel) -> None:
    """Raise TypeError unless `cancel` is None or has an `is_set()` method (an Event)."""
    if cancel is not None and not callable(getattr(cancel, "is_set", None)):
        raise TypeError(f"cancel must be a threading.Event (or have is_set()), got "
                        f"{type(cancel).__name__}")


def _is_set(cancel) -> bool:
    return cancel is not None and cancel.is_set()


def _materialize(cache: ModelCache) -> None:
    """Evaluate the cache's arrays and read its ids now, on the generating thread."""
    mx.eval([c.state for c in cache])
    _ = cache.tokens


def _write_tokens(model, cache: ModelCache, tokens: mx.array) -> None:
    """Append `tokens`' keys and values to `cache` without computing logits (queued)."""
    inner = getattr(model, "model", None)
    if inner is None:
        model.forward(tokens[None], cache=cache)
    else:
        inner(tokens[None], cache)
        cache.add_tokens(tokens)
    mx.async_eval([c.state for c in cache])


def _settle(cache: ModelCache, offset: int) -> None:
    """Trim every layer of `cache` back to `offset` positions (ids follow)."""
    for layer_cache in cache:
        if layer_cache.offset > offset:
            layer_cache.trim(layer_cache.offset - offset)


def encode_prompt(tokenizer, prompt: Prompt, vocab_size: int | None = None,
                  tools: Sequence[dict] | None = None) -> list[int]:
    """Token ids of a prompt given as text, ids or chat messages (templated for generation,
    with `tools` shown to the model).

    A string is encoded as it is (no chat template); chat messages get the template with the
    generation prompt. Given ids are checked against `vocab_size` (when given): a
    TokenIdError (a ValueError) names the first bad one.
    """
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise TokenIdError(f"the prompt is {type(prompt).__name__}, not text or token ids: "
                           "decode it to str first (e.g. prompt.decode('utf-8'))")
    if isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
        return tokenizer.apply_chat_template(list(prompt), tools=tools, add_generation_prompt=True,
                                             tokenize=True)
    try:
        return check_token_ids(prompt, vocab_size if vocab_size is not None else 2**63)
    except TokenIdError as e:
        if e.out_of_range:
            raise
        raise TokenIdError("prompt must be a string, a list of token ids or a list of chat "
                           f"messages: {e}") from None


def stream_generate(
    model,
    tokenizer,
    prompt: Prompt,
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    repetition_context_size: int = 64,
    seed: int | None = None,
    stop: Sequence[str] | str | None = None,
    prefill_step_size: int = 512,
    cache: list[KVCache] | None = None,
    kv_bits: int | None = None,
    tools: Sequence[dict] | None = None,
    cancel=None,
    prompt_progress: PromptProgress | None = None,
    draft_model=None,
    num_draft_tokens: int = 4,
    prompt_lookup: int = 0,
    draft_cache: list[KVCache] | None = None,
    response_format: dict | None = None,
) -> Iterator[GenerationResponse]:
    """Generate from `prompt`, yielding a `GenerationResponse` per token.

    Args:
        prompt: text (encoded as is), a list of token ids, or a list of chat messages
            (``[{"role": "user", "content": "..."}]``, formatted with Qwen2's chat template).
        max_tokens: upper bound on generated tokens (must be >= 1).
        temperature, top_p, top_k, min_p, repetition_penalty, repetition_context_size, seed:
            sampling controls, see `qwen2_mlx.sampling.SamplingParams` (temperature 0 is greedy).
        stop: strings that end generation; the stop string itself is not returned.
        prefill_step_size: prompt tokens processed per forward pass.
        cache: a `ModelCache` to continue from (`model.make_cache()`, a saved prompt cache
            from `load_cache`); a plain list of layer caches also works, but the repetition
            penalty then sees only this call's tokens.
        kv_bits: store a new KV cache quantized to this many bits (8 halves its memory).
        tools: OpenAI function schemas. A chat prompt shows them to the model (through its
            template); with any prompt, the tool calls the model writes are parsed out of
            `text` into the last response's `tool_calls` (finish_reason "tool_calls").
        cancel: a `threading.Event` (or anything with `is_set()`), checked before each prefill
            step and each token: once set (from any thread), the stream ends within one token
            or prefill step with finish_reason "cancelled". Cancelled during the prefill, the
            cache is left as it was.
        prompt_progress: called as `prompt_progress(done, total)` after each prefill step
            (a progress bar for a long prompt).
        draft_model, num_draft_tokens, prompt_lookup, draft_cache: speculative decoding (see
            `qwen2_mlx.speculative`): a draft model sharing the tokenizer, or prompt lookup
            with n-grams up to `prompt_lookup`, proposes up to `num_draft_tokens` per target
            pass; the output is distributed exactly as without it.
        response_format: constrain the output, OpenAI style: ``{"type": "json_object"}``,
            ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``, or
            ``{"type": "regex", "pattern": ...}`` (``{"type": "text"}`` or None: free text).
            Needs ``pip install "qwen2-mlx[structured]"``; see `qwen2_mlx.structured`. With
            speculative decoding, drafts are checked against the format too.

    A string prompt is used as it is: no chat template is applied (the CLI's `--chat`, its
    default, templates the prompt; pass chat messages here for the same):

        stream_generate(model, tok, "Once upon a time")                    # raw text
        stream_generate(model, tok, [{"role": "user", "content": "Hi"}])   # chat template

    Reasoning (``<think>...</think>``, also when the prompt opened the ``<think>``) streams in
    `reasoning`, apart from `text`. Generation stops at any of `tokenizer.eos_token_ids` (not
    printed), a stop string, `max_tokens`, or the model's context length.

    Cache invariant (as `generate_step`): when this generator finishes or is closed, for any
    reason (a stop, `max_tokens`, the consumer breaking out of its loop or calling `close()`,
    an exception), every layer of `cache` holds exactly what it held before, plus the prompt,
    plus every token yielded (the EOS token included), and `cache.tokens` lists those ids.
    """
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    check_cancel(cancel)
    sampling = SamplingParams(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty,
        repetition_context_size=repetition_context_size, seed=seed,
    )
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError("stop strings must be non-empty strings")

    ids = encode_prompt(tokenizer, prompt, model.config.vocab_size, tools)
    if cache is not None:
        cache = ModelCache.wrap(cache)
    cached = cache.offset if cache is not None else 0
    context = model.config.context_length
    if cached + len(ids) > context:
        problem = (f"the prompt has {cached + len(ids)} tokens but the model's context is "
                   f"{context} tokens; shorten the prompt")
        if model.config.long_context.mode != "standard":
            raise ContextLengthError(problem)
        raise ContextLengthError(
            problem, " or load the model with dca=True or yarn_factor=4 for a longer context",
            " or extend the context with --dca or --yarn-factor 4")
    max_tokens = min(max_tokens, context - cached - len(ids))
    if max_tokens < 1:
        raise ValueError(
            f"the prompt fills the model's whole context ({context} tokens): no room to generate"
        )
    if cache is None:
        cache = model.make_cache(kv_bits=kv_bits)
    elif kv_bits is not None:
        raise ValueError("kv_bits applies to a new cache; the given cache keeps its own format")
    # The end of what the model reads before its output (a cached prompt counts): a prompt
    # that opened <think> starts the output in reasoning.
    tail = [t for t in cache.tokens[-8:] if t != UNKNOWN_TOKEN] + ids[-8:]
    stats = None
    speculative = draft_model is not None or bool(prompt_lookup)
    constraint = _structured_constraint(tokenizer, response_format, model.config.vocab_size,
                                        len(cache.tokens) + len(ids) if speculative else None)
    if speculative:
        if draft_model is not None:
            check_draft_model(model, draft_model, tokenizer)
            if draft_cache is None:
                draft_cache = draft_model.make_cache(kv_bits=kv_bits)
        stats = SpeculativeStats()
        steps = speculative_generate_step(
            mx.array(ids, dtype=mx.uint32), model, sampling=sampling, draft_model=draft_model,
            prompt_lookup=prompt_lookup, num_draft_tokens=num_draft_tokens, cache=cache,
            draft_cache=draft_cache, max_tokens=max_tokens, prefill_step_size=prefill_step_size,
            stats=stats, cancel=cancel, prompt_progress=prompt_progress, token_mask=constraint)
    else:
        steps = generate_step(ids, model, sampling=sampling, cache=cache, max_tokens=max_tokens,
                              prefill_step_size=prefill_step_size, cancel=cancel,
                              prompt_progress=prompt_progress,
                              logits_processors=[constraint] if constraint else ())
    try:
        yield from _responses(steps, tokenizer, ids, stops, max_tokens, tools, tail, stats,
                              constraint)
    finally:
        steps.close()  # settles the cache now, not whenever the generator is collected


def _responses(steps, tokenizer, ids: list[int], stops: list[str], max_tokens: int,
               tools: Sequence[dict] | None, tail: list[int],
               stats: SpeculativeStats | None = None,
               constraint=None) -> Iterator[GenerationResponse]:
    """The GenerationResponses of `steps` (generate_step's `(token, logprobs)` or the
    speculative `(token, logprobs, from_draft)`): text, stops, speeds. `tail` is the end of
    what the model read before its output (cached tokens included); `constraint` the
    response format's processor or token mask, asked at the end whether the output is
    complete."""
    eos = set(tokenizer.eos_token_ids)
    detokenizer = tokenizer.detokenizer()
    parser = OutputParser.for_prompt(tokenizer, tail, tools)

    tic = time.perf_counter()
    prompt_tps = 0.0
    pending = ""  # decoded text not yet handed out (may begin a stop string)
    generated: list[int] = []  # kept only to check a constrained output at the end
    returned: list[str] = []

    def respond(text: str, token: int | None, logprob: float, n: int,
                finish: str | None, from_draft: bool = False,
                incomplete: bool = False) -> GenerationResponse:
        parsed = parser.feed(text)
        final = {}
        if finish is not None:
            parsed = parsed + parser.finish()
            if finish == "stop" and parser.tool_calls:
                finish = "tool_calls"
            final = dict(tool_calls=list(parser.tool_calls), full_text=parser.text,
                         reasoning_text=parser.reasoning, malformed_tool_call=parser.malformed)
        elapsed = time.perf_counter() - tic
        return GenerationResponse(
            text=parsed.text,
            reasoning=parsed.reasoning,
            token=token,
            logprob=logprob,
            prompt_tokens=len(ids),
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
            from_draft=from_draft,
            speculative=dataclasses.replace(stats) if stats is not None else None,
            incomplete=incomplete,
            **final,
        )

    n = 0
    # Plain steps are (token, logprobs); speculative ones add from_draft.
    for n, (token, logprobs, *drafted) in enumerate(steps, start=1):
        if n == 1:
            prompt_time = time.perf_counter() - tic
            prompt_tps = len(ids) / prompt_time
            tic = time.perf_counter()
        finish = None
        text = ""
        if token in eos:
            finish = "stop"
            pending += detokenizer.finalize()
        else:
            pending += detokenizer.add_token(token)
        hit = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
        if hit >= 0:
            text, pending, finish = pending[:hit], "", "stop"
        elif finish is not None or n == max_tokens:
            if finish is None:
                pending += detokenizer.finalize()
                finish = "length"
            text, pending = pending, ""
        else:
            keep = stop_hold_back(pending, stops) if stops else 0
            text, pending = pending[: len(pending) - keep], pending[len(pending) - keep:]
        incomplete = False
        if constraint is not None:
            generated.append(token)
            returned.append(text)
            if finish is not None:
                cut = "".join(returned) if hit >= 0 else None
                incomplete = not constraint.output_complete(generated, cut)
        yield respond(text, token, logprobs[token].item(), n, finish, bool(drafted and drafted[0]),
                      incomplete)
        if finish is not None:
            return
    # The steps ended before a finish: `cancel` was set (generate_step checks it before each
    # prefill step and each token), so the last response carries no new token.
    yield respond(pending + detokenizer.finalize(), None, math.nan, n, "cancelled")


def _structured_constraint(tokenizer, response_format, vocab_size: int,
                           speculative_prompt_length: int | None):
    """What enforces `response_format`: a logits processor for plain decoding, or (given the
    length of the history before the output) a token mask for speculative decoding; None for
    free text."""
    if response_format is None or response_format == {"type": "text"}:
        return None  # free text needs no optional extra
    from qwen2_mlx.structured import (
        GrammarTokenMask,
        StructuredLogitsProcessor,
        make_grammar_matcher,
    )

    matcher = make_grammar_matcher(tokenizer, response_format, vocab_size)
    if matcher is None:
        return None
    if speculative_prompt_length is not None:
        return GrammarTokenMask(matcher, speculative_prompt_length)
    return StructuredLogitsProcessor(matcher)


class GenerationResult(str):
    """The generated answer text (a str), with the last response's details as attributes:
    `finish_reason`, `tool_calls`, `reasoning` (all of it) and `response`."""

    response: GenerationResponse | None

    def __new__(cls, text: str, response: GenerationResponse | None) -> GenerationResult:
        result = super().__new__(cls, text)
        result.response = response
        return result

    @property
    def finish_reason(self) -> str | None:
        return self.response.finish_reason if self.response else None

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.response.tool_calls if self.response else []

    @property
    def reasoning(self) -> str:
        return (self.response.reasoning_text or "") if self.response else ""


def generate(model, tokenizer, prompt: Prompt, *, verbose: bool = False,
             **kwargs) -> GenerationResult:
    """Generate and return the whole answer text; keyword arguments as for `stream_generate`.

    The result is a str with `finish_reason`, `tool_calls` and `reasoning` attributes. With
    `verbose`, the text streams to stdout and the speed and memory figures follow.
    """
    pieces = []
    last = None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        pieces.append(last.text)
        if verbose:
            print(last.reasoning + last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print(format_stats(last))
    return GenerationResult("".join(pieces), last)


def format_stats(response: GenerationResponse) -> str:
    """The speed and memory summary printed by `--verbose`."""
    return (
        f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec\n"
        f"Generation: {response.generation_tokens} tokens, "
        f"{response.generation_tps:.3f} tokens-per-sec\n"
        f"Peak memory: {response.peak_memory:.3f} GB"
    ) + (f"\n{response.speculative.summary()}" if response.speculative is not None else "")
