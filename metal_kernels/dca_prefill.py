"""Dual Chunk Attention prefill kernel: tiles of query rows against the DCA key cache.

Design (our own), spec long-context.md §4.2 and §9: a threadgroup owns TQ consecutive query
rows of one (batch, KV head); simdgroup s owns row s and computes all G query heads of the KV
head. The threadgroup walks the keys [0, last row's position] in blocks of BK: its threads
load a block of K and V rows into threadgroup memory once (shared by TQ rows x G heads), then
each simdgroup scores the keys it may see (key j <= its position i).

Key j is scored with the query copy of its part: intra (rotated at i mod L) when j is in the
row's chunk, successive (min(i mod L + L, C)) when in the previous chunk, inter (min(2L-1, C))
for older keys. Keys arrive in ascending order, so a row's parts come as inter, then
successive, then intra, and the query registers are reloaded at most twice. Each head keeps
one online softmax (running max, sum and output) over all three parts, which is exactly the
per-part (max, sum) partials merged by LSE (§4.1), without storing the partials.

The three rotated query copies are computed outside (float32, like the reference) and passed
in as q (3, B, Hq, Tq, D). K/V are read through their strides (the cache's sliced views).
"""

from __future__ import annotations

import math

import mlx.core as mx

from qwen2_mlx.metal_kernels.dispatch import Backend, KernelProgram

ROWS_PER_THREADGROUP = 8
# K and V blocks are staged as float: 2 * BK * D * 4 bytes = 16 KiB of threadgroup memory.
_STAGING_FLOATS = 2048

_SOURCE = """
  constexpr int DPL = D / 32;
  const int lane = int(thread_index_in_simdgroup);
  const int sg = int(simdgroup_index_in_threadgroup);
  const int tid = int(thread_index_in_threadgroup);
  const int tile_index = int(threadgroup_position_in_grid.y);
  const int bh = int(threadgroup_position_in_grid.z);
  const int q_len = params[0];
  const int q_start = params[1];
  const int chunk_len = params[2];
  const int n_kv = k_shape[1];
  const int64_t b = bh / n_kv;
  const int64_t kvh = bh % n_kv;
  const int64_t n_q_heads = int64_t(n_kv) * G;
  const int t = tile_index * TQ + sg;
  const bool active = t < q_len;
  const int pos = q_start + t;
  const int q_chunk = pos / chunk_len;
  const int key_end = q_start + min(tile_index * TQ + TQ, q_len);
  const int e0 = lane * DPL;
  const float softmax_scale = scale[0];
  const int64_t kbase = b * k_strides[0] + kvh * k_strides[1];
  const int64_t vbase = b * v_strides[0] + kvh * v_strides[1];

  threadgroup float k_tile[BK * D];
  threadgroup float v_tile[BK * D];

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
  for (int block0 = 0; block0 < key_end; block0 += BK) {
    for (int idx = tid; idx < BK * D; idx += TQ * 32) {
      const int j = block0 + idx / D;
      const int d = idx % D;
      if (j < key_end) {
        k_tile[idx] = static_cast<float>(k[kbase + j * k_strides[2] + d * k_strides[3]]);
        v_tile[idx] = static_cast<float>(v[vbase + j * v_strides[2] + d * v_strides[3]]);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (active) {
      const int stop = min(block0 + BK, pos + 1);
      for (int j = block0; j < stop; ++j) {
        const int chunk_gap = q_chunk - j / chunk_len;
        const int part = chunk_gap == 0 ? 0 : (chunk_gap == 1 ? 1 : 2);
        if (part != current_part) {
          for (int g = 0; g < G; ++g) {
            const int64_t head = kvh * G + g;
            const int64_t qoff = part * q_strides[0] + b * q_strides[1] + head * q_strides[2]
                + t * q_strides[3];
            for (int i = 0; i < DPL; ++i) {
              qr[g][i] = softmax_scale * static_cast<float>(q[qoff + (e0 + i) * q_strides[4]]);
            }
          }
          current_part = part;
        }
        const int row = (j - block0) * D + e0;
        for (int g = 0; g < G; ++g) {
          float partial = 0.0f;
          for (int i = 0; i < DPL; ++i) {
            partial += qr[g][i] * k_tile[row + i];
          }
          const float logit = simd_sum(partial);
          const float new_max = max(run_max[g], logit);
          const float rescale = metal::exp(run_max[g] - new_max);
          const float weight = metal::exp(logit - new_max);
          run_sum[g] = run_sum[g] * rescale + weight;
          for (int i = 0; i < DPL; ++i) {
            acc[g][i] = acc[g][i] * rescale + weight * v_tile[row + i];
          }
          run_max[g] = new_max;
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  if (active) {
    for (int g = 0; g < G; ++g) {
      const int64_t head = kvh * G + g;
      const int64_t orow = ((b * n_q_heads + head) * q_len + t) * D + e0;
      for (int i = 0; i < DPL; ++i) {
        out[orow + i] = static_cast<T>(acc[g][i] / run_sum[g]);
      }
    }
  }
"""

PREFILL = KernelProgram(
    "qwen2_dca_prefill",
    ["q", "k", "v", "params", "scale"],
    ["out"],
    _SOURCE,
    ensure_row_contiguous=False,
)


def dca_prefill(
    backend: Backend,
    q: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    q_start: int,
    chunk_len: int,
    scale: float,
    out_dtype: mx.Dtype,
) -> mx.array:
    """Run the prefill kernel; returns (B, Hq, Tq, D) in `out_dtype`.

    q: (3, B, Hq, Tq, D) query copies rotated at the intra, successive and inter positions of
    absolute positions q_start .. q_start + Tq - 1. keys/values: (B, Hkv, Tk, D) DCA cache
    (keys rotated at t mod L and temperature-scaled), Tk = q_start + Tq.
    """
    _, batch, q_heads, q_len, head_dim = q.shape
    kv_heads = keys.shape[1]
    tiles = math.ceil(q_len / ROWS_PER_THREADGROUP)
    (out,) = PREFILL(
        backend,
        inputs=[
            q,
            keys,
            values,
            mx.array([q_len, q_start, chunk_len], dtype=mx.int32),
            mx.array([scale], dtype=mx.float32),
        ],
        template=[
            ("T", out_dtype),
            ("D", head_dim),
            ("G", q_heads // kv_heads),
            ("TQ", ROWS_PER_THREADGROUP),
            ("BK", _STAGING_FLOATS // head_dim),
        ],
        grid=(32 * ROWS_PER_THREADGROUP, tiles, batch * kv_heads),
        threadgroup=(32 * ROWS_PER_THREADGROUP, 1, 1),
        output_shapes=[(batch, q_heads, q_len, head_dim)],
        output_dtypes=[out_dtype],
    )
    return out
