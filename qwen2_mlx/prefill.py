"""Prompt prefill: write a prompt's keys and values into a model's cache in bounded steps.

Shared by plain decoding (`generate.generate_step`) and speculative decoding
(`speculative.speculative_generate_step`), which prefills both the target and the draft.
"""

from __future__ import annotations

import mlx.core as mx

from qwen2_mlx.cache import KVCache


def prefill(
    model,
    prompt: mx.array,
    cache: list[KVCache],
    *,
    step_size: int = 512,
    room: int = 0,
) -> mx.array:
    """Feed all but the last token of `prompt` (1-D ids) through `model` into `cache`.

    Returns the last token (shape (1,)): feeding it produces the first next-token logits.
    The prompt goes in steps of `step_size` tokens so no step builds an attention matrix
    larger than step x length. `room` is how many more positions generation will add; the
    cache reserves prompt + `room` (at most 1024 of it) in one allocation.
    """
    if step_size < 1:
        raise ValueError(f"prefill_step_size must be >= 1, got {step_size}")
    if prompt.size == 0:
        raise ValueError("the prompt is empty: give at least one token")
    for layer_cache in cache:
        # DCA takes its length temperature from the whole prompt, even when prefilled in
        # steps; and one allocation for prompt + (most of the) output suffices.
        total = layer_cache.offset + prompt.size
        layer_cache.prompt_length = total
        layer_cache.reserve(total + min(room, 1024))
    while prompt.size > 1:
        n = min(step_size, prompt.size - 1)
        model(prompt[:n][None], cache=cache)
        mx.eval([c.state for c in cache])
        prompt = prompt[n:]
        mx.clear_cache()
    return prompt
