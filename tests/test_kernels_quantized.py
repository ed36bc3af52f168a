"""Quantized matvec and fused SwiGLU kernels (metal_kernels/quantized_matvec.py), the dispatch
`quantized_matmul` / `quantized_swiglu`, and the kernel-dispatching layers.

Reference: float64 numpy on the dequantized weights (mx.dequantize). MLX's CPU
`quantized_matmul` accumulates half-precision inputs in half precision (1e-2 relative error
on K = 4864 in float16), so it only serves as the reference for float32 and for the dispatch's
fallback. K covers Qwen2's 896, 4864, 1536 and 8960 (N kept small), 4/8 bits, group sizes
32/64/128, float32/float16/bfloat16 and 1-4 rows of x.
"""

from __future__ import annotations

import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from qwen2_mlx.metal_kernels import dispatch
from qwen2_mlx.metal_kernels import quantized as quantized_module
from qwen2_mlx.metal_kernels.dispatch import metal_available
from qwen2_mlx.metal_kernels.quantized import (
    QuantizedEmbedding,
    QuantizedLinear,
    qmv_fast_takes,
    quantized_matmul,
    quantized_swiglu,
    swiglu,
    use_kernel_linears,
)
from qwen2_mlx.metal_kernels.quantized_matvec import (
    matvec_supported,
    quantized_matvec,
    quantized_swiglu_matvec,
)

BACKEND = "metal" if metal_available() else "emulator"
pytestmark = pytest.mark.skipif(
    BACKEND == "emulator" and shutil.which("g++") is None, reason="the emulator needs g++"
)
# Relative to max |y|: output rounding plus float accumulation-order differences.
RTOL = {mx.float32: 1e-5, mx.float16: 1.5e-3, mx.bfloat16: 1e-2}


def operands(rows, k, n, dtype, bits, group_size, seed=0):
    r = np.random.default_rng(seed)
    x = mx.array(r.standard_normal((rows, k)), mx.float32).astype(dtype)
    w = mx.array(r.standard_normal((n, k)), mx.float32).astype(dtype)
    return x, tuple(mx.quantize(w, group_size=group_size, bits=bits))


def exact_matmul(x, q, group_size, bits) -> np.ndarray:
    dense = np.array(mx.dequantize(*q, group_size=group_size, bits=bits).astype(mx.float32))
    return np.array(x.astype(mx.float32)).astype(np.float64) @ dense.astype(np.float64).T


def assert_rel_close(got: mx.array, expected: np.ndarray, rtol: float) -> None:
    got = np.array(got.astype(mx.float32)).astype(np.float64)
    assert got.shape == expected.shape
    err = np.abs(got - expected).max() / np.abs(expected).max()
    assert err <= rtol, f"relative error {err:.3g} > {rtol:.3g}"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("k", [896, 4864, 1536, 8960])
def test_matvec_float32_all_formats(bits, group_size, k):
    x, q = operands(1, k, 13, mx.float32, bits, group_size, seed=k + bits)
    got = quantized_matvec(BACKEND, x, *q, group_size=group_size, bits=bits)
    assert_rel_close(got, exact_matmul(x, q, group_size, bits), RTOL[mx.float32])


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("bits,group_size,k", [(4, 64, 896), (8, 128, 4864)])
def test_matvec_half_precision(dtype, bits, group_size, k):
    x, q = operands(1, k, 21, dtype, bits, group_size, seed=3)
    got = quantized_matvec(BACKEND, x, *q, group_size=group_size, bits=bits)
    assert got.dtype == dtype
    assert_rel_close(got, exact_matmul(x, q, group_size, bits), RTOL[dtype])


@pytest.mark.parametrize("rows", [2, 3, 4])
def test_matvec_several_rows_and_leading_dims(rows):
    x, q = operands(rows, 960, 9, mx.float32, 4, 32, seed=rows)  # N = 9: not a multiple of 8
    got = quantized_matvec(BACKEND, x.reshape(rows, 1, 960), *q, group_size=32, bits=4)
    assert got.shape == (rows, 1, 9)
    assert_rel_close(got.reshape(rows, 9), exact_matmul(x, q, 32, 4), RTOL[mx.float32])


@pytest.mark.parametrize(
    "dtype,bits,group_size,k", [(mx.float32, 4, 64, 896), (mx.float16, 8, 32, 4864),
                                (mx.bfloat16, 4, 128, 1536)]
)
def test_fused_swiglu(dtype, bits, group_size, k):
    x, gate = operands(1, k, 19, dtype, bits, group_size, seed=5)
    _, up = operands(1, k, 19, dtype, bits, group_size, seed=6)
    got = quantized_swiglu_matvec(BACKEND, x, gate, up, group_size=group_size, bits=bits)
    g, u = exact_matmul(x, gate, group_size, bits), exact_matmul(x, up, group_size, bits)
    assert_rel_close(got, g / (1 + np.exp(-g)) * u, RTOL[dtype])


def test_qmv_fast_rule_matches_the_reference_table():
    """metal-kernels.md §3.2: 4-bit qmv_fast needs K % 512 == 0, 8-bit K % 256 == 0."""
    assert not qmv_fast_takes(896, 4864, 4)  # Qwen2-0.5B: every projection misses
    assert not qmv_fast_takes(4864, 896, 4)
    assert qmv_fast_takes(1536, 8960, 4) and not qmv_fast_takes(8960, 1536, 4)  # 1.5B down
    assert qmv_fast_takes(4864, 896, 8) and not qmv_fast_takes(896, 4864, 8)
    assert not qmv_fast_takes(1024, 13, 4)  # N % 8 != 0


def test_matvec_supported_rejects_what_the_kernel_cannot_take():
    x, q = operands(1, 256, 8, mx.float32, 4, 64)
    assert matvec_supported(x, q[0], q[1], group_size=64, bits=4)
    assert not matvec_supported(x, q[0], q[1], group_size=64, bits=3)
    assert not matvec_supported(mx.zeros((5, 256)), q[0], q[1], group_size=64, bits=4)
    assert not matvec_supported(x.astype(mx.float64), q[0], q[1], group_size=64, bits=4)
    assert not matvec_supported(x[:, :128], q[0], q[1], group_size=64, bits=4)


# ---------------------------------------------------------------------------------------------
# Dispatch and layers
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch, use_kernels):
    """Kernels forced on; records which kernel launchers the dispatch called."""
    use_kernels("1")
    # Spies count launcher calls: keep the (separately tested) self-check out of them.
    monkeypatch.setattr(dispatch, "SELF_CHECK_BACKENDS", set())
    calls = []
    for name in ("quantized_matvec", "quantized_swiglu_matvec"):
        real = getattr(quantized_module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(quantized_module, name, spy)
    return calls


def test_dispatch_takes_the_kernel_only_where_qmv_fast_does_not(kernel_calls):
    x, q = operands(1, 896, 16, mx.float32, 4, 64, seed=7)
    got = quantized_matmul(x, *q, group_size=64, bits=4)
    assert kernel_calls == ["quantized_matvec"]
    ref = mx.quantized_matmul(x, *q, transpose=True, group_size=64, bits=4)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-5, atol=1e-4)
    x2, q2 = operands(1, 1024, 16, mx.float32, 4, 64, seed=8)  # qmv_fast shape
    quantized_matmul(x2, *q2, group_size=64, bits=4)
    x5, _ = operands(5, 896, 16, mx.float32, 4, 64)  # prefill-sized: MLX's qmm
    quantized_matmul(x5, *q, group_size=64, bits=4)
    _, qt = operands(16, 896, 16, mx.float32, 4, 64)  # w (16, 896): x (1, 16) @ w, untransposed
    quantized_matmul(mx.ones((1, 16)), *qt, group_size=64, bits=4, transpose=False)
    assert kernel_calls == ["quantized_matvec"]


def test_dispatch_reference_when_forced_off(monkeypatch, kernel_calls):
    dispatch.set_kernel_backend("0")  # the fixture restores it
    x, q = operands(1, 896, 16, mx.float32, 4, 64)
    quantized_matmul(x, *q, group_size=64, bits=4)
    quantized_swiglu(x, q, q, group_size=64, bits=4)
    assert kernel_calls == []


def test_swiglu_dispatch_fuses_and_falls_back(monkeypatch, kernel_calls):
    x, gate = operands(1, 896, 24, mx.float32, 8, 64, seed=9)
    _, up = operands(1, 896, 24, mx.float32, 8, 64, seed=10)
    fused = quantized_swiglu(x, gate, up, group_size=64, bits=8)
    assert kernel_calls == ["quantized_swiglu_matvec"]
    dispatch.set_kernel_backend("0")  # the fixture restores it
    ref = quantized_swiglu(x, gate, up, group_size=64, bits=8)
    np.testing.assert_allclose(np.array(fused), np.array(ref), rtol=1e-4, atol=1e-4)


def tiny_mlp(hidden=448, inner=320, bits=4, group_size=64):
    mlp = nn.Module()
    mlp.gate_proj = nn.Linear(hidden, inner, bias=False)
    mlp.up_proj = nn.Linear(hidden, inner, bias=False)
    mlp.down_proj = nn.Linear(inner, hidden, bias=False)
    mlp.embed = nn.Embedding(64, hidden)
    mlp.layers = [nn.Linear(hidden, 64, bias=True)]
    nn.quantize(mlp, group_size=group_size, bits=bits)
    return mlp


def test_use_kernel_linears_swaps_layers_and_keeps_outputs(monkeypatch, kernel_calls):
    mlp = tiny_mlp()
    x = mx.random.normal((1, 1, 448), key=mx.random.key(3))
    before = [mlp.gate_proj(x), mlp.layers[0](x), mlp.embed.as_linear(x), mlp.embed(mx.array([3]))]
    arrays_before = mlp.gate_proj["weight"]
    assert use_kernel_linears(mlp) is mlp
    assert type(mlp.gate_proj) is QuantizedLinear and type(mlp.layers[0]) is QuantizedLinear
    assert type(mlp.embed) is QuantizedEmbedding
    assert mlp.gate_proj["weight"] is arrays_before  # shared, not copied
    assert mlp.gate_proj.trainable_parameters() == {}  # still frozen
    after = [mlp.gate_proj(x), mlp.layers[0](x), mlp.embed.as_linear(x), mlp.embed(mx.array([3]))]
    assert kernel_calls == ["quantized_matvec"] * 3
    for b, a in zip(before, after, strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-4)
    fused = swiglu(mlp.gate_proj, mlp.up_proj, x)
    assert kernel_calls[-1] == "quantized_swiglu_matvec"
    ref = nn.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
    np.testing.assert_allclose(np.array(fused), np.array(ref), rtol=1e-4, atol=1e-4)


def test_swiglu_helper_with_plain_linears():
    gate, up = nn.Linear(8, 4, bias=False), nn.Linear(8, 4, bias=False)
    x = mx.ones((1, 8))
    np.testing.assert_allclose(np.array(swiglu(gate, up, x)),
                               np.array(nn.silu(gate(x)) * up(x)), rtol=1e-6)
