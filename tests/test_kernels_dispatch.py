"""Run-time kernel selection (metal_kernels/dispatch.py): backends, the QWEN2_MLX_KERNELS
override, and the self-check that disables a kernel which fails to compile or disagrees with
its reference (simulated with deliberately wrong kernels), plus the self-checks themselves
passing for every real kernel (a wrong self-check would switch good kernels off on a Mac).
"""

from __future__ import annotations

import shutil
import warnings

import mlx.core as mx
import numpy as np
import pytest

from qwen2_mlx.metal_kernels import attention, dispatch, dual_chunk_attention, quantized
from qwen2_mlx.metal_kernels import gqa_decode as gqa_module
from qwen2_mlx.metal_kernels import quantized_matvec as qmv_module
from qwen2_mlx.metal_kernels.dispatch import (
    KernelMismatchError,
    KernelProgram,
    disabled_kernels,
    kernel_backend,
    metal_available,
    reset_kernel_state,
    select_backend,
)

BACKEND = "metal" if metal_available() else "emulator"
needs_kernels = pytest.mark.skipif(
    BACKEND == "emulator" and shutil.which("g++") is None, reason="the emulator needs g++"
)


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    """Self-check results are process-wide: start and end every test with none."""
    reset_kernel_state()
    yield
    reset_kernel_state()


@pytest.fixture
def self_checking(monkeypatch):
    """Kernels forced on and self-checked on this machine's backend (emulator included)."""
    monkeypatch.setenv("QWEN2_MLX_KERNELS", "1")
    monkeypatch.setattr(dispatch, "SELF_CHECK_BACKENDS", {"metal", "emulator"})


@pytest.mark.parametrize(
    "env,metal,expected",
    [(None, True, "metal"), (None, False, "reference"), ("0", True, "reference"),
     ("0", False, "reference"), ("1", True, "metal"), ("1", False, "emulator"),
     ("auto", False, "reference"), (" off ", True, "reference")],
)
def test_backend_selection(monkeypatch, env, metal, expected):
    monkeypatch.setattr(dispatch, "metal_available", lambda: metal)
    if env is None:
        monkeypatch.delenv("QWEN2_MLX_KERNELS", raising=False)
    else:
        monkeypatch.setenv("QWEN2_MLX_KERNELS", env)
    assert kernel_backend() == expected


def test_bad_override_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("QWEN2_MLX_KERNELS", "maybe")
    with pytest.raises(ValueError, match="QWEN2_MLX_KERNELS must be 0, 1 or unset, got 'maybe'"):
        kernel_backend()


def test_this_machine_defaults(monkeypatch):
    monkeypatch.delenv("QWEN2_MLX_KERNELS", raising=False)
    assert kernel_backend() == ("metal" if mx.metal.is_available() else "reference")


def test_self_check_runs_once_per_variant_and_failure_disables_the_kernel(self_checking):
    runs = []

    def good(backend):
        runs.append(backend)

    assert select_backend("k1", ("f32", 64), good) == BACKEND
    assert select_backend("k1", ("f32", 64), good) == BACKEND
    assert select_backend("k1", ("f16", 64), good) == BACKEND
    assert runs == [BACKEND, BACKEND]

    def bad(backend):
        raise KernelMismatchError("max error 3 exceeds 1e-4")

    with pytest.warns(RuntimeWarning, match="'k2' Metal kernel failed its self-check"):
        assert select_backend("k2", 1, bad) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second variant: silently the reference
        assert select_backend("k2", 2, good) is None
    assert "k2" in disabled_kernels() and "k1" not in disabled_kernels()


def test_no_self_check_on_the_emulator_by_default(monkeypatch):
    monkeypatch.setenv("QWEN2_MLX_KERNELS", "1")
    monkeypatch.setattr(dispatch, "metal_available", lambda: False)

    def bad(backend):
        raise AssertionError("must not run")

    assert select_backend("k3", 0, bad) == "emulator"


def test_reference_backend_never_checks(monkeypatch):
    monkeypatch.setenv("QWEN2_MLX_KERNELS", "0")
    assert select_backend("k4", 0, lambda b: 1 / 0) is None


def _random_decode_inputs():
    r = np.random.default_rng(0)
    q = mx.array(r.standard_normal((1, 14, 1, 64)), mx.float32)
    k = mx.array(r.standard_normal((1, 2, 21, 64)), mx.float32)
    v = mx.array(r.standard_normal((1, 2, 21, 64)), mx.float32)
    return q, k, v


@needs_kernels
def test_wrong_decode_kernel_disables_itself_and_text_stays_right(monkeypatch, self_checking):
    """A kernel that drops the last key of each block: the self-check catches it, one warning,
    and the dispatch returns the reference result from then on."""
    wrong = KernelProgram(
        "qwen2_gqa_decode_wrong", gqa_module.DECODE.input_names, gqa_module.DECODE.output_names,
        gqa_module.DECODE.source.replace("const int hi = min(lo + block_keys, n_keys);",
                                         "const int hi = min(lo + block_keys, n_keys) - 1;"),
        ensure_row_contiguous=False,
    )
    monkeypatch.setattr(gqa_module, "DECODE", wrong)
    q, k, v = _random_decode_inputs()
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125)
    with pytest.warns(RuntimeWarning, match="'gqa_decode' Metal kernel failed its self-check"):
        got = attention.scaled_dot_product_attention(q, k, v, scale=0.125)
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-6)
    assert "KernelMismatchError" in disabled_kernels()["gqa_decode"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention.scaled_dot_product_attention(q, k, v, scale=0.125)


@needs_kernels
def test_kernel_that_fails_to_compile_disables_itself(monkeypatch, self_checking):
    broken = KernelProgram("qwen2_qmv_broken", qmv_module.QMV.input_names,
                           qmv_module.QMV.output_names,
                           qmv_module.QMV.source.replace("const int K = dims[0];",
                                                         "const int K = dims[0]"))
    monkeypatch.setattr(qmv_module, "QMV", broken)
    r = np.random.default_rng(1)
    x = mx.array(r.standard_normal((1, 896)), mx.float32)
    w = mx.quantize(mx.array(r.standard_normal((16, 896)), mx.float32), group_size=64, bits=4)
    with pytest.warns(RuntimeWarning, match="'quantized_matvec' Metal kernel failed"):
        got = quantized.quantized_matmul(x, *w, group_size=64, bits=4)
    ref = mx.quantized_matmul(x, *w, transpose=True, group_size=64, bits=4)
    np.testing.assert_allclose(np.array(got), np.array(ref), atol=1e-6)


@needs_kernels
@pytest.mark.parametrize(
    "check",
    [
        lambda b: attention._self_check(b, (mx.float32, mx.float32, 64, 7, 0, 0)),
        lambda b: attention._self_check(b, (mx.float16, mx.float16, 128, 6, 0, 0)),
        lambda b: attention._self_check(b, (mx.bfloat16, mx.bfloat16, 128, 8, 8, 64)),
        lambda b: attention._self_check(b, (mx.float16, mx.float16, 64, 5, 4, 32)),
        lambda b: quantized._self_check_matvec(b, (mx.float16, 4, 64, 1)),
        lambda b: quantized._self_check_matvec(b, (mx.bfloat16, 8, 128, 2)),
        lambda b: quantized._self_check_swiglu(b, (mx.float32, 4, 32, 1)),
        lambda b: dual_chunk_attention._self_check(b, "dca_decode", (mx.float16, mx.float16,
                                                                     64, 7)),
        lambda b: dual_chunk_attention._self_check(b, "dca_prefill", (mx.bfloat16, mx.bfloat16,
                                                                      128, 4)),
    ],
    ids=["decode-f32", "decode-f16", "decode-q8-bf16", "decode-q4-f16", "qmv-f16", "qmv-bf16",
         "swiglu-f32", "dca-decode-f16", "dca-prefill-bf16"],
)
def test_self_checks_pass_for_the_real_kernels(check):
    check(BACKEND)
