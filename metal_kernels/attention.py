"""Scaled dot-product attention: the call sites the model uses for attention.

`scaled_dot_product_attention` runs MLX's fused SDPA, except for decode (one query token, no
mask) where our GQA decode kernel (gqa_decode.py) reads each K/V row once for all query heads
of a KV head. `quantized_scaled_dot_product_attention` takes a quantized KV cache's
(packed, scales, biases) triples: the kernel dequantizes rows in registers; the reference
dequantizes the cache and calls the former. dispatch.py decides whether kernels run.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx

from qwen2_mlx.metal_kernels.dispatch import (
    Backend,
    check_close,
    dtype_tolerance,
    kernels_enabled,
    select_backend,
)
from qwen2_mlx.metal_kernels.gqa_decode import (
    SUPPORTED_DTYPES,
    decode_shape_supported,
    gqa_decode,
)

QuantizedTensor = tuple[mx.array, mx.array, mx.array]

DECODE_KERNEL = "gqa_decode"
QUANTIZED_DECODE_KERNEL = "gqa_decode_quantized"


def reference_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    scale: float,
    mask: mx.array | str | None = None,
) -> mx.array:
    """MLX's fused attention (the reference and fallback of the decode kernel)."""
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


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
    positions) or a boolean array broadcastable to (B, H, L, S). Softmax runs in float32
    whatever the input dtype, as transformers' eager path does. Decode (L == 1) without a
    boolean mask runs the GQA decode kernel where kernels are on and the shapes fit.
    """
    if kernels_enabled() and _decode_kernel_fits(queries, keys, values, mask):
        variant = _variant(queries, keys, bits=0, group_size=0)
        backend = select_backend(DECODE_KERNEL, variant, lambda b: _self_check(b, variant))
        if backend is not None:
            return _run_decode(backend, queries, keys, values, scale=scale)
    return reference_attention(queries, keys, values, scale=scale, mask=mask)


def dequantize_kv(tensor: QuantizedTensor, *, group_size: int, bits: int,
                  dtype: mx.Dtype) -> mx.array:
    """A quantized cache tensor (packed, scales, biases) back to `dtype` (as the cache does)."""
    packed, scales, biases = tensor
    return mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits).astype(dtype)


def quantized_scaled_dot_product_attention(
    queries: mx.array,
    keys: QuantizedTensor,
    values: QuantizedTensor,
    *,
    scale: float,
    group_size: int,
    bits: int,
    mask: mx.array | str | None = None,
) -> mx.array:
    """Attention against an affine-quantized KV cache, given as `mx.quantize` triples.

    keys/values: (packed (B, H_kv, S, D*bits/32) uint32, scales (B, H_kv, S, D/group_size),
    biases (same)). Decode without a boolean mask runs the kernel, which reads the packed
    cache directly; otherwise the cache is dequantized to the queries' dtype and attended
    with `scaled_dot_product_attention`.
    """
    _check_quantized(keys, "keys")
    _check_quantized(values, "values")
    if kernels_enabled() and bits in (4, 8) and group_size in (32, 64, 128) and _decode_kernel_fits(
        queries, keys[1], values[1], mask, head_dim=keys[0].shape[-1] * 32 // bits
    ):
        variant = _variant(queries, keys[1], bits=bits, group_size=group_size)
        backend = select_backend(
            QUANTIZED_DECODE_KERNEL, variant, lambda b: _self_check(b, variant)
        )
        if backend is not None:
            return _run_decode(backend, queries, keys, values, scale=scale, bits=bits,
                               group_size=group_size)
    k = dequantize_kv(keys, group_size=group_size, bits=bits, dtype=queries.dtype)
    v = dequantize_kv(values, group_size=group_size, bits=bits, dtype=queries.dtype)
    return scaled_dot_product_attention(queries, k, v, scale=scale, mask=mask)


def _check_quantized(tensor: object, what: str) -> None:
    if not (isinstance(tensor, tuple | list) and len(tensor) == 3):
        raise ValueError(f"quantized {what} must be a (packed, scales, biases) triple")
    if tensor[0].dtype != mx.uint32:
        raise ValueError(f"quantized {what} must be packed uint32, got {tensor[0].dtype}")


def _decode_kernel_fits(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    mask: object,
    head_dim: int | None = None,
) -> bool:
    """Decode shapes the kernel takes: one query, no boolean mask, 4-D, known dtypes."""
    if queries.ndim != 4 or keys.ndim != 4 or values.ndim != 4:
        return False
    batch, q_heads, q_len, dim = queries.shape
    kv_heads = keys.shape[1]
    if q_len != 1 or not (mask is None or isinstance(mask, str) and mask == "causal"):
        return False
    if head_dim is not None and dim != head_dim:
        return False
    if head_dim is None and (keys.shape[-1] != dim or values.shape[-1] != dim):
        return False
    if keys.shape[0] != batch or kv_heads == 0 or q_heads % kv_heads or keys.shape[2] == 0:
        return False
    if any(a.dtype not in SUPPORTED_DTYPES for a in (queries, keys, values)):
        return False
    return decode_shape_supported(dim, q_heads // kv_heads)


class DecodeVariant(NamedTuple):
    """A decode kernel variant: what it is compiled for (dtype, head_dim, the group G =
    q_heads / kv_heads, bits) and the head geometry its self-check runs at."""

    dtype: mx.Dtype
    kv_dtype: mx.Dtype
    head_dim: int
    q_heads: int
    kv_heads: int
    bits: int
    group_size: int


def _variant(queries: mx.array, kv: mx.array, *, bits: int, group_size: int) -> DecodeVariant:
    _, q_heads, _, dim = queries.shape
    return DecodeVariant(queries.dtype, kv.dtype, dim, q_heads, kv.shape[1], bits, group_size)


def _run_decode(
    backend: Backend,
    queries: mx.array,
    keys: mx.array | QuantizedTensor,
    values: mx.array | QuantizedTensor,
    *,
    scale: float,
    bits: int = 0,
    group_size: int = 64,
    block_keys: int | None = None,
) -> mx.array:
    batch, q_heads, _, dim = queries.shape
    out = gqa_decode(
        backend,
        queries.reshape(batch * q_heads, 1, dim),
        keys,
        values,
        scale=scale,
        out_dtype=queries.dtype,
        bits=bits,
        group_size=group_size,
        block_keys=block_keys,
    )
    return out.reshape(batch, q_heads, 1, dim)


def _self_check(backend: Backend, variant: DecodeVariant) -> None:
    """Run the variant on small caches of its own head geometry (one block, and several
    blocks plus the merge pass) and compare with MLX's attention on the same (dequantized)
    values."""
    q_dtype, kv_dtype, dim, q_heads, kv_heads, bits, group_size = variant
    key = mx.random.key(1234)
    kq, kk, kv = mx.random.split(key, 3)
    queries = mx.random.normal((1, q_heads, 1, dim), key=kq).astype(q_dtype)
    n_keys = 40
    keys = mx.random.normal((1, kv_heads, n_keys, dim), key=kk).astype(kv_dtype)
    values = mx.random.normal((1, kv_heads, n_keys, dim), key=kv).astype(kv_dtype)
    if bits:
        keys_in = mx.quantize(keys, group_size=group_size, bits=bits)
        values_in = mx.quantize(values, group_size=group_size, bits=bits)
        keys = dequantize_kv(keys_in, group_size=group_size, bits=bits, dtype=kv_dtype)
        values = dequantize_kv(values_in, group_size=group_size, bits=bits, dtype=kv_dtype)
    else:
        keys_in, values_in = keys, values
    scale = dim**-0.5
    f32 = mx.float32
    expected = reference_attention(queries.astype(f32), keys.astype(f32), values.astype(f32),
                                   scale=scale)
    tolerance = max(dtype_tolerance(q_dtype), dtype_tolerance(kv_dtype))
    for block_keys in (n_keys, 16):
        got = _run_decode(backend, queries, keys_in, values_in, scale=scale, bits=bits,
                          group_size=group_size, block_keys=block_keys)
        mx.eval(got)
        check_close(f"gqa decode {variant} block_keys={block_keys}", got, expected, tolerance)
