"""Tests of the Metal-kernel emulator (qwen2_mlx.metal_kernels.emulator).

* Source parity: the mirror of MLX's signature writer matches, byte for byte, the source MLX
  itself generates (captured with the export trick) for a set of signatures.
* Correctness: elementwise with templates, a threadgroup-memory reduction, simd_sum, a GQA
  decode attention (7 query heads per KV head) against float64 numpy, and a 4-bit affine
  quantized matvec against mx.quantized_matmul / mx.dequantize.
* Bug finding: a missing barrier, a divergent barrier, out-of-bounds writes and reads, a
  wrong GQA head mapping, divergent collectives, the lint.
"""

from __future__ import annotations

import shutil
import sys

import mlx.core as mx
import numpy as np
import pytest

from qwen2_mlx.metal_kernels.emulator import (
    ArithmeticTrapError,
    BarrierDivergenceError,
    CompileError,
    EmulatorError,
    LintError,
    OutOfBoundsError,
    ResourceLimitError,
    emulated_metal_kernel,
    generate_source,
    mlx_reference_source,
)

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or shutil.which("g++") is None,
    reason="the emulator runtime is Linux-only and needs g++",
)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# Source parity with MLX
# ---------------------------------------------------------------------------------------------

_ATTR_BODY = "  uint i = thread_position_in_grid.x;\n  out[i] = 0;\n"

PARITY_CASES = {
    "scalars": dict(
        input_names=["a", "s", "f", "n", "b"],
        source="  out[0] = a[0] + s + f + n + b;\n",
        inputs=[mx.zeros((16,)), mx.array(2.0), 1.5, 3, True],
        output_dtypes=[mx.float32],
    ),
    "constant_vs_device": dict(
        input_names=["one", "seven", "eight"],
        source="  out[thread_position_in_grid.x] = one[0] + seven[6] + eight[7];\n",
        inputs=[mx.zeros((1,)), mx.zeros((7,), mx.int32), mx.zeros((2, 4), mx.float16)],
        output_dtypes=[mx.float32],
    ),
    "shape_strides_ndim": dict(
        input_names=["x", "y", "z", "s"],
        source=(
            "  // s_shape is mentioned but s is 0-d\n"
            "  out[0] = x_shape[0] + x_strides[1] + x_ndim + y_ndim + z_strides[0] + s;\n"
        ),
        inputs=[mx.zeros((3, 5)), mx.zeros((9,)), mx.zeros((2, 2, 2)), mx.array(1, mx.int32)],
        output_dtypes=[mx.float32],
    ),
    "attributes": dict(
        input_names=["x"],
        source=(
            "  // a comment naming grid_size adds a parameter\n"
            "  uint3 a = dispatch_threads_per_threadgroup + threadgroup_position_in_grid;\n"
            "  uint b = simdgroup_index_in_threadgroup + thread_index_in_simdgroup\n"
            "      + quadgroup_index_in_threadgroup + thread_execution_width;\n"
            "  out[a.x + b] = x[0];\n"
        ),
        inputs=[mx.zeros((8,))],
        output_dtypes=[mx.float32],
    ),
    "templates": dict(
        input_names=["x"],
        source=_ATTR_BODY,
        inputs=[mx.zeros((32,), mx.bfloat16)],
        output_dtypes=[mx.float16],
        template=[
            ("T", mx.bfloat16),
            ("N", -3),
            ("B", True),
            ("C", False),
            ("U", mx.uint8),
            ("M", 4096),
        ],
        header="#include <metal_stdlib>\nconstant int K = 4;\n",
    ),
    "two_outputs": dict(
        input_names=["x"],
        output_names=["out", "out2"],
        source="  uint i = thread_position_in_grid.x;\n  out[i] = x_shape[0];\n  out2[i] = 1;\n",
        inputs=[mx.zeros((64,), mx.int8)],
        output_dtypes=[mx.float32, mx.int32],
    ),
    "atomic_outputs": dict(
        input_names=["x"],
        source=(
            "  atomic_fetch_add_explicit(&out[0], x[thread_position_in_grid.x], "
            "memory_order_relaxed);\n"
        ),
        inputs=[mx.zeros((64,))],
        output_dtypes=[mx.float32],
        atomic_outputs=True,
    ),
    "dtypes": dict(
        input_names=["a", "b", "c", "d", "e", "f", "g"],
        source=_ATTR_BODY,
        inputs=[
            mx.zeros((8,), mx.float16),
            mx.zeros((8,), mx.uint32),
            mx.zeros((8,), mx.int64),
            mx.zeros((8,), mx.bool_),
            mx.zeros((8,), mx.complex64),
            mx.zeros((8,), mx.uint16),
            mx.zeros((8,), mx.int16),
        ],
        output_dtypes=[mx.uint64],
    ),
    "header_without_newline": dict(
        input_names=["x"],
        source=_ATTR_BODY,
        header="constant float Z = 1.0f;",
        inputs=[mx.zeros((8,))],
        output_dtypes=[mx.float32],
        template=[("T", mx.float32)],
    ),
    # MLX 0.32 trap: 2 outputs + a shape buffer + no attribute -> `) {` after the first output.
    "invalid_signature_trap": dict(
        input_names=["x"],
        output_names=["out", "out2"],
        source="  out[0] = x_shape[0];\n  out2[0] = 1;\n",
        inputs=[mx.zeros((8,))],
        output_dtypes=[mx.float32, mx.float32],
    ),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_source_is_byte_identical_to_mlx(case: str) -> None:
    spec = dict(PARITY_CASES[case])
    output_names = spec.pop("output_names", ["out"])
    kwargs = dict(
        name=f"parity_{case}",
        input_names=spec["input_names"],
        output_names=output_names,
        source=spec["source"],
        header=spec.get("header", ""),
        atomic_outputs=spec.get("atomic_outputs", False),
        inputs=spec["inputs"],
        output_dtypes=spec["output_dtypes"],
        template=spec.get("template"),
    )
    ours = generate_source(**kwargs)
    theirs = mlx_reference_source(
        **kwargs, output_shapes=[(8,)] * len(output_names), grid=(32, 1, 1), threadgroup=(32, 1, 1)
    )
    assert ours == theirs


def test_verbose_prints_the_generated_source(capsys: pytest.CaptureFixture[str]) -> None:
    source = "  out[thread_position_in_grid.x] = x[thread_position_in_grid.x];\n"
    kernel = emulated_metal_kernel("verbose_copy", ["x"], ["out"], source)
    x = mx.arange(8).astype(mx.float32)
    kernel(
        inputs=[x],
        grid=(8, 1, 1),
        threadgroup=(8, 1, 1),
        output_shapes=[(8,)],
        output_dtypes=[mx.float32],
        verbose=True,
    )
    expected = generate_source(
        "verbose_copy", ["x"], ["out"], source, inputs=[x], output_dtypes=[mx.float32]
    )
    assert (
        capsys.readouterr().out
        == f"Generated source code for `verbose_copy`:\n```\n{expected}\n```\n"
    )


def test_invalid_mlx_signature_is_reported_before_compiling() -> None:
    spec = PARITY_CASES["invalid_signature_trap"]
    kernel = emulated_metal_kernel("trap", ["x"], ["out", "out2"], spec["source"])
    with pytest.raises(EmulatorError, match="invalid signature"):
        kernel(
            inputs=[mx.zeros((8,))],
            grid=(1, 1, 1),
            threadgroup=(1, 1, 1),
            output_shapes=[(1,), (1,)],
            output_dtypes=[mx.float32, mx.float32],
        )


# ---------------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------------

ELEMENTWISE = """
  uint i = thread_position_in_grid.x;
  if (i >= n) {
    return;
  }
  float v = static_cast<float>(x[i]) * scale;
  if (SQUARE) {
    v = v * v;
  }
  out[i] = static_cast<T>(v + OFFSET);
"""


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_elementwise_with_templates_and_partial_threadgroups(dtype: mx.Dtype) -> None:
    kernel = emulated_metal_kernel("scale_square", ["x", "n", "scale"], ["out"], ELEMENTWISE)
    x = mx.array(rng().standard_normal(100).astype(np.float32)).astype(dtype)
    (out,) = kernel(
        inputs=[x, 100, 0.5],
        template=[("T", dtype), ("SQUARE", True), ("OFFSET", 3)],
        grid=(100, 1, 1),  # not a multiple of 32: the edge threadgroup is partial
        threadgroup=(32, 1, 1),
        output_shapes=[(100,)],
        output_dtypes=[dtype],
    )
    assert out.dtype == dtype
    # Reference: the same float32 computation, rounded once to the output dtype by MLX.
    v = np.array(x.astype(mx.float32), dtype=np.float32) * np.float32(0.5)
    expected = mx.array(v * v + np.float32(3)).astype(dtype)
    np.testing.assert_array_equal(
        np.array(out.astype(mx.float32)), np.array(expected.astype(mx.float32))
    )


def test_vector_types_loads_and_swizzles() -> None:
    source = """
  uint i = thread_position_in_grid.x;
  const device float4* x4 = reinterpret_cast<const device float4*>(x);
  float4 v = x4[i] * 2.0f + float4(1.0f);
  half4 h = half4(v);
  float3 s = v.zyx;
  out[i] = dot(float4(h), float4(1.0f)) + s.x - s.z + metal::max(v, float4(0.0f)).w;
"""
    kernel = emulated_metal_kernel("vectors", ["x"], ["out"], source)
    x = rng(6).standard_normal(32).astype(np.float32)
    (out,) = kernel(
        inputs=[mx.array(x)],
        grid=(8, 1, 1),
        threadgroup=(8, 1, 1),
        output_shapes=[(8,)],
        output_dtypes=[mx.float32],
    )
    v = x.reshape(8, 4) * np.float32(2) + np.float32(1)
    h = v.astype(np.float16).astype(np.float32)
    expected = h.sum(1) + v[:, 2] - v[:, 0] + np.maximum(v[:, 3], 0)
    np.testing.assert_allclose(np.array(out), expected, rtol=1e-6, atol=1e-6)


def test_bfloat16_conversion_rounds_to_nearest_even() -> None:
    source = "  uint i = thread_position_in_grid.x;\n  out[i] = static_cast<bfloat16_t>(x[i]);\n"
    kernel = emulated_metal_kernel("to_bf16", ["x"], ["out"], source)
    # Halfway cases between bfloat16 neighbours, both parities, plus specials.
    bits = np.array(
        [
            0x3F808000,
            0x3F818000,
            0x3F80C000,
            0x3F807FFF,
            0x7F7FFFFF,
            0xFF800000,
            0x00000001,
            0x80000000,
            0x7FC00001,
            0x3F800000,
        ],
        dtype=np.uint32,
    )
    x = mx.array(bits.view(np.float32))
    (out,) = kernel(
        inputs=[x],
        grid=(10, 1, 1),
        threadgroup=(10, 1, 1),
        output_shapes=[(10,)],
        output_dtypes=[mx.bfloat16],
    )
    got = np.array(out.view(mx.uint16))
    expected = np.array(x.astype(mx.bfloat16).view(mx.uint16))
    np.testing.assert_array_equal(got[:-2], expected[:-2])
    assert got[-1] == 0x3F80
    assert (got[-2] & 0x7F80) == 0x7F80 and (got[-2] & 0x7F) != 0  # NaN stays NaN


REDUCTION = """
  threadgroup float partial[N];
  uint t = thread_index_in_threadgroup;
  uint row = threadgroup_position_in_grid.x;
  partial[t] = x[row * N + t];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint stride = N / 2; stride > 0; stride /= 2) {
    if (t < stride) {
      partial[t] += partial[t + stride];
    }
    BARRIER
  }
  if (t == 0) {
    out[row] = partial[0];
  }
"""
_BARRIER = "threadgroup_barrier(mem_flags::mem_threadgroup);"


def _run_reduction(source: str, x: mx.array, seed: int | None) -> np.ndarray:
    kernel = emulated_metal_kernel("tg_reduce", ["x"], ["out"], source)
    rows = x.shape[0] // 128
    (out,) = kernel(
        inputs=[x],
        template=[("N", 128)],
        grid=(x.shape[0], 1, 1),
        threadgroup=(128, 1, 1),
        output_shapes=[(rows,)],
        output_dtypes=[mx.float32],
        seed=seed,
    )
    return np.array(out)


@pytest.mark.parametrize("seed", [None, 0, 1])
def test_threadgroup_memory_reduction(seed: int | None) -> None:
    x = rng(1).standard_normal(4 * 128).astype(np.float32)
    got = _run_reduction(REDUCTION.replace("BARRIER", _BARRIER), mx.array(x), seed)
    np.testing.assert_allclose(
        got, x.reshape(4, 128).astype(np.float64).sum(1), rtol=1e-5, atol=1e-5
    )


SIMD_SUM = """
  uint i = thread_position_in_grid.x;
  float total = simd_sum(x[i]);
  float before = simd_prefix_exclusive_sum(x[i]);
  float top = simd_max(x[i]);
  float next = simd_shuffle_down(x[i], 1);
  if (thread_index_in_simdgroup == 0) {
    sums[i / 32] = total;
    maxs[i / 32] = top;
  }
  prefix[i] = before;
  down[i] = next;
"""


def test_simd_collectives_over_full_and_partial_simdgroups() -> None:
    kernel = emulated_metal_kernel("simd_ops", ["x"], ["sums", "maxs", "prefix", "down"], SIMD_SUM)
    n = 100  # threadgroups of 64: the second has 36 threads, i.e. simdgroups of 32 and 4 lanes
    x = rng(2).standard_normal(n).astype(np.float32)
    sums, maxs, prefix, down = kernel(
        inputs=[mx.array(x)],
        grid=(n, 1, 1),
        threadgroup=(64, 1, 1),
        output_shapes=[(4,), (4,), (n,), (n,)],
        output_dtypes=[mx.float32] * 4,
    )
    groups = [x[s : s + 32] for s in range(0, n, 32)]
    np.testing.assert_allclose(
        np.array(sums), [g.astype(np.float64).sum() for g in groups], rtol=1e-5
    )
    np.testing.assert_array_equal(np.array(maxs), [g.max() for g in groups])
    excl = np.concatenate(
        [np.concatenate([[0.0], np.cumsum(g.astype(np.float64))[:-1]]) for g in groups]
    )
    np.testing.assert_allclose(np.array(prefix), excl, rtol=1e-5, atol=1e-5)
    down = np.array(down)
    for s in range(0, n, 32):
        g = x[s : s + 32]
        np.testing.assert_array_equal(down[s : s + len(g) - 1], g[1:])
        if len(g) == 32:
            assert down[s + 31] == g[31]  # shifting past lane 31 keeps the lane's own value
        else:
            assert np.isnan(down[s + len(g) - 1])  # reading an inactive lane yields poison


GQA_DECODE = """
  // One threadgroup per query head; NSG simdgroups split the keys, each with an online
  // softmax; the partial results are merged through threadgroup memory.
  constexpr int PER = D / 32;
  const uint head = threadgroup_position_in_grid.y;
  const uint sg = simdgroup_index_in_threadgroup;
  const uint lane = thread_index_in_simdgroup;
  const uint n_kv = threadgroups_per_grid.y / G;
  const uint kv = KV_HEAD;
  const int S = k_shape[1];

  float qv[PER];
  for (int j = 0; j < PER; ++j) {
    qv[j] = static_cast<float>(q[head * D + lane * PER + j]) * scale;
  }
  float m = -metal::numeric_limits<float>::infinity();
  float l = 0.0f;
  float acc[PER];
  for (int j = 0; j < PER; ++j) {
    acc[j] = 0.0f;
  }
  for (int i = sg; i < S; i += NSG) {
    const device T* kr = k + (kv * S + i) * D + lane * PER;
    const device T* vr = v + (kv * S + i) * D + lane * PER;
    float s = 0.0f;
    for (int j = 0; j < PER; ++j) {
      s += qv[j] * static_cast<float>(kr[j]);
    }
    s = simd_sum(s);
    float m_new = metal::max(m, s);
    float c = metal::fast::exp(m - m_new);
    float p = metal::fast::exp(s - m_new);
    l = l * c + p;
    for (int j = 0; j < PER; ++j) {
      acc[j] = acc[j] * c + p * static_cast<float>(vr[j]);
    }
    m = m_new;
  }
  threadgroup float tg_m[NSG];
  threadgroup float tg_l[NSG];
  threadgroup float tg_o[NSG * D];
  if (lane == 0) {
    tg_m[sg] = m;
    tg_l[sg] = l;
  }
  for (int j = 0; j < PER; ++j) {
    tg_o[sg * D + lane * PER + j] = acc[j];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint t = thread_index_in_threadgroup;
  if (t < D) {
    float M = -metal::numeric_limits<float>::infinity();
    for (int g = 0; g < NSG; ++g) {
      M = metal::max(M, tg_m[g]);
    }
    float L = 0.0f;
    float o = 0.0f;
    for (int g = 0; g < NSG; ++g) {
      float c = metal::isinf(tg_m[g]) ? 0.0f : metal::exp(tg_m[g] - M);
      L += tg_l[g] * c;
      o += tg_o[g * D + t] * c;
    }
    out[head * D + t] = static_cast<T>(o / L);
  }
"""


def _gqa_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, g: int) -> np.ndarray:
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    out = np.empty_like(q)
    for h in range(q.shape[0]):
        s = k[h // g] @ q[h] * scale
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ v[h // g]
    return out


def _run_gqa(kv_head_expr: str, dtype: mx.Dtype, nsg: int, seed: int | None = None):
    n_kv, g, d, s = 2, 7, 64, 37  # 14 query heads, 7 per KV head (Qwen2-0.5B/7B GQA)
    r = rng(3)
    q = r.standard_normal((n_kv * g, d)).astype(np.float32)
    k = r.standard_normal((n_kv, s, d)).astype(np.float32)
    v = r.standard_normal((n_kv, s, d)).astype(np.float32)
    scale = d**-0.5
    kernel = emulated_metal_kernel(
        "gqa_decode", ["q", "k", "v", "scale"], ["out"], GQA_DECODE.replace("KV_HEAD", kv_head_expr)
    )
    (out,) = kernel(
        inputs=[
            mx.array(q).astype(dtype),
            mx.array(k).astype(dtype),
            mx.array(v).astype(dtype),
            scale,
        ],
        template=[("T", dtype), ("D", d), ("G", g), ("NSG", nsg)],
        grid=(32 * nsg, n_kv * g, 1),
        threadgroup=(32 * nsg, 1, 1),
        output_shapes=[(n_kv * g, d)],
        output_dtypes=[dtype],
        seed=seed,
    )
    cast = lambda a: np.array(mx.array(a).astype(dtype).astype(mx.float32))  # noqa: E731
    expected = _gqa_reference(cast(q), cast(k), cast(v), scale, g)
    return np.array(out.astype(mx.float32)), expected


def test_gqa_decode_attention_matches_numpy() -> None:
    got, expected = _run_gqa("head / G", mx.float32, nsg=32)  # 14 threadgroups x 1024 threads
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_gqa_decode_attention_half_precision_random_schedule() -> None:
    got, expected = _run_gqa("head / G", mx.float16, nsg=4, seed=7)
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3)


QMV_4BIT = """
  // One simdgroup per output row; lane l reads packed words l, l+32, ...
  constexpr int PACK = 8;  // 4-bit values per uint32
  const uint row = thread_position_in_grid.y;
  const uint lane = thread_index_in_simdgroup;
  const int words = K / PACK;
  const int groups = K / GS;
  float acc = 0.0f;
  for (int wi = lane; wi < words; wi += 32) {
    uint32_t packed = w[row * words + wi];
    int grp = (wi * PACK) / GS;
    float sc = static_cast<float>(scales[row * groups + grp]);
    float bi = static_cast<float>(biases[row * groups + grp]);
    for (int j = 0; j < PACK; ++j) {
      float qv = static_cast<float>((packed >> (4 * j)) & 0xfu);
      acc += static_cast<float>(x[wi * PACK + j]) * (sc * qv + bi);
    }
  }
  acc = simd_sum(acc);
  if (lane == 0 && row < N) {
    out[row] = static_cast<T>(acc);
  }
"""


def test_4bit_affine_quantized_matvec_matches_mlx() -> None:
    n, k, gs = 40, 896, 64  # K = 896: Qwen2-0.5B's hidden size, not a multiple of 512
    r = rng(4)
    w = mx.array(r.standard_normal((n, k)).astype(np.float32))
    x = mx.array(r.standard_normal(k).astype(np.float32))
    wq, scales, biases = mx.quantize(w, group_size=gs, bits=4)
    kernel = emulated_metal_kernel("qmv4", ["x", "w", "scales", "biases"], ["out"], QMV_4BIT)
    (out,) = kernel(
        inputs=[x, wq, scales, biases],
        template=[("T", mx.float32), ("K", k), ("N", n), ("GS", gs)],
        grid=(32, n, 1),
        threadgroup=(32, 2, 1),
        output_shapes=[(n,)],
        output_dtypes=[mx.float32],
    )
    dequant = np.array(mx.dequantize(wq, scales, biases, group_size=gs, bits=4), dtype=np.float64)
    np.testing.assert_allclose(
        np.array(out), dequant @ np.array(x, dtype=np.float64), rtol=1e-4, atol=1e-4
    )
    ref = mx.quantized_matmul(x[None], wq, scales, biases, transpose=True, group_size=gs, bits=4)
    np.testing.assert_allclose(np.array(out), np.array(ref[0]), rtol=1e-4, atol=1e-4)


def test_atomic_outputs_and_init_value() -> None:
    source = """
  uint i = thread_position_in_grid.x;
  atomic_fetch_add_explicit(&total[i % 4], x[i], memory_order_relaxed);
"""
    kernel = emulated_metal_kernel("atomic_sum", ["x"], ["total"], source, atomic_outputs=True)
    x = rng(5).integers(0, 10, 256).astype(np.int32)
    (out,) = kernel(
        inputs=[mx.array(x)],
        grid=(256, 1, 1),
        threadgroup=(64, 1, 1),
        output_shapes=[(4,)],
        output_dtypes=[mx.int32],
        init_value=0,
        seed=3,
    )
    np.testing.assert_array_equal(np.array(out), x.reshape(-1, 4).sum(0))


def test_dispatch_attributes_follow_mlx_dispatch() -> None:
    source = """
  uint3 p = thread_position_in_grid;
  uint i = p.x + threads_per_grid.x * (p.y + threads_per_grid.y * p.z);
  out[i * 4 + 0] = thread_index_in_threadgroup;
  out[i * 4 + 1] = threads_per_threadgroup.x * 100 + threads_per_threadgroup.y;
  out[i * 4 + 2] = threadgroups_per_grid.x * 100 + threadgroups_per_grid.y;
  out[i * 4 + 3] = dispatch_threads_per_threadgroup.x * 100 + simdgroups_per_threadgroup;
"""
    kernel = emulated_metal_kernel("attrs", [], ["out"], source)
    (out,) = kernel(
        inputs=[],
        grid=(5, 3, 1),
        threadgroup=(4, 2, 8),
        output_shapes=[(15, 4)],
        output_dtypes=[mx.uint32],
    )
    out = np.array(out)
    for y in range(3):
        for x in range(5):
            tx, ty = (4 if x < 4 else 1), (2 if y < 2 else 1)  # partial edge threadgroups
            lin = (x % 4) + (y % 2) * tx
            assert list(out[x + 5 * y]) == [lin, tx * 100 + ty, 2 * 100 + 2, 4 * 100 + 1]


def test_non_contiguous_input_keeps_its_strides() -> None:
    source = """
  uint i = thread_position_in_grid.x;
  uint j = thread_position_in_grid.y;
  out[j * 3 + i] = x[j * x_strides[0] + i * x_strides[1]];
"""
    base = mx.arange(12).reshape(3, 4).astype(mx.float32)
    xt = base.T[:, :3]  # shape (4, 3), column-major view
    for contiguous in (True, False):
        kernel = emulated_metal_kernel(
            "strided", ["x"], ["out"], source, ensure_row_contiguous=contiguous
        )
        (out,) = kernel(
            inputs=[xt],
            grid=(3, 4, 1),
            threadgroup=(3, 4, 1),
            output_shapes=[(4, 3)],
            output_dtypes=[mx.float32],
        )
        np.testing.assert_array_equal(np.array(out), np.array(xt))


def test_compiled_kernels_are_cached() -> None:
    source = "  out[thread_position_in_grid.x] = 1.0f;\n"
    first = emulated_metal_kernel("cached_fill", [], ["out"], source)
    second = emulated_metal_kernel("cached_fill", [], ["out"], source)
    for kernel in (first, second):
        kernel(
            inputs=[],
            grid=(4, 1, 1),
            threadgroup=(4, 1, 1),
            output_shapes=[(4,)],
            output_dtypes=[mx.float32],
        )
    assert second.last_compiled is first.last_compiled
    assert first.last_compiled.path.exists()


# ---------------------------------------------------------------------------------------------
# Bug finding
# ---------------------------------------------------------------------------------------------


def test_missing_barrier_gives_wrong_results_under_random_schedules() -> None:
    x = rng(1).standard_normal(4 * 128).astype(np.float32)
    expected = x.reshape(4, 128).astype(np.float64).sum(1)
    source = REDUCTION.replace("BARRIER", "")
    wrong = [
        not np.allclose(_run_reduction(source, mx.array(x), seed), expected, rtol=1e-4)
        for seed in (1, 2, 3)
    ]
    assert all(wrong)


def test_missing_barrier_reads_poisoned_threadgroup_memory() -> None:
    source = """
  threadgroup float buf[64];
  uint t = thread_index_in_threadgroup;
  buf[t] = x[t];
  // missing threadgroup_barrier: the neighbour's value may not be written yet
  out[t] = buf[(t + 1) % 64];
"""
    kernel = emulated_metal_kernel("no_barrier", ["x"], ["out"], source)
    x = mx.arange(64).astype(mx.float32)
    (out,) = kernel(
        inputs=[x],
        grid=(64, 1, 1),
        threadgroup=(64, 1, 1),
        output_shapes=[(64,)],
        output_dtypes=[mx.float32],
    )
    assert np.isnan(np.array(out)).sum() >= 32


def test_unwritten_outputs_are_poisoned() -> None:
    source = "  uint i = thread_position_in_grid.x;\n  if (i % 2 == 0) out[i] = 1.0f;\n"
    kernel = emulated_metal_kernel("half_written", [], ["out"], source)
    (out,) = kernel(
        inputs=[],
        grid=(8, 1, 1),
        threadgroup=(8, 1, 1),
        output_shapes=[(8,)],
        output_dtypes=[mx.float32],
    )
    assert np.isnan(np.array(out)[1::2]).all()
    (out,) = kernel(
        inputs=[],
        grid=(8, 1, 1),
        threadgroup=(8, 1, 1),
        output_shapes=[(8,)],
        output_dtypes=[mx.float32],
        init_value=0.0,
    )
    np.testing.assert_array_equal(np.array(out), [1, 0] * 4)


def test_barrier_not_reached_by_all_threads_names_the_line() -> None:
    source = """
  uint t = thread_position_in_grid.x;
  if (t >= 40) {
    return;
  }
  out[t] = x[t];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[t] += 1.0f;
"""
    kernel = emulated_metal_kernel("early_return", ["x"], ["out"], source)
    with pytest.raises(BarrierDivergenceError) as info:
        kernel(
            inputs=[mx.zeros((64,))],
            grid=(64, 1, 1),
            threadgroup=(64, 1, 1),
            output_shapes=[(64,)],
            output_dtypes=[mx.float32],
        )
    message = str(info.value)
    assert "early_return.source.metal:7" in message
    assert "threadgroup_barrier(mem_flags::mem_threadgroup);" in message
    assert "40 of 64" in message


def test_divergent_barriers_and_collectives_are_errors() -> None:
    barriers = """
  uint t = thread_position_in_grid.x;
  if (t % 2 == 0) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  } else {
    threadgroup_barrier(mem_flags::mem_device);
  }
  out[t] = 0.0f;
"""
    kernel = emulated_metal_kernel("two_barriers", [], ["out"], barriers)
    with pytest.raises(BarrierDivergenceError, match=r"two_barriers.source.metal:4.*:6"):
        kernel(
            inputs=[],
            grid=(32, 1, 1),
            threadgroup=(32, 1, 1),
            output_shapes=[(32,)],
            output_dtypes=[mx.float32],
        )
    collectives = """
  uint t = thread_position_in_grid.x;
  float v = t < 8 ? simd_sum(1.0f) : simd_max(1.0f);
  out[t] = v;
"""
    kernel = emulated_metal_kernel("two_collectives", [], ["out"], collectives)
    with pytest.raises(BarrierDivergenceError, match="simd_sum.*simd_max|simd_max.*simd_sum"):
        kernel(
            inputs=[],
            grid=(32, 1, 1),
            threadgroup=(32, 1, 1),
            output_shapes=[(32,)],
            output_dtypes=[mx.float32],
        )


def test_deadlock_between_barrier_and_collective_is_reported() -> None:
    source = """
  uint t = thread_position_in_grid.x;
  if (t < 16) {
    out[t] = simd_sum(1.0f);
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[t] = 0.0f;
  }
"""
    kernel = emulated_metal_kernel("deadlock", [], ["out"], source)
    with pytest.raises(BarrierDivergenceError, match=r"deadlock.*:6.*simd_sum.*:4"):
        kernel(
            inputs=[],
            grid=(32, 1, 1),
            threadgroup=(32, 1, 1),
            output_shapes=[(32,)],
            output_dtypes=[mx.float32],
        )


def test_integer_division_by_zero_and_stack_overflow_are_reported() -> None:
    common = dict(
        inputs=[],
        grid=(8, 1, 1),
        threadgroup=(8, 1, 1),
        output_shapes=[(8,)],
        output_dtypes=[mx.int32],
    )
    divide = emulated_metal_kernel(
        "divide", [], ["out"], "  int t = thread_position_in_grid.x;\n  out[t] = 12 / (t - 3);\n"
    )
    with pytest.raises(ArithmeticTrapError, match=r"\(3, 0, 0\).*divide.source.metal:2"):
        divide(**common)
    header = "inline int depth(int n) { volatile int pad[64]; pad[n % 64] = n; "
    header += "return n < 0 ? 0 : depth(n + 1) + pad[0]; }\n"
    recursive = emulated_metal_kernel(
        "recursive",
        [],
        ["out"],
        "  out[thread_position_in_grid.x] = depth(0);\n",
        header,
        lint=False,  # the lint would reject the recursion before it runs
    )
    with pytest.raises(OutOfBoundsError, match="stack overflow.*recursive.header.metal:1"):
        recursive(**common)


def test_collective_after_some_lanes_returned_uses_the_active_lanes() -> None:
    source = """
  uint t = thread_position_in_grid.x;
  if (t >= 20) {
    return;
  }
  out[t] = simd_sum(1.0f);
"""
    kernel = emulated_metal_kernel("active_lanes", [], ["out"], source)
    (out,) = kernel(
        inputs=[],
        grid=(32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(20,)],
        output_dtypes=[mx.float32],
    )
    np.testing.assert_array_equal(np.array(out), np.full(20, 20.0))


def test_out_of_bounds_write_names_buffer_thread_and_line() -> None:
    source = """
  uint i = thread_position_in_grid.x;
  out[i] = x[i] * 2.0f;
"""
    kernel = emulated_metal_kernel("oob_write", ["x"], ["out"], source)
    with pytest.raises(OutOfBoundsError) as info:
        kernel(
            inputs=[mx.zeros((64,))],
            grid=(64, 1, 1),
            threadgroup=(32, 1, 1),
            output_shapes=[(48,)],
            output_dtypes=[mx.float32],
        )
    message = str(info.value)
    assert "write of buffer 'out' at element 48" in message
    assert "(48, 0, 0)" in message
    assert "oob_write.source.metal:3" in message


def test_out_of_bounds_read_and_slack_write_are_caught() -> None:
    source = "  uint i = thread_position_in_grid.x;\n  out[i] = x[i + 1];\n"
    kernel = emulated_metal_kernel("oob_read", ["x"], ["out"], source)
    with pytest.raises(OutOfBoundsError, match="read of buffer 'x' at element 64"):
        kernel(
            inputs=[mx.zeros((64,))],
            grid=(64, 1, 1),
            threadgroup=(64, 1, 1),
            output_shapes=[(64,)],
            output_dtypes=[mx.float32],
        )
    # 62 floats do not fill a 16-byte multiple: the overrun lands in padding, found afterwards.
    copy = emulated_metal_kernel(
        "oob_slack", [], ["out"], "  out[thread_position_in_grid.x] = 0;\n"
    )
    with pytest.raises(OutOfBoundsError, match="buffer 'out' at element 62"):
        copy(
            inputs=[],
            grid=(64, 1, 1),
            threadgroup=(64, 1, 1),
            output_shapes=[(62,)],
            output_dtypes=[mx.float32],
        )


def test_threadgroup_array_overflow_and_memory_limit() -> None:
    source = """
  threadgroup float buf[32];
  buf[thread_index_in_threadgroup] = 1.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[thread_position_in_grid.x] = buf[0];
"""
    kernel = emulated_metal_kernel("tg_overflow", [], ["out"], source)
    with pytest.raises(OutOfBoundsError, match="threadgroup array 'buf'"):
        kernel(
            inputs=[],
            grid=(64, 1, 1),
            threadgroup=(64, 1, 1),
            output_shapes=[(64,)],
            output_dtypes=[mx.float32],
        )
    big = emulated_metal_kernel(
        "tg_big",
        [],
        ["out"],
        "  threadgroup float a[8192];\n  threadgroup float b[8];\n"
        "  a[0] = 0; b[0] = 0; out[thread_position_in_grid.x] = a[0];\n",
    )
    with pytest.raises(ResourceLimitError, match="32768"):
        big(
            inputs=[],
            grid=(1, 1, 1),
            threadgroup=(1, 1, 1),
            output_shapes=[(1,)],
            output_dtypes=[mx.float32],
        )


def test_wrong_gqa_head_mapping_is_caught() -> None:
    # Interleaved mapping (head % n_kv) instead of grouped (head / G): a classic GQA bug.
    got, expected = _run_gqa("head % n_kv", mx.float32, nsg=4)
    assert not np.allclose(got, expected, rtol=1e-3, atol=1e-3)


def test_threadgroup_larger_than_1024_is_rejected() -> None:
    kernel = emulated_metal_kernel("too_big", [], ["out"], "  out[0] = 0;\n")
    with pytest.raises(ResourceLimitError, match="2048"):
        kernel(
            inputs=[],
            grid=(2048, 1, 1),
            threadgroup=(2048, 1, 1),
            output_shapes=[(1,)],
            output_dtypes=[mx.float32],
        )


@pytest.mark.parametrize(
    "source, header, pattern",
    [
        ("  double d = 1.0;\n  out[0] = d;\n", "", "double"),
        ("  out[0] = std::max(1.0f, 2.0f);\n", "", "std::"),
        ('  printf("x");\n', "", "console"),
        ("  out[0] = 0.0f; // caf\u00e9\n", "", "non-ASCII"),
        ("  __syncthreads();\n", "", "CUDA"),
        (
            "  out[0] = fact(3);\n",
            "inline int fact(int n) { return n < 2 ? 1 : n * fact(n - 1); }\n",
            "recursion",
        ),
    ],
)
def test_lint_rejects_non_metal_constructs(source: str, header: str, pattern: str) -> None:
    with pytest.raises(LintError, match=pattern):
        emulated_metal_kernel("linted", [], ["out"], source, header)


def test_lint_ignores_comments_and_float64_inputs_are_rejected() -> None:
    kernel = emulated_metal_kernel(
        "comment_ok", ["x"], ["out"], "  // not a double, no std:: here\n  out[0] = x[0];\n"
    )
    with pytest.raises(LintError, match="float64"):
        kernel(
            inputs=[mx.zeros((2,), mx.float64)],
            grid=(1, 1, 1),
            threadgroup=(1, 1, 1),
            output_shapes=[(1,)],
            output_dtypes=[mx.float32],
        )


def test_compile_errors_point_at_the_source_line() -> None:
    kernel = emulated_metal_kernel("broken", [], ["out"], "  out[0] = 1.0f;\n  out[1] = nope;\n")
    with pytest.raises(CompileError, match=r"broken.source.metal:2"):
        kernel(
            inputs=[],
            grid=(1, 1, 1),
            threadgroup=(1, 1, 1),
            output_shapes=[(2,)],
            output_dtypes=[mx.float32],
        )


def test_bad_arguments_raise_clear_errors() -> None:
    kernel = emulated_metal_kernel("args", ["x"], ["out"], "  out[0] = x[0];\n")
    common = dict(
        grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)], output_dtypes=[mx.float32]
    )
    with pytest.raises(ValueError, match="`inputs` to have size 1"):
        kernel(inputs=[], **common)
    with pytest.raises(ValueError, match="template argument"):
        kernel(inputs=[mx.zeros((1,))], template=[("T", 1.5)], **common)
    with pytest.raises(ValueError, match="grid"):
        kernel(inputs=[mx.zeros((1,))], **{**common, "grid": (0, 1, 1)})
