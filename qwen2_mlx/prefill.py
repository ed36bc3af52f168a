"""Prompt prefill: write a prompt's keys and values into a model's cache in bounded steps.

Shared by plain decoding (`generate.generate_step`), chat sessions and speculative decoding
(`speculative.speculative_generate_step`, which prefills both the target and the draft).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

# Called after each prefill step with (prompt tokens done, prompt tokens in all).
PromptProgress = Callable[[int, int], None]


def prepare_cache(cache, prompt_size: int, room: int) -> None:
    """Get every layer of `cache` ready for a prompt of `prompt_size` tokens and `room` more.

    DCA takes its length temperature from the whole prompt, even when it is prefilled in
    steps; and one allocation for prompt + (most of the) output suffices.
    """
    for layer_cache in cache:
        total = layer_cache.offset + prompt_size
        layer_cache.prompt_length = total
        layer_cache.reserve(total + min(room, 1024))


def prefill(model, cache, ids: mx.array, *, step_size: int = 512, cancel=None,
            progress: PromptProgress | None = None, total: int | None = None) -> bool:
    """Write the keys and values of `ids` (1-D, already checked) into `cache`, `step_size`
    tokens per forward pass, so no step builds an attention matrix larger than step x length.
    No logits are computed.

    Before each step it stops if `cancel.is_set()` (returns False; the steps done so far stay
    in the cache); after each it calls `progress(done, total)` (`total` defaults to the
    length of `ids`). Returns True when every id is in the cache. Nothing is left lazy (see
    `generate_step`).
    """
    if step_size < 1:
        raise ValueError(f"prefill_step_size must be >= 1, got {step_size}")
    forward = getattr(model, "forward", model)  # the ids were checked by the caller
    total = ids.size if total is None else total
    done = 0
    try:
        while done < ids.size:
            if cancel is not None and cancel.is_set():
                return False
            n = min(step_size, ids.size - done)
            forward(ids[done:done + n][None], cache=cache)
            mx.eval([c.state for c in cache])
            done += n
            mx.clear_cache()
            if progress is not None:
                progress(done, total)
        return True
    finally:
        _ = getattr(cache, "tokens", None)  # a ModelCache's ids of the steps, read on this thread
