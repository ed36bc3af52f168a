"""Scaled dot-product attention, the one call site the model uses for attention."""

from __future__ import annotations

import mlx.core as mx


def scaled_dot_product_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    scale: float,
    mask: mx.array | str | None = None,
) -> mx.array:
    """Attention over (B, H, L, D) queries and (B, H_kv, S, D) keys/values.

    GQA is handled without repeating K/V: query head h reads KV head h // (H / H_kv).
    `mask` is None, "causal" (bottom-right aligned: the queries are the last L of S
    positions) or a boolean array broadcastable to (B, H, L, S). MLX's fused kernel takes its
    softmax in float32 whatever the input dtype, as transformers' eager path does.
    """
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
