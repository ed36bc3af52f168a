"""Attention masks, built once per forward pass (not once per layer).

`create_attention_masks` looks at what the first layer's cache already holds and returns the
causal mask for full-attention layers and, when some layer slides, the sliding-window mask;
the model hands each layer the one it needs. Queries are the last tokens of the sequence
(bottom-right aligned), as in chunked prefill and decode against a cache.

This is the one place masks are made, so it is the seam for batched generation: a cache of
left-padded rows (`qwen2_mlx.batch_cache.BatchKVCache`) builds the masks itself, through its
`attention_masks(n_queries, sliding_window)`, ANDing each row's padding (keys a row's queries
must not see) into both masks, and every layer follows. Single sequences have no padding.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx

Mask = mx.array | str | None


class AttentionMasks(NamedTuple):
    """Masks for one forward pass: `full` for full-attention layers, `sliding` for sliding
    ones (None when no layer slides). Each is None (one query: nothing to hide), "causal"
    (MLX's fused causal mask) or a boolean (queries, keys) array, True where visible."""

    full: Mask
    sliding: Mask


def attention_mask(n_queries: int, n_keys: int, sliding_window: int | None) -> Mask:
    """Mask for the last `n_queries` positions of a sequence of `n_keys`.

    With a sliding window, query i sees keys j with i - window < j <= i, as transformers'
    `sliding_window_causal_mask_function` does.
    """
    if sliding_window is None or n_keys <= sliding_window:
        return "causal" if n_queries > 1 else None
    q_pos = mx.arange(n_keys - n_queries, n_keys)[:, None]
    k_pos = mx.arange(n_keys)[None, :]
    return (k_pos <= q_pos) & (k_pos > q_pos - sliding_window)


def create_attention_masks(hidden: mx.array, cache, sliding_window: int | None = None
                           ) -> AttentionMasks:
    """The masks of a forward pass of `hidden` (B, L, D) after what `cache` (the first
    layer's, or None) holds; `sliding_window` is the window of the sliding layers, if any."""
    n_queries = hidden.shape[1]
    batch_masks = getattr(cache, "attention_masks", None)
    if batch_masks is not None:  # a batch of left-padded rows hides each row's padding
        return batch_masks(n_queries, sliding_window)
    n_keys = (cache.offset if cache is not None else 0) + n_queries
    full = attention_mask(n_queries, n_keys, None)
    sliding = attention_mask(n_queries, n_keys, sliding_window) if sliding_window else None
    return AttentionMasks(full, sliding)
