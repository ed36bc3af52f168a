"""Text generation: chunked prefill, pipelined decode, streaming text with stop handling."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx

from qwen2_mlx.cache import KVCache
from qwen2_mlx.sampling import (
    LogitsProcessor,
    SamplingParams,
    apply_logits_processors,
    make_logits_processors,
    make_sampler,
)

Prompt = str | Sequence[int] | Sequence[dict]


@dataclass
class GenerationResponse:
    """One generated token and the text it completed, plus running statistics.

    `text` is the newly printable text (it may be empty while a multi-byte character or a
    possible stop string is held back). The last response has `finish_reason` set to
    "stop" (EOS or a stop string) or "length" (max_tokens or the context end).
    """

    text: str
    token: int
    logprob: float
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None
    # With a response_format: True on the last response when the text does not complete the
    # format (max_tokens or a stop string came first).
    incomplete: bool = False


def generate_step(
    prompt: mx.array,
    model,
    *,
    sampling: SamplingParams,
    cache: list[KVCache] | None = None,
    max_tokens: int = 256,
    prefill_step_size: int = 512,
    logits_processors: Sequence[LogitsProcessor] = (),
) -> Iterator[tuple[int, mx.array]]:
    """Yield `(token, logprobs)` for up to `max_tokens` new tokens after `prompt` (1-D ids).

    The prompt is prefilled in steps of `prefill_step_size` tokens so no step builds an
    attention matrix larger than step x length. Decoding queues step t+1 with
    `mx.async_eval` before it hands out token t, so graph building overlaps compute.
    `logits_processors` run after the sampling ones (repetition penalty), before sampling.
    """
    if prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be >= 1, got {prefill_step_size}")
    if prompt.size == 0:
        raise ValueError("the prompt is empty: give at least one token")
    cache = cache if cache is not None else model.make_cache()
    for layer_cache in cache:
        # DCA takes its length temperature from the whole prompt, even when prefilled in
        # steps; and one allocation for prompt + (most of the) output suffices.
        total = layer_cache.offset + prompt.size
        layer_cache.prompt_length = total
        layer_cache.reserve(total + min(max_tokens, 1024))
    sampler = make_sampler(sampling)
    processors = make_logits_processors(sampling) + list(logits_processors)
    history = prompt.astype(mx.int32)

    def step(tokens: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal history
        logits = model(tokens[None], cache=cache)[:, -1, :].astype(mx.float32)
        if processors:
            logits = apply_logits_processors(processors, history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logits)
        if processors:
            history = mx.concatenate([history, token.astype(mx.int32)])
        return token, logprobs[0]

    # Prefill all but the last prompt token; that one produces the first logits.
    while prompt.size > 1:
        n = min(prefill_step_size, prompt.size - 1)
        model(prompt[:n][None], cache=cache)
        mx.eval([c.state for c in cache])
        prompt = prompt[n:]
        mx.clear_cache()

    token, logprobs = step(prompt)
    mx.async_eval(token, logprobs)
    n = 0
    while n < max_tokens:
        if n + 1 < max_tokens:
            next_token, next_logprobs = step(token)
            mx.async_eval(next_token, next_logprobs)
        yield token.item(), logprobs
        n += 1
        if n % 256 == 0:
            mx.clear_cache()
        if n < max_tokens:
            token, logprobs = next_token, next_logprobs


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt given as text, ids or chat messages (templated for generation)."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    items = list(prompt)
    if items and all(isinstance(m, dict) for m in items):
        return tokenizer.apply_chat_template(items, add_generation_prompt=True, tokenize=True)
    if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        return items
    raise TypeError("prompt must be a string, a list of token ids or a list of chat messages")


def _stop_hold_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could still begin a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-k:]):
                longest = k
                break
    return longest


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
        cache: per-layer caches to continue from (e.g. a saved prompt cache).
        kv_bits: store a new KV cache quantized to this many bits (8 halves its memory).
        response_format: constrain the output, OpenAI style: ``{"type": "json_object"}``,
            ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``, or
            ``{"type": "regex", "pattern": ...}`` (``{"type": "text"}`` or None: free text).
            Needs ``pip install "qwen2-mlx[structured]"``; see `qwen2_mlx.structured`.

    Generation stops at any of `tokenizer.eos_token_ids` (not printed), a stop string,
    `max_tokens`, or the model's context length.
    """
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    sampling = SamplingParams(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty,
        repetition_context_size=repetition_context_size, seed=seed,
    )
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError("stop strings must be non-empty strings")

    ids = encode_prompt(tokenizer, prompt)
    cached = cache[0].offset if cache else 0
    context = model.config.context_length
    if cached + len(ids) > context:
        raise ValueError(
            f"the prompt has {cached + len(ids)} tokens but the model's context is "
            f"{context} tokens; shorten the prompt"
        )
    max_tokens = min(max_tokens, context - cached - len(ids))
    if max_tokens < 1:
        raise ValueError(
            f"the prompt fills the model's whole context ({context} tokens): no room to generate"
        )
    if cache is None:
        cache = model.make_cache(kv_bits=kv_bits)
    elif kv_bits is not None:
        raise ValueError("kv_bits applies to a new cache; the given cache keeps its own format")
    eos = set(tokenizer.eos_token_ids)
    detokenizer = tokenizer.detokenizer()
    constraint = _structured_processor(tokenizer, response_format, model.config.vocab_size)
    generated: list[int] = []  # kept only to check a constrained output at the end
    returned: list[str] = []

    tic = time.perf_counter()
    prompt_tps = 0.0
    pending = ""  # decoded text not yet handed out (may begin a stop string)
    n = 0
    for n, (token, logprobs) in enumerate(
        generate_step(mx.array(ids, dtype=mx.uint32), model, sampling=sampling, cache=cache,
                      max_tokens=max_tokens, prefill_step_size=prefill_step_size,
                      logits_processors=[constraint] if constraint else ()),
        start=1,
    ):
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
        incomplete = False
        if hit >= 0:
            text, pending, finish = pending[:hit], "", "stop"
        elif finish is not None or n == max_tokens:
            if finish is None:
                pending += detokenizer.finalize()
                finish = "length"
            text, pending = pending, ""
        else:
            keep = _stop_hold_back(pending, stops) if stops else 0
            text, pending = pending[: len(pending) - keep], pending[len(pending) - keep:]
        if constraint is not None:
            generated.append(token)
            returned.append(text)
            if finish is not None:
                cut = "".join(returned) if hit >= 0 else None
                incomplete = not constraint.output_complete(generated, cut)
        elapsed = time.perf_counter() - tic
        yield GenerationResponse(
            text=text,
            token=token,
            logprob=logprobs[token].item(),
            prompt_tokens=len(ids),
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
            incomplete=incomplete,
        )
        if finish is not None:
            return


def _structured_processor(tokenizer, response_format, vocab_size: int):
    """The logits processor enforcing `response_format`, or None for free text."""
    if response_format is None or response_format == {"type": "text"}:
        return None  # free text needs no optional extra
    from qwen2_mlx.structured import StructuredLogitsProcessor, make_grammar_matcher

    matcher = make_grammar_matcher(tokenizer, response_format, vocab_size)
    return StructuredLogitsProcessor(matcher) if matcher is not None else None


def generate(model, tokenizer, prompt: Prompt, *, verbose: bool = False, **kwargs) -> str:
    """Generate and return the whole text; keyword arguments as for `stream_generate`.

    With `verbose`, the text streams to stdout and the speed and memory figures follow.
    """
    pieces = []
    last = None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        pieces.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print(format_stats(last))
    return "".join(pieces)


def format_stats(response: GenerationResponse) -> str:
    """The speed and memory summary printed by `--verbose`."""
    return (
        f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec\n"
        f"Generation: {response.generation_tokens} tokens, "
        f"{response.generation_tps:.3f} tokens-per-sec\n"
        f"Peak memory: {response.peak_memory:.3f} GB"
    )
