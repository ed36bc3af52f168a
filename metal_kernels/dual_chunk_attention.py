"""Dual Chunk Attention (DCA) kernels and their pure-MLX reference, with bounded memory.

Follows the code of ChunkLlama / vLLM / SGLang (spec ``long-context.md`` §3, §4, §8), not the paper:
positions are clamped at ``chunk_size`` C, not C-1 (§3.3). The model's side of DCA (its config,
key positions, length temperature and attention module) is `qwen2_mlx.dca`; these functions take
plain parameters: the geometry as two ints, and `rotate`, the caller's rotation of float32
vectors at integer positions (RoPE with the model's frequencies).

Notation: C = chunk_size, W = local_size, L = C - W (``chunk_len``). The token at absolute
position t lies in chunk t // L (chunks are aligned to position 0).

* Keys arrive as the cache stores them: rotated once, at ``t mod L``, and multiplied by the
  length temperature of the step that wrote them (``qwen2_mlx.dca.dca_write_keys``).
* A query at position i is rotated three ways: intra ``i mod L`` (keys of its own chunk, causal),
  successive ``min(i mod L + L, C)`` (keys of the previous chunk) and inter ``min(2L-1, C)``
  (all older keys). One softmax runs over the union, here as an LSE merge of key-blocked parts.
* Memory: queries are tiled (tiles never cross a chunk boundary) and every part is blocked over
  keys, so the largest score block is about ``query_tile * key_block`` floats per head; a full
  Tq x Tk score matrix is never built.

``dual_chunk_attention`` is the dispatch the model calls: where kernels are on (dispatch.py) and
the shapes fit, it runs the Metal kernels (decode: gqa_decode.py with the three query copies;
prefill: dca_prefill.py); otherwise ``dual_chunk_attention_reference``, the pure-MLX
implementation above, which is also what the kernels are tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import mlx.core as mx

from qwen2_mlx.metal_kernels.attention import QuantizedTensor, dequantize_kv
from qwen2_mlx.metal_kernels.dca_prefill import dca_prefill
from qwen2_mlx.metal_kernels.dispatch import (
    Backend,
    check_close,
    dtype_tolerance,
    select_backend,
)
from qwen2_mlx.metal_kernels.gqa_decode import (
    SUPPORTED_DTYPES,
    decode_shape_supported,
    gqa_decode,
)

__all__ = [
    "Rotate",
    "attention_with_lse",
    "dual_chunk_attention",
    "dual_chunk_attention_kernel",
    "dual_chunk_attention_reference",
    "merge_attention_partials",
    "quantized_dual_chunk_attention",
]

# rotate(x (..., L, D) float32, positions (L,) int32) -> x rotated at those positions.
Rotate = Callable[[mx.array, mx.array], mx.array]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _geometry(chunk_size: int, local_size: int) -> tuple[int, int]:
    """(L = C - W, the inter-chunk query position min(2L - 1, C)) of a valid geometry."""
    if not (_is_int(chunk_size) and _is_int(local_size) and 0 < local_size < chunk_size):
        raise ValueError(f"DCA needs 0 < local_size < chunk_size, got local_size={local_size!r}, "
                         f"chunk_size={chunk_size!r}")
    chunk_len = chunk_size - local_size
    return chunk_len, min(2 * chunk_len - 1, chunk_size)


def _compute_dtype(*arrays: mx.array) -> mx.Dtype:
    # float32 accumulation for fp16/bf16/fp32 inputs. float64 inputs (CPU only) stay float64,
    # though MLX's float64 exp/cos are only ~1e-7 accurate, so it is no exactness oracle.
    return mx.float64 if any(a.dtype == mx.float64 for a in arrays) else mx.float32


def attention_with_lse(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float,
    mask: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Softmax attention that also returns the log-sum-exp of the scaled logits.

    Shapes broadcast like matmul: q (..., M, D), k (..., N, D), v (..., N, Dv); ``mask`` is a
    boolean array broadcastable to (..., M, N), True where a key is visible. Computes in float32
    (float64 if an input is float64). Returns ``out`` (..., M, Dv) and ``lse`` (..., M).
    A row with no visible key gets ``out = 0`` and ``lse = -inf``, so merging drops it.
    """
    compute = _compute_dtype(q, k, v)
    logits = (q.astype(compute) * scale) @ k.astype(compute).swapaxes(-1, -2)
    if mask is not None:
        logits = mx.where(mask, logits, -mx.inf)
    row_max = mx.max(logits, axis=-1, keepdims=True)
    if mask is not None:
        row_max = mx.where(mx.isneginf(row_max), 0.0, row_max)
    weights = mx.exp(logits - row_max)
    total = mx.sum(weights, axis=-1, keepdims=True)
    out = weights @ v.astype(compute)
    if mask is not None:
        out = out / mx.where(total > 0, total, 1.0)
    else:
        out = out / total
    lse = (row_max + mx.log(total)).squeeze(-1)
    return out, lse


def merge_attention_partials(
    parts: Sequence[tuple[mx.array, mx.array]],
) -> tuple[mx.array, mx.array]:
    """Merge attention over disjoint key sets: ``out = sum_p w_p out_p``, w_p = exp(lse_p - lse).

    Each part is ``(out (..., M, Dv), lse (..., M))`` from ``attention_with_lse``. The result equals
    one softmax over the union of the keys (spec §4.1). Parts with ``lse = -inf`` contribute
    nothing; a row that is -inf in every part gets ``out = 0``, ``lse = -inf``.
    """
    if len(parts) == 0:
        raise ValueError("merge_attention_partials needs at least one part")
    if len(parts) == 1:
        return parts[0]
    lses = mx.stack([lse for _, lse in parts])
    top = mx.max(lses, axis=0)
    top = mx.where(mx.isneginf(top), 0.0, top)
    weights = mx.exp(lses - top)
    total = mx.sum(weights, axis=0)
    out = weights[0][..., None] * parts[0][0]
    for weight, (part_out, _) in zip(weights[1:], parts[1:], strict=True):
        out = out + weight[..., None] * part_out
    out = out / mx.where(total > 0, total, 1.0)[..., None]
    return out, top + mx.log(total)


def _check_attention_inputs(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    q_start: int,
    query_tile: int,
    key_block: int,
) -> None:
    _check_shapes(queries, tuple(keys.shape), tuple(values.shape), q_start)
    if not _is_int(query_tile) or query_tile < 1:
        raise ValueError(f"query_tile must be a positive int, got {query_tile!r}")
    if not _is_int(key_block) or key_block < 1:
        raise ValueError(f"key_block must be a positive int, got {key_block!r}")


def _check_shapes(queries: mx.array, k_shape: tuple, v_shape: tuple, q_start: int) -> None:
    for name, shape in (("queries", tuple(queries.shape)), ("keys", k_shape),
                        ("values", v_shape)):
        if len(shape) != 4:
            raise ValueError(f"{name} must be 4-D (B, H, T, D), got shape {shape}")
    batch, q_heads, q_len, head_dim = queries.shape
    if k_shape[3] != head_dim or k_shape[:3] != v_shape[:3]:
        raise ValueError(
            f"keys {k_shape} and values {v_shape} do not match queries {tuple(queries.shape)}"
        )
    if k_shape[0] != batch:
        raise ValueError(f"batch of keys ({k_shape[0]}) differs from queries ({batch})")
    kv_heads = k_shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) are not a multiple of kv heads ({kv_heads})")
    if q_len < 1:
        raise ValueError("queries must hold at least one token")
    if not _is_int(q_start) or q_start != k_shape[2] - q_len:
        raise ValueError(
            f"q_start={q_start!r} but queries must be the last {q_len} of {k_shape[2]} "
            f"cached tokens, i.e. q_start={k_shape[2] - q_len}"
        )


def dual_chunk_attention_reference(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    q_start: int,
    chunk_size: int,
    local_size: int,
    rotate: Rotate,
    scale: float,
    q_temperature: float = 1.0,
    query_tile: int = 512,
    key_block: int = 4096,
) -> mx.array:
    """Dual Chunk Attention of unrotated queries against a DCA key cache (prefill or decode).

    Args:
        queries: (B, Hq, Tq, D) **unrotated** queries of absolute positions q_start..Tk-1.
        keys: (B, Hkv, Tk, D) cached keys (rotated at t mod L and scaled when written).
        values: (B, Hkv, Tk, D) cached values.
        q_start: absolute position of the first query; must equal Tk - Tq.
        chunk_size, local_size: the DCA geometry C and W.
        rotate: rotates float32 queries at integer positions (plain RoPE frequencies: DCA
            never uses YaRN's, §0.1).
        scale: softmax scale, normally D**-0.5.
        q_temperature: s for the queries (prefill: s(prompt length); decode: s(current length)).
        query_tile: most query rows per tile; tiles also end at chunk boundaries.
        key_block: keys per score block at ``query_tile`` rows; smaller tiles (e.g. decode) take
            proportionally more keys, so a score block is at most ~query_tile*key_block per head.

    Returns (B, Hq, Tq, D) in the dtype of ``queries``. Decode (Tq = 1) is the same computation,
    so it equals the last row of a prefill (spec §4.3). GQA runs without repeating K/V.
    """
    _check_attention_inputs(queries, keys, values, q_start, query_tile, key_block)
    chunk_len, inter_position = _geometry(chunk_size, local_size)
    batch, q_heads, q_len, head_dim = queries.shape
    kv_heads, k_len = keys.shape[1], keys.shape[2]
    groups = q_heads // kv_heads
    compute = _compute_dtype(queries, keys, values)
    softmax_scale = scale * q_temperature
    block_budget = query_tile * key_block

    # Query head h uses kv head h // groups, so (B, Hq) -> (B, Hkv, G) is a free reshape. The G
    # heads' rows of a tile are then stacked into one (G * rows)-row matrix per kv head: one GEMM
    # against unrepeated K/V.
    grouped = queries.reshape(batch, kv_heads, groups, q_len, head_dim)

    tiles = []
    begin = q_start
    while begin < k_len:
        chunk_start = (begin // chunk_len) * chunk_len
        end = min(chunk_start + chunk_len, k_len, begin + query_tile)
        rows = end - begin
        keys_per_block = max(key_block, block_budget // rows)
        q_tile = grouped[:, :, :, begin - q_start : end - q_start].astype(compute)
        positions = mx.arange(begin, end, dtype=mx.int32)
        intra_pos = positions - chunk_start

        # (query position, key range, causal) for each part; §4.2.
        parts = []
        if chunk_start >= 2 * chunk_len:
            inter_pos = mx.full((rows,), inter_position, dtype=mx.int32)
            parts.append((inter_pos, 0, chunk_start - chunk_len, False))
        if chunk_start >= chunk_len:
            succ_pos = mx.minimum(intra_pos + chunk_len, chunk_size)
            parts.append((succ_pos, chunk_start - chunk_len, chunk_start, False))
        # Keys past the tile's last query are never visible, so the intra range stops at `end`.
        parts.append((intra_pos, chunk_start, end, True))

        merged = None
        for rope_pos, key_lo, key_hi, causal in parts:
            q_rot = rotate(q_tile, rope_pos)
            q_rot = q_rot.reshape(batch, kv_heads, groups * rows, head_dim)
            for block_lo in range(key_lo, key_hi, keys_per_block):
                block_hi = min(block_lo + keys_per_block, key_hi)
                mask = None
                if causal and block_hi - 1 > begin:
                    # Causal in absolute positions (= flash-attn's bottom-right alignment).
                    visible = mx.arange(block_lo, block_hi)[None, :] <= positions[:, None]
                    mask = mx.broadcast_to(visible, (groups, rows, block_hi - block_lo))
                    mask = mask.reshape(groups * rows, block_hi - block_lo)
                part = attention_with_lse(
                    q_rot,
                    keys[:, :, block_lo:block_hi],
                    values[:, :, block_lo:block_hi],
                    softmax_scale,
                    mask,
                )
                merged = part if merged is None else merge_attention_partials([merged, part])
        tile_out = merged[0].astype(queries.dtype)
        tile_out = tile_out.reshape(batch, kv_heads, groups, rows, values.shape[3])
        if end < k_len:
            # MLX is lazy: without this, the graphs of all tiles are alive at once and their
            # score blocks pile up (measured ~100x the per-tile bound on an 8K prompt).
            mx.eval(tile_out)
        tiles.append(tile_out)
        begin = end

    out = tiles[0] if len(tiles) == 1 else mx.concatenate(tiles, axis=3)
    return out.reshape(batch, q_heads, q_len, values.shape[3])


# ---------------------------------------------------------------------------------------------
# Dispatch: Metal kernels where they are on and fit, else the reference above.
# ---------------------------------------------------------------------------------------------

DECODE_KERNEL = "dca_decode"
QUANTIZED_DECODE_KERNEL = "dca_decode_quantized"
PREFILL_KERNEL = "dca_prefill"
PREFILL_ROWS_PER_LAUNCH = 2048


class DcaVariant(NamedTuple):
    """A DCA kernel variant: dtypes, head_dim, the head geometry (G = q_heads / kv_heads is
    compiled in) and, for a quantized cache, its bits and group size."""

    dtype: mx.Dtype
    kv_dtype: mx.Dtype
    head_dim: int
    q_heads: int
    kv_heads: int
    bits: int = 0
    group_size: int = 0


def dual_chunk_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    q_start: int,
    chunk_size: int,
    local_size: int,
    rotate: Rotate,
    scale: float,
    q_temperature: float = 1.0,
    query_tile: int = 512,
    key_block: int = 4096,
) -> mx.array:
    """Dual Chunk Attention; same arguments and result as ``dual_chunk_attention_reference``.

    Runs the DCA Metal kernels (decode for one query token, prefill tiles otherwise) where
    kernels are on and the head geometry fits (head_dim 32/64/96/128, G * head_dim <= 1024,
    float32/float16/bfloat16); ``query_tile`` and ``key_block`` only shape the reference.
    """
    _check_attention_inputs(queries, keys, values, q_start, query_tile, key_block)
    args = dict(q_start=q_start, chunk_size=chunk_size, local_size=local_size, rotate=rotate,
                scale=scale, q_temperature=q_temperature)
    if _kernel_fits(queries, keys, values):
        name = DECODE_KERNEL if queries.shape[2] == 1 else PREFILL_KERNEL
        variant = DcaVariant(queries.dtype, keys.dtype, queries.shape[3], queries.shape[1],
                             keys.shape[1])
        backend = select_backend(name, variant, lambda b: _self_check(b, name, variant))
        if backend is not None:
            return dual_chunk_attention_kernel(backend, queries, keys, values, **args)
    return dual_chunk_attention_reference(queries, keys, values, query_tile=query_tile,
                                          key_block=key_block, **args)


def quantized_dual_chunk_attention(
    queries: mx.array,
    keys: QuantizedTensor,
    values: QuantizedTensor,
    *,
    group_size: int,
    bits: int,
    q_start: int,
    chunk_size: int,
    local_size: int,
    rotate: Rotate,
    scale: float,
    q_temperature: float = 1.0,
) -> mx.array:
    """Dual Chunk Attention against an affine-quantized DCA cache ((packed, scales, biases)
    triples, as `quantized_scaled_dot_product_attention` takes them).

    Decode runs the DCA decode kernel on the cache as stored (rows dequantized in registers,
    no dequantized copy of the cache) where kernels are on and the shapes fit; otherwise,
    and for prefill, the cache is dequantized to the queries' dtype for `dual_chunk_attention`.
    """
    head_dim = keys[0].shape[-1] * 32 // bits
    scales_shape = tuple(keys[1].shape)
    k_shape = (*scales_shape[:3], head_dim)
    _check_shapes(queries, k_shape, (*tuple(values[1].shape)[:3], head_dim), q_start)
    args = dict(q_start=q_start, chunk_size=chunk_size, local_size=local_size, rotate=rotate,
                scale=scale, q_temperature=q_temperature)
    if (queries.shape[2] == 1 and bits in (4, 8) and group_size in (32, 64, 128)
            and _kernel_fits(queries, keys[1], values[1], head_dim=head_dim)):
        variant = DcaVariant(queries.dtype, keys[1].dtype, head_dim, queries.shape[1],
                             k_shape[1], bits, group_size)
        backend = select_backend(QUANTIZED_DECODE_KERNEL, variant,
                                 lambda b: _self_check(b, QUANTIZED_DECODE_KERNEL, variant))
        if backend is not None:
            return dual_chunk_attention_kernel(backend, queries, keys, values, bits=bits,
                                               group_size=group_size, **args)
    k = dequantize_kv(keys, group_size=group_size, bits=bits, dtype=queries.dtype)
    v = dequantize_kv(values, group_size=group_size, bits=bits, dtype=queries.dtype)
    return dual_chunk_attention(queries, k, v, **args)


def _kernel_fits(queries: mx.array, keys: mx.array, values: mx.array,
                 head_dim: int | None = None) -> bool:
    if any(a.dtype not in SUPPORTED_DTYPES for a in (queries, keys, values)):
        return False
    if head_dim is None and values.shape[3] != queries.shape[3]:
        return False
    if head_dim is not None and head_dim != queries.shape[3]:
        return False
    return decode_shape_supported(queries.shape[3], queries.shape[1] // keys.shape[1])


def dual_chunk_attention_kernel(
    backend: Backend,
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    q_start: int,
    chunk_size: int,
    local_size: int,
    rotate: Rotate,
    scale: float,
    q_temperature: float = 1.0,
    block_keys: int | None = None,
    bits: int = 0,
    group_size: int = 64,
) -> mx.array:
    """The kernel path of ``dual_chunk_attention`` on `backend` (no dispatch, no checks).

    The three rotated query copies are made here in float32, as the reference makes them;
    ``block_keys`` sets the decode kernel's keys per simdgroup (None: its default). With
    `bits`, keys/values are a quantized cache's triples (decode only).
    """
    batch, q_heads, q_len, head_dim = queries.shape
    chunk_len, _ = _geometry(chunk_size, local_size)
    softmax_scale = scale * q_temperature
    if q_len == 1:
        # Decode (spec §4.3): keys [cL, n) intra, [(c-1)L, cL) successive, [0, (c-1)L) inter.
        chunk = q_start // chunk_len
        copies = _rotated_copies(queries, q_start, chunk_size, local_size, rotate)
        q_parts = mx.stack(copies, axis=2).reshape(batch * q_heads, 3, head_dim)
        out = gqa_decode(
            backend, q_parts, keys, values, scale=softmax_scale, out_dtype=queries.dtype,
            intra_lo=chunk * chunk_len, succ_lo=max(chunk - 1, 0) * chunk_len,
            block_keys=block_keys, bits=bits, group_size=group_size,
        )
        return out.reshape(batch, q_heads, 1, head_dim)
    # Prefill in launches of at most PREFILL_ROWS_PER_LAUNCH query rows: the float32 query
    # copies of a 131K-token prompt would not fit in memory at once.
    outs = []
    for lo in range(0, q_len, PREFILL_ROWS_PER_LAUNCH):
        hi = min(lo + PREFILL_ROWS_PER_LAUNCH, q_len)
        copies = _rotated_copies(queries[:, :, lo:hi], q_start + lo, chunk_size, local_size,
                                 rotate)
        out = dca_prefill(
            backend, mx.stack(copies, axis=0), keys, values, q_start=q_start + lo,
            chunk_len=chunk_len, scale=softmax_scale, out_dtype=queries.dtype,
        )
        if hi < q_len:
            mx.eval(out)  # as the reference does per tile: do not keep every launch's copies
        outs.append(out)
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


def _rotated_copies(queries: mx.array, q_start: int, chunk_size: int, local_size: int,
                    rotate: Rotate) -> list[mx.array]:
    """The intra, successive and inter-chunk rotations of queries at q_start.. (float32)."""
    chunk_len, inter_position = _geometry(chunk_size, local_size)
    q_len = queries.shape[2]
    positions = mx.arange(q_start, q_start + q_len, dtype=mx.int32)
    intra = positions % chunk_len
    succ = mx.minimum(intra + chunk_len, chunk_size)
    inter = mx.full((q_len,), inter_position, dtype=mx.int32)
    q32 = queries.astype(mx.float32)
    return [rotate(q32, p) for p in (intra, succ, inter)]


def _position_map(x: mx.array, positions: mx.array) -> mx.array:
    """The self-check's stand-in for a rotation: a different linear map at every position.
    The kernels never rotate (they pick, per key, the query copy of its part), so any map
    that makes the three copies differ checks that choice."""
    angles = positions.astype(mx.float32)[:, None] * mx.linspace(0.1, 1.0, x.shape[-1])
    return x * mx.cos(angles) + mx.roll(x, 1, axis=-1) * mx.sin(angles)


def _self_check(backend: Backend, name: str, variant: DcaVariant) -> None:
    """A 40-token cache over four chunks (C=16, W=4, L=12) in the variant's head geometry: decode
    at the last position, or a 13-row prefill crossing a chunk boundary, against the
    reference in float32 (on the dequantized cache for a quantized variant)."""
    q_dtype, kv_dtype, head_dim, q_heads, kv_heads, bits, group_size = variant
    n_keys = 40
    q_len = 13 if name == PREFILL_KERNEL else 1
    kq, kk, kv = mx.random.split(mx.random.key(4321), 3)
    queries = mx.random.normal((1, q_heads, q_len, head_dim), key=kq).astype(q_dtype)
    keys = mx.random.normal((1, kv_heads, n_keys, head_dim), key=kk).astype(kv_dtype)
    values = mx.random.normal((1, kv_heads, n_keys, head_dim), key=kv).astype(kv_dtype)
    keys_in, values_in = keys, values
    if bits:
        keys_in = mx.quantize(keys, group_size=group_size, bits=bits)
        values_in = mx.quantize(values, group_size=group_size, bits=bits)
        keys = dequantize_kv(keys_in, group_size=group_size, bits=bits, dtype=kv_dtype)
        values = dequantize_kv(values_in, group_size=group_size, bits=bits, dtype=kv_dtype)
    args = dict(q_start=n_keys - q_len, chunk_size=16, local_size=4, rotate=_position_map,
                scale=head_dim**-0.5, q_temperature=1.1)
    f32 = mx.float32
    expected = dual_chunk_attention_reference(
        queries.astype(f32), keys.astype(f32), values.astype(f32), **args
    )
    tolerance = max(dtype_tolerance(q_dtype), dtype_tolerance(kv_dtype))
    for block_keys in ((None, 16) if q_len == 1 else (None,)):
        got = dual_chunk_attention_kernel(backend, queries, keys_in, values_in,
                                          block_keys=block_keys, bits=bits,
                                          group_size=group_size or 64, **args)
        mx.eval(got)
        check_close(f"{name} {variant}", got, expected, tolerance)
