"""Quantized matrix-vector kernels for decode (MLX affine format, 4 and 8 bits).

`y = x @ dequantize(w).T` for a few rows of x (M <= 4), with w stored as `mx.quantize` does:
packed uint32 words (element e of a row at bits [e*b, (e+1)*b)), one scale and bias per
`group_size` elements, w = scale * q + bias.

Design (our own): one simdgroup computes ROWS = 4 output rows. Lane l walks K in steps of
32 * VPT values, reading two consecutive packed words per row (so a simdgroup reads 256
contiguous bytes of a row per step) and VPT = 64 / bits values of x. The bias term is
factored out of the group: sum_i x_i (s q_i + b) = s * sum_i x_i q_i + b * sum_i x_i. A lane's
VPT values always sit in one quantization group (group sizes are multiples of VPT), and the
tail of a row that does not fill a step is simply skipped by the lanes past K; that is the
case MLX's `qmv_fast` does not take (K % 512 != 0 at 4 bits, K % 256 != 0 at 8 bits,
metal-kernels.md §3.2). One `simd_sum` per (row, x row) at the end; no threadgroup memory.

The SwiGLU variant computes silu(x @ gate.T) * (x @ up.T) in one pass, reading x once and
writing only the product (the MLP's gate and up projections share their input).
"""

from __future__ import annotations

import math

import mlx.core as mx

from qwen2_mlx.metal_kernels.dispatch import Backend, KernelProgram

ROWS_PER_SIMDGROUP = 4
SIMDGROUPS_PER_THREADGROUP = 2
MAX_X_ROWS = 4
SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
SUPPORTED_DTYPES = (mx.float32, mx.float16, mx.bfloat16)

_HEAD = """
  constexpr int WORDS = 2;
  constexpr int PER_WORD = 32 / BITS;
  constexpr int VPT = WORDS * PER_WORD;
  constexpr int ROWS = 4;
  constexpr uint MASK = (1u << BITS) - 1u;
  const int lane = int(thread_index_in_simdgroup);
  const int row0 = int(thread_position_in_grid.y) * ROWS;
  const int K = dims[0];
  const int N = dims[1];
  const int64_t words_per_row = K / PER_WORD;
  const int64_t groups_per_row = K / GS;
"""

# ACCUMULATE(prefix, acc): add this step's contribution of matrix `prefix` to acc[ROWS][M].
_STEP = """
    for (int r = 0; r < ROWS; ++r) {
      const int64_t row = row0 + r;
      if (row < N) {
        const float s = static_cast<float>(PREFIX_scales[row * groups_per_row + grp]);
        const float bias = static_cast<float>(PREFIX_biases[row * groups_per_row + grp]);
        float dot[M];
        for (int m = 0; m < M; ++m) {
          dot[m] = 0.0f;
        }
        for (int wi = 0; wi < WORDS; ++wi) {
          const uint packed = PREFIX[row * words_per_row + word0 + wi];
          for (int i = 0; i < PER_WORD; ++i) {
            const float qv = float((packed >> (i * BITS)) & MASK);
            for (int m = 0; m < M; ++m) {
              dot[m] += qv * xv[m][wi * PER_WORD + i];
            }
          }
        }
        for (int m = 0; m < M; ++m) {
          ACC[r][m] += s * dot[m] + bias * xsum[m];
        }
      }
    }
"""

_LOOP_OPEN = """
  for (int k0 = lane * VPT; k0 < K; k0 += 32 * VPT) {
    float xv[M][VPT];
    float xsum[M];
    for (int m = 0; m < M; ++m) {
      xsum[m] = 0.0f;
      for (int i = 0; i < VPT; ++i) {
        xv[m][i] = static_cast<float>(x[int64_t(m) * K + k0 + i]);
        xsum[m] += xv[m][i];
      }
    }
    const int64_t word0 = k0 / PER_WORD;
    const int64_t grp = k0 / GS;
"""


def _zero(name: str) -> str:
    return (
        f"  float {name}[ROWS][M];\n"
        "  for (int r = 0; r < ROWS; ++r) {\n"
        f"    for (int m = 0; m < M; ++m) {{\n      {name}[r][m] = 0.0f;\n    }}\n  }}\n"
    )


_QMV_SOURCE = (
    _HEAD
    + _zero("acc")
    + _LOOP_OPEN
    + _STEP.replace("PREFIX", "w").replace("ACC", "acc")
    + "  }\n"
    + """
  for (int r = 0; r < ROWS; ++r) {
    for (int m = 0; m < M; ++m) {
      const float total = simd_sum(acc[r][m]);
      if (lane == 0 && row0 + r < N) {
        out[int64_t(m) * N + row0 + r] = static_cast<T>(total);
      }
    }
  }
"""
)

_SWIGLU_SOURCE = (
    _HEAD
    + _zero("acc_gate")
    + _zero("acc_up")
    + _LOOP_OPEN
    + _STEP.replace("PREFIX", "gate").replace("ACC", "acc_gate")
    + _STEP.replace("PREFIX", "up").replace("ACC", "acc_up")
    + "  }\n"
    + """
  for (int r = 0; r < ROWS; ++r) {
    for (int m = 0; m < M; ++m) {
      const float g = simd_sum(acc_gate[r][m]);
      const float u = simd_sum(acc_up[r][m]);
      if (lane == 0 && row0 + r < N) {
        // silu(g) * u = g / (1 + e^-g) * u, in float, rounded once.
        out[int64_t(m) * N + row0 + r] = static_cast<T>(g / (1.0f + metal::exp(-g)) * u);
      }
    }
  }
"""
)

QMV = KernelProgram(
    "qwen2_qmv", ["x", "w", "w_scales", "w_biases", "dims"], ["out"], _QMV_SOURCE
)
QMV_SWIGLU = KernelProgram(
    "qwen2_qmv_swiglu",
    ["x", "gate", "gate_scales", "gate_biases", "up", "up_scales", "up_biases", "dims"],
    ["out"],
    _SWIGLU_SOURCE,
)


def matvec_supported(
    x: mx.array, w: mx.array, scales: mx.array, *, group_size: int, bits: int
) -> bool:
    """Whether the kernels take these operands (the dispatch adds its own preference)."""
    if bits not in SUPPORTED_BITS or group_size not in SUPPORTED_GROUP_SIZES:
        return False
    if w.ndim != 2 or w.dtype != mx.uint32 or x.ndim < 1 or x.dtype not in SUPPORTED_DTYPES:
        return False
    k = x.shape[-1]
    if k == 0 or k % group_size or w.shape[1] * 32 // bits != k:
        return False
    if scales.shape != (w.shape[0], k // group_size):
        return False
    rows = x.size // k
    return 1 <= rows <= MAX_X_ROWS and w.shape[0] > 0


def _launch(backend: Backend, program: KernelProgram, x: mx.array, mats: list[mx.array],
            n: int, *, group_size: int, bits: int) -> mx.array:
    k = x.shape[-1]
    rows = x.size // k
    x2 = x.reshape(rows, k)
    simdgroups = math.ceil(n / ROWS_PER_SIMDGROUP)
    (out,) = program(
        backend,
        inputs=[x2, *mats, mx.array([k, n], dtype=mx.int32)],
        template=[("T", x.dtype), ("BITS", bits), ("GS", group_size), ("M", rows)],
        grid=(32, simdgroups, 1),
        threadgroup=(32, min(SIMDGROUPS_PER_THREADGROUP, simdgroups), 1),
        output_shapes=[(rows, n)],
        output_dtypes=[x.dtype],
    )
    return out.reshape(*x.shape[:-1], n)


def quantized_matvec(
    backend: Backend,
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    *,
    group_size: int,
    bits: int,
) -> mx.array:
    """x (..., K) @ dequantize(w).T with w (N, K*bits/32): (..., N) in x's dtype."""
    return _launch(backend, QMV, x, [w, scales, biases], w.shape[0],
                   group_size=group_size, bits=bits)


def quantized_swiglu_matvec(
    backend: Backend,
    x: mx.array,
    gate: tuple[mx.array, mx.array, mx.array],
    up: tuple[mx.array, mx.array, mx.array],
    *,
    group_size: int,
    bits: int,
) -> mx.array:
    """silu(x @ gate.T) * (x @ up.T) for quantized (w, scales, biases) gate and up."""
    return _launch(backend, QMV_SWIGLU, x, [*gate, *up], gate[0].shape[0],
                   group_size=group_size, bits=bits)
