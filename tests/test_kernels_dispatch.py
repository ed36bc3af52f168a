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

from qwen2_mlx.dca import rotation
from qwen2_mlx.metal_kernels import attention, dispatch, dual_chunk_attention, quantized
from qwen2_mlx.metal_kernels import gqa_decode as gqa_module
from qwen2_mlx.metal_kernels import quantized_matvec as qmv_module
from qwen2_mlx.metal_kernels.attention import DecodeVariant
from qwen2_mlx.metal_kernels.dispatch import (
    KernelMismatchError,
    KernelProgram,
    disabled_kernels,
    kernel_backend,
    metal_available,
    reset_kernel_state,
    resolve_backend,
    select_backend,
)
from qwen2_mlx.metal_kernels.dual_chunk_attention import DcaVariant

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
def self_checking(monkeypatch, use_kernels):
    """Kernels forced on and self-checked on this machine's backend (emulator included)."""
    use_kernels("1")
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
    assert resolve_backend() == expected


def test_bad_override_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("QWEN2_MLX_KERNELS", "maybe")
    with pytest.raises(ValueError, match="QWEN2_MLX_KERNELS must be 0, 1 or unset, got 'maybe'"):
        resolve_backend()


def test_this_machine_defaults(monkeypatch):
    monkeypatch.delenv("QWEN2_MLX_KERNELS", raising=False)
    assert resolve_backend() == ("metal" if mx.metal.is_available() else "reference")


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


def test_no_self_check_on_the_emulator_by_default(use_kernels):
    use_kernels("emulator")

    def bad(backend):
        raise AssertionError("must not run")

    assert select_backend("k3", 0, bad) == "emulator"


def test_reference_backend_never_checks(use_kernels):
    use_kernels("0")
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
        lambda b: attention._self_check(b, DecodeVariant(mx.float32, mx.float32, 64, 7, 1, 0, 0)),
        lambda b: attention._self_check(b, DecodeVariant(mx.float16, mx.float16, 128, 6, 1, 0,
                                                         0)),
        lambda b: attention._self_check(b, DecodeVariant(mx.bfloat16, mx.bfloat16, 128, 8, 1, 8,
                                                         64)),
        lambda b: attention._self_check(b, DecodeVariant(mx.float16, mx.float16, 64, 5, 1, 4,
                                                         32)),
        lambda b: quantized._self_check_matvec(b, (mx.float16, 4, 64, 1)),
        lambda b: quantized._self_check_matvec(b, (mx.bfloat16, 8, 128, 2)),
        lambda b: quantized._self_check_swiglu(b, (mx.float32, 4, 32, 1)),
        lambda b: dual_chunk_attention._self_check(b, "dca_decode", DcaVariant(
            mx.float16, mx.float16, 64, 7, 1)),
        lambda b: dual_chunk_attention._self_check(b, "dca_prefill", DcaVariant(
            mx.bfloat16, mx.bfloat16, 128, 4, 1)),
    ],
    ids=["decode-f32", "decode-f16", "decode-q8-bf16", "decode-q4-f16", "qmv-f16", "qmv-bf16",
         "swiglu-f32", "dca-decode-f16", "dca-prefill-bf16"],
)
def test_self_checks_pass_for_the_real_kernels(check):
    check(BACKEND)


# --- the backend is decided once; self-checks run at the geometry the model runs -----------


def test_backend_is_decided_once_per_process(monkeypatch, use_kernels):
    """No environment read or Metal query per dispatch: once decided, changing the variable
    (or Metal vanishing) does not change it; set_kernel_backend does."""
    use_kernels("0")
    monkeypatch.setenv("QWEN2_MLX_KERNELS", "1")

    def no_query():
        raise AssertionError("Metal queried per dispatch")

    monkeypatch.setattr(dispatch, "metal_available", no_query)
    assert kernel_backend() == "reference"
    assert select_backend("k5", 0, lambda b: None) is None
    monkeypatch.undo()
    assert dispatch.set_kernel_backend("1") == BACKEND
    assert kernel_backend() == BACKEND


def test_bad_setting_is_a_one_line_error_at_load(monkeypatch, tiny_checkpoint):
    from click.testing import CliRunner

    from qwen2_mlx import load
    from qwen2_mlx.cli.main import cli

    monkeypatch.setattr(dispatch, "_backend", None)  # as in a fresh process
    monkeypatch.setenv("QWEN2_MLX_KERNELS", "maybe")
    with pytest.raises(ValueError, match="QWEN2_MLX_KERNELS must be 0, 1 or unset, got 'maybe'"):
        load(tiny_checkpoint)
    result = CliRunner().invoke(cli, ["generate", "-m", str(tiny_checkpoint), "-p", "hi"])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: QWEN2_MLX_KERNELS must be 0, 1 or unset, got "
                                     "'maybe'")


# (q_heads, kv_heads, head_dim) of the published models: G = 7, 6, 7, 8 and 7.
PRESET_GEOMETRY = {"Qwen2-0.5B": (14, 2, 64), "Qwen2-1.5B": (12, 2, 128),
                   "Qwen2-7B": (28, 4, 128), "Qwen2-72B": (64, 8, 128),
                   "Qwen2-57B-A14B": (28, 4, 128)}


def test_preset_geometry_table_is_the_presets():
    from qwen2_mlx.presets import preset

    for name, geometry in PRESET_GEOMETRY.items():
        config = preset(name)
        assert geometry == (config.num_attention_heads, config.num_key_value_heads,
                            config.head_dim)


def _run_every_attention_kernel(q_heads: int, kv_heads: int, dim: int, dtype=mx.bfloat16):
    """Decode (float and 8-bit cache) and DCA decode/prefill (float, 8-bit decode) at one
    head geometry, through the dispatch functions the model calls."""
    r = np.random.default_rng(3)
    inv_freq = 1.0 / (10000.0 ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim))

    def normal(*shape):
        return mx.array(r.standard_normal(shape), mx.float32).astype(dtype)

    k, v = normal(1, kv_heads, 24, dim), normal(1, kv_heads, 24, dim)
    kq, vq = (mx.quantize(t, group_size=64, bits=8) for t in (k, v))
    decode, prefill = normal(1, q_heads, 1, dim), normal(1, q_heads, 3, dim)
    dca = dict(chunk_size=16, local_size=4, rotate=rotation(inv_freq), scale=dim**-0.5)
    outs = [
        attention.scaled_dot_product_attention(decode, k, v, scale=dim**-0.5),
        attention.quantized_scaled_dot_product_attention(decode, kq, vq, scale=dim**-0.5,
                                                         group_size=64, bits=8),
        dual_chunk_attention.dual_chunk_attention(decode, k, v, q_start=23, **dca),
        dual_chunk_attention.dual_chunk_attention(prefill, k, v, q_start=21, **dca),
        dual_chunk_attention.quantized_dual_chunk_attention(decode, kq, vq, q_start=23,
                                                            group_size=64, bits=8, **dca),
    ]
    mx.eval(outs)


@needs_kernels
@pytest.mark.parametrize("name", sorted(PRESET_GEOMETRY))
def test_self_checks_run_at_each_presets_geometry(self_checking, name):
    """With self-checks on (as on a Mac), every attention kernel a preset runs is checked at
    that preset's G, passes and stays on; kernel_status shows it."""
    q_heads, kv_heads, dim = PRESET_GEOMETRY[name]
    _run_every_attention_kernel(q_heads, kv_heads, dim)
    status = dispatch.kernel_status()
    assert status.backend == BACKEND
    kernels = {v.kernel for v in status.variants}
    assert kernels == {"gqa_decode", "gqa_decode_quantized", "dca_decode", "dca_prefill",
                       "dca_decode_quantized"}
    for variant in status.variants:
        assert variant.shape["group"] == q_heads // kv_heads, variant
        assert (variant.shape["q_heads"], variant.shape["kv_heads"]) == (q_heads, kv_heads)
        assert variant.self_check == "passed" and variant.enabled, variant
    assert f"group={q_heads // kv_heads}" in str(status)


@needs_kernels
def test_a_kernel_wrong_only_at_the_models_group_is_caught(monkeypatch, self_checking):
    """A decode kernel that is wrong only when G = 7 (Qwen2-0.5B: 14 query heads over 2 KV
    heads). A self-check at another G (14, as with one KV head) would pass it and leave it on;
    checked at the geometry that runs, it is switched off and the output stays right."""
    source = gqa_module.DECODE.source
    step = "acc[g][i] = acc[g][i] * rescale + weight * vr[i];"
    assert step in source
    wrong = KernelProgram(
        "qwen2_gqa_decode_wrong_at_g7", gqa_module.DECODE.input_names,
        gqa_module.DECODE.output_names,
        source.replace(step, "acc[g][i] = acc[g][i] * rescale + weight * vr[i]"
                             " * (G == 7 ? 1.5f : 1.0f);"),
        ensure_row_contiguous=False,
    )
    monkeypatch.setattr(gqa_module, "DECODE", wrong)
    # The planted bug is invisible at G = 14 ...
    attention._self_check(BACKEND, attention.DecodeVariant(mx.float32, mx.float32, 64, 14, 1,
                                                           0, 0))
    # ... and caught at the model's G = 7.
    q = mx.array(np.random.default_rng(4).standard_normal((1, 14, 1, 64)), mx.float32)
    k = mx.array(np.random.default_rng(5).standard_normal((1, 2, 30, 64)), mx.float32)
    v = mx.array(np.random.default_rng(6).standard_normal((1, 2, 30, 64)), mx.float32)
    with pytest.warns(RuntimeWarning, match="'gqa_decode' Metal kernel failed its self-check"):
        got = attention.scaled_dot_product_attention(q, k, v, scale=0.125)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125)
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-6)
    (variant,) = dispatch.kernel_status().variants
    assert variant.shape["group"] == 7 and not variant.enabled
    assert variant.self_check.startswith("failed: KernelMismatchError")
