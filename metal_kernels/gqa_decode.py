"""GQA decode attention kernel: one query token per sequence against the whole KV cache.

Design (our own; the opening it targets is described in shared/reference/metal-kernels.md §3.1):
MLX's decode kernels give every query head its own simdgroup and share K/V reads between the
heads of a KV head only for a group size of exactly 8. Here one simdgroup owns a
(batch, KV head, block of keys) triple and computes **all G query heads of that KV head** from
a single read of each K/V row: lane l holds elements [l*D/32, (l+1)*D/32) of the G queries,
of one K row and one V row, one `simd_sum` per head gives each logit, and an online softmax
keeps each head's running (max, sum, output) in registers.

The keys are split into blocks (one simdgroup each) so long caches use the whole GPU. With a
single block the kernel writes the normalised output directly; otherwise it writes per-block
partials (unnormalised output, max, sum) and a second kernel merges them exactly:
out = sum_b e^(m_b - M) o_b / sum_b e^(m_b - M) l_b with M = max_b m_b.

The same kernel runs Dual Chunk Attention decode: the query comes in P = 3 rotated copies
(intra, successive, inter chunk) and key j is scored with copy 0 if j >= intra_lo, copy 1 if
j >= succ_lo, else copy 2 (spec long-context.md §4.3). Keys are visited in ascending order, so
a simdgroup reloads its query registers at most twice. One online softmax over the union is
exactly the LSE merge of the three parts (§4.1).

The cache may be 8- or 4-bit affine quantized (MLX layout: packed uint32 words, element e at
bits [e*b, (e+1)*b), one scale and bias per `group_size` elements along head_dim): the kernel
then dequantizes K/V rows in registers instead of reading a dequantized copy.

K/V (and q) are read through their strides, so the cache's sliced views need no copy.
"""

from __future__ import annotations

import math

import mlx.core as mx

from qwen2_mlx.metal_kernels.dispatch import Backend, KernelProgram

# Simdgroups per threadgroup in the first pass (each is independent: no barriers).
_SIMDGROUPS_PER_THREADGROUP = 4
# Aim for about this many simdgroups per launch, so long caches fill the GPU.
_TARGET_SIMDGROUPS = 1024
_MIN_BLOCK_KEYS = 64
MAX_BLOCKS = 1024

_PRELUDE = """
  constexpr int DPL = D / 32;
  const int lane = int(thread_index_in_simdgroup);
  const int block = int(thread_position_in_grid.y);
  const int bh = int(thread_position_in_grid.z);
  const int n_keys = params[0];
  const int block_keys = params[1];
  const int intra_lo = params[2];
  const int succ_lo = params[3];
  const int n_blocks = (n_keys + block_keys - 1) / block_keys;
  const int n_kv = k_shape[1];
  const int64_t b = bh / n_kv;
  const int64_t kvh = bh % n_kv;
  const int lo = block * block_keys;
  const int hi = min(lo + block_keys, n_keys);
  const int e0 = lane * DPL;
  const float softmax_scale = scale[0];
  const int64_t row0 = int64_t(bh) * G;

  float qr[G][DPL];
  float acc[G][DPL];
  float run_max[G];
  float run_sum[G];
  for (int g = 0; g < G; ++g) {
    run_max[g] = Limits<float>::min;
    run_sum[g] = 0.0f;
    for (int i = 0; i < DPL; ++i) {
      acc[g][i] = 0.0f;
      qr[g][i] = 0.0f;
    }
  }

  int current_part = -1;
  for (int j = lo; j < hi; ++j) {
    const int part = (j >= intra_lo) ? 0 : ((j >= succ_lo) ? 1 : 2);
    if (part != current_part) {
      // The scale is folded into the query once, not into every logit.
      for (int g = 0; g < G; ++g) {
        for (int i = 0; i < DPL; ++i) {
          qr[g][i] = softmax_scale * static_cast<float>(
              q[(row0 + g) * q_strides[0] + part * q_strides[1] + (e0 + i) * q_strides[2]]);
        }
      }
      current_part = part;
    }
    float kr[DPL];
    float vr[DPL];
LOAD_ROWS
    for (int g = 0; g < G; ++g) {
      float partial = 0.0f;
      for (int i = 0; i < DPL; ++i) {
        partial += qr[g][i] * kr[i];
      }
      const float logit = simd_sum(partial);
      const float new_max = max(run_max[g], logit);
      const float rescale = metal::exp(run_max[g] - new_max);
      const float weight = metal::exp(logit - new_max);
      run_sum[g] = run_sum[g] * rescale + weight;
      for (int i = 0; i < DPL; ++i) {
        acc[g][i] = acc[g][i] * rescale + weight * vr[i];
      }
      run_max[g] = new_max;
    }
  }

  for (int g = 0; g < G; ++g) {
    const int64_t slot = (row0 + g) * n_blocks + block;
    for (int i = 0; i < DPL; ++i) {
      const float value = FINAL ? acc[g][i] / run_sum[g] : acc[g][i];
      o[slot * D + e0 + i] = static_cast<OT>(value);
    }
    if (lane == 0) {
      row_max[slot] = run_max[g];
      row_sum[slot] = run_sum[g];
    }
  }
"""

_LOAD_PLAIN = """
    {
      const int64_t kbase = b * k_strides[0] + kvh * k_strides[1] + j * k_strides[2];
      const int64_t vbase = b * v_strides[0] + kvh * v_strides[1] + j * v_strides[2];
      for (int i = 0; i < DPL; ++i) {
        kr[i] = static_cast<float>(k[kbase + (e0 + i) * k_strides[3]]);
        vr[i] = static_cast<float>(v[vbase + (e0 + i) * v_strides[3]]);
      }
    }
"""

# Affine dequantization w = scale * q + bias (mx.dequantize), element e of a row at bits
# [e*BITS, (e+1)*BITS) of the packed uint32 words.
_LOAD_QUANTIZED = """
    {
      constexpr uint mask = (1u << BITS) - 1u;
      const int64_t kw = b * k_strides[0] + kvh * k_strides[1] + j * k_strides[2];
      const int64_t ks = b * k_scales_strides[0] + kvh * k_scales_strides[1]
          + j * k_scales_strides[2];
      const int64_t kb = b * k_biases_strides[0] + kvh * k_biases_strides[1]
          + j * k_biases_strides[2];
      const int64_t vw = b * v_strides[0] + kvh * v_strides[1] + j * v_strides[2];
      const int64_t vs = b * v_scales_strides[0] + kvh * v_scales_strides[1]
          + j * v_scales_strides[2];
      const int64_t vb = b * v_biases_strides[0] + kvh * v_biases_strides[1]
          + j * v_biases_strides[2];
      for (int i = 0; i < DPL; ++i) {
        const int e = e0 + i;
        const int word = (e * BITS) / 32;
        const int shift = (e * BITS) % 32;
        const int grp = e / GS;
        const uint kq = (k[kw + word * k_strides[3]] >> shift) & mask;
        const uint vq = (v[vw + word * v_strides[3]] >> shift) & mask;
        kr[i] = static_cast<float>(k_scales[ks + grp * k_scales_strides[3]]) * float(kq)
            + static_cast<float>(k_biases[kb + grp * k_biases_strides[3]]);
        vr[i] = static_cast<float>(v_scales[vs + grp * v_scales_strides[3]]) * float(vq)
            + static_cast<float>(v_biases[vb + grp * v_biases_strides[3]]);
      }
    }
"""

_COMBINE = """
  const int d = int(thread_position_in_grid.x);
  const int64_t r = int64_t(thread_position_in_grid.y);
  const int n_blocks = params[0];
  float top = Limits<float>::min;
  for (int j = 0; j < n_blocks; ++j) {
    top = max(top, row_max[r * n_blocks + j]);
  }
  float num = 0.0f;
  float den = 0.0f;
  for (int j = 0; j < n_blocks; ++j) {
    const float w = metal::exp(row_max[r * n_blocks + j] - top);
    den += w * row_sum[r * n_blocks + j];
    num += w * o[(r * n_blocks + j) * D + d];
  }
  out[r * D + d] = static_cast<T>(num / den);
"""

_OUTPUTS = ["o", "row_max", "row_sum"]

DECODE = KernelProgram(
    "qwen2_gqa_decode",
    ["q", "k", "v", "params", "scale"],
    _OUTPUTS,
    _PRELUDE.replace("LOAD_ROWS", _LOAD_PLAIN),
    ensure_row_contiguous=False,
)
DECODE_QUANTIZED = KernelProgram(
    "qwen2_gqa_decode_quantized",
    ["q", "k", "k_scales", "k_biases", "v", "v_scales", "v_biases", "params", "scale"],
    _OUTPUTS,
    _PRELUDE.replace("LOAD_ROWS", _LOAD_QUANTIZED),
    ensure_row_contiguous=False,
)
COMBINE = KernelProgram("qwen2_gqa_decode_combine", ["o", "row_max", "row_sum", "params"],
                        ["out"], _COMBINE)

SUPPORTED_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
SUPPORTED_HEAD_DIMS = (32, 64, 96, 128)
MAX_HEADS_TIMES_DIM = 1024  # registers: G * D/32 query and output floats per lane


def decode_shape_supported(head_dim: int, group: int) -> bool:
    """Whether the kernel takes this head geometry (register budget and lane split)."""
    return head_dim in SUPPORTED_HEAD_DIMS and 1 <= group and group * head_dim <= (
        MAX_HEADS_TIMES_DIM
    )


def default_block_keys(n_keys: int, batch_kv_heads: int) -> int:
    """Keys per simdgroup: one block for short caches, enough blocks to fill the GPU for long
    ones, never fewer than 64 keys per block (each block costs a partial write and a merge)."""
    blocks = max(1, min(math.ceil(_TARGET_SIMDGROUPS / max(1, batch_kv_heads)),
                        math.ceil(n_keys / _MIN_BLOCK_KEYS), MAX_BLOCKS))
    return math.ceil(n_keys / blocks)


def gqa_decode(
    backend: Backend,
    q: mx.array,
    keys: mx.array | tuple[mx.array, mx.array, mx.array],
    values: mx.array | tuple[mx.array, mx.array, mx.array],
    *,
    scale: float,
    out_dtype: mx.Dtype,
    intra_lo: int = 0,
    succ_lo: int = 0,
    block_keys: int | None = None,
    group_size: int = 64,
    bits: int = 0,
) -> mx.array:
    """Run the decode kernel; returns (B * Hq, D) in `out_dtype`.

    q: (B * Hq, P, D) query copies (P = 1, or 3 for DCA: intra, successive, inter), any dtype
    and strides. keys/values: (B, Hkv, N, D) arrays, or with `bits` the (packed, scales, biases)
    triples of `mx.quantize` along D. Query head h of batch b is row b * Hq + h and reads KV
    head h // G. Callers check shapes with `decode_shape_supported`.
    """
    quantized = bits != 0
    k0 = keys[0] if quantized else keys
    batch, kv_heads, n_keys = k0.shape[:3]
    rows, _, head_dim = q.shape
    group = rows // (batch * kv_heads)
    if block_keys is None:
        block_keys = default_block_keys(n_keys, batch * kv_heads)
    n_blocks = math.ceil(n_keys / block_keys)
    final = n_blocks == 1
    template = [
        ("OT", out_dtype if final else mx.float32),
        ("D", head_dim),
        ("G", group),
        ("FINAL", final),
    ]
    params = mx.array([n_keys, block_keys, intra_lo, succ_lo], dtype=mx.int32)
    scale_arr = mx.array([scale], dtype=mx.float32)
    if quantized:
        program = DECODE_QUANTIZED
        inputs = [q, *keys, *values, params, scale_arr]
        template += [("BITS", bits), ("GS", group_size)]
    else:
        program = DECODE
        inputs = [q, keys, values, params, scale_arr]
    tg_y = min(_SIMDGROUPS_PER_THREADGROUP, n_blocks)
    o, row_max, row_sum = program(
        backend,
        inputs=inputs,
        template=template,
        grid=(32, n_blocks, batch * kv_heads),
        threadgroup=(32, tg_y, 1),
        output_shapes=[(rows, n_blocks, head_dim), (rows, n_blocks), (rows, n_blocks)],
        output_dtypes=[out_dtype if final else mx.float32, mx.float32, mx.float32],
    )
    if final:
        return o.reshape(rows, head_dim)
    (out,) = COMBINE(
        backend,
        inputs=[o, row_max, row_sum, mx.array([n_blocks], dtype=mx.int32)],
        template=[("T", out_dtype), ("D", head_dim)],
        grid=(head_dim, rows, 1),
        threadgroup=(head_dim, max(1, min(rows, 256 // head_dim)), 1),
        output_shapes=[(rows, head_dim)],
        output_dtypes=[out_dtype],
    )
    return out
