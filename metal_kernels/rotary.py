"""Rotation of vectors at explicit RoPE positions, for Dual Chunk Attention's queries and keys.

Kept here (not in qwen2_mlx.rope) because metal_kernels imports nothing of the model; it is the
same map as ``qwen2_mlx.rope.apply_rotary``: transformers' non-interleaved halves ("rotate_half").
"""

from __future__ import annotations

import mlx.core as mx


def apply_rotary(x: mx.array, positions: mx.array, inv_freq: mx.array) -> mx.array:
    """Rotate ``x`` (..., L, D) at explicit integer ``positions`` (L,) (or broadcastable (..., L)).

    cos/sin come from float32 angles ``pos * inv_freq`` (as transformers computes them) and the
    rotation runs in float32 (both in float64 if x is float64); the result has x's dtype. Unlike
    ``mx.fast.rope`` the positions need not be consecutive, which Dual Chunk Attention needs.
    """
    half = x.shape[-1] // 2
    if inv_freq.ndim != 1 or inv_freq.shape[0] * 2 != x.shape[-1]:
        raise ValueError(
            f"inv_freq of shape {tuple(inv_freq.shape)} does not match head dim {x.shape[-1]}"
        )
    # float64 x (CPU only) stays float64 rather than being silently downcast.
    compute = mx.float64 if x.dtype == mx.float64 else mx.float32
    angles = positions.astype(compute)[..., None] * inv_freq.astype(compute)
    cos, sin = mx.cos(angles), mx.sin(angles)
    xc = x.astype(compute)
    x1, x2 = xc[..., :half], xc[..., half:]
    rotated = mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
