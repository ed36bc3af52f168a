"""GQA decode attention kernel (metal_kernels/gqa_decode.py) against a float64 numpy reference.

The kernel runs on Metal where MLX has it, else through the CPU emulator, so the same tests
are the kernel's parity tests on a Mac. Shapes: Qwen2's real head geometry (14/2 d64,
12/2 d128, 28/4 d128, 64/8 d128) with short caches, group sizes 1-8, cache lengths that are
not multiples of 32 or of the key block, one block and several blocks (combine pass),
float32/float16/bfloat16, 8- and 4-bit quantized caches, and strided (sliced) cache views.
"""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest

from qwen2_mlx.metal_kernels import attention as attention_module
from qwen2_mlx.metal_kernels import dispatch
from qwen2_mlx.metal_kernels.attention import (
    quantized_scaled_dot_product_attention,
    scaled_dot_product_attention,
)
from qwen2_mlx.metal_kernels.dispatch import metal_available
from qwen2_mlx.metal_kernels.gqa_decode import DECODE, default_block_keys, gqa_decode

BACKEND = "metal" if metal_available() else "emulator"
pytestmark = pytest.mark.skipif(
    BACKEND == "emulator" and shutil.which("g++") is None, reason="the emulator needs g++"
)
ATOL = {mx.float32: 2e-5, mx.float16: 3e-3, mx.bfloat16: 2e-2}

# (query heads, kv heads, head_dim): Qwen2-0.5B, 1.5B, 7B, 72B.
QWEN2_GEOMETRY = {"0.5B": (14, 2, 64), "1.5B": (12, 2, 128), "7B": (28, 4, 128),
                  "72B": (64, 8, 128)}


def as_f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def numpy_attention(q, k, v, scale: float) -> np.ndarray:
    """Softmax(q k^T * scale) v per query head, head h reading kv head h // G (float64)."""
    q, k, v = as_f64(q), as_f64(k), as_f64(v)
    batch, q_heads, q_len, _ = q.shape
    group = q_heads // k.shape[1]
    out = np.empty(q.shape[:3] + (v.shape[-1],))
    for b in range(batch):
        for h in range(q_heads):
            s = q[b, h] @ k[b, h // group].T * scale
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, h] = (p / p.sum(-1, keepdims=True)) @ v[b, h // group]
    return out


def random_qkv(batch, q_heads, kv_heads, head_dim, n_keys, dtype, seed=0, spare=0):
    """q (B, Hq, 1, D) and k/v (B, Hkv, n_keys, D); with `spare`, k/v are slices of larger
    buffers (the KV cache hands attention such strided views)."""
    r = np.random.default_rng(seed)
    q = mx.array(r.standard_normal((batch, q_heads, 1, head_dim)), mx.float32).astype(dtype)
    shape = (batch, kv_heads, n_keys + spare, head_dim)
    k = mx.array(r.standard_normal(shape), mx.float32).astype(dtype)[:, :, :n_keys]
    v = mx.array(r.standard_normal(shape), mx.float32).astype(dtype)[:, :, :n_keys]
    return q, k, v


def run_decode(q, k, v, *, block_keys=None, **kw) -> mx.array:
    batch, q_heads, _, dim = q.shape
    out = gqa_decode(BACKEND, q.reshape(batch * q_heads, 1, dim), k, v, scale=dim**-0.5,
                     out_dtype=q.dtype, block_keys=block_keys, **kw)
    return out.reshape(batch, q_heads, 1, dim)


@pytest.mark.parametrize("model", QWEN2_GEOMETRY)
@pytest.mark.parametrize("block_keys", [None, 8])
def test_qwen2_head_geometry_float32(model, block_keys):
    q_heads, kv_heads, dim = QWEN2_GEOMETRY[model]
    q, k, v = random_qkv(1, q_heads, kv_heads, dim, 37, mx.float32, seed=1, spare=5)
    got = run_decode(q, k, v, block_keys=block_keys)  # 37 keys: 1 block, or 5 (last has 5)
    np.testing.assert_allclose(as_f64(got), numpy_attention(q, k, v, dim**-0.5),
                               atol=ATOL[mx.float32], rtol=0)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("block_keys", [None, 16])
def test_half_precision_dtypes(dtype, block_keys):
    q, k, v = random_qkv(2, 14, 2, 64, 45, dtype, seed=2)
    got = run_decode(q, k, v, block_keys=block_keys)
    assert got.dtype == dtype
    np.testing.assert_allclose(as_f64(got), numpy_attention(q, k, v, 64**-0.5),
                               atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("group", [1, 2, 3, 5, 8])
def test_group_sizes(group):
    q, k, v = random_qkv(1, 2 * group, 2, 64, 33, mx.float32, seed=group)
    got = run_decode(q, k, v)
    np.testing.assert_allclose(as_f64(got), numpy_attention(q, k, v, 64**-0.5),
                               atol=ATOL[mx.float32], rtol=0)


@pytest.mark.parametrize("n_keys,block_keys", [(1, None), (31, 7), (65, 32), (100, 33)])
def test_cache_lengths_and_blocks(n_keys, block_keys):
    """Lengths that are not multiples of 32 or of the block; blocks of odd sizes."""
    q, k, v = random_qkv(1, 14, 2, 64, n_keys, mx.float32, seed=n_keys)
    got = run_decode(q, k, v, block_keys=block_keys)
    np.testing.assert_allclose(as_f64(got), numpy_attention(q, k, v, 64**-0.5),
                               atol=ATOL[mx.float32], rtol=0)


def test_default_block_policy():
    assert default_block_keys(37, 2) == 37  # short caches: one block, no combine pass
    assert default_block_keys(4096, 2) == 64
    assert default_block_keys(131072, 2) == 256  # at most 512 blocks for 2 kv heads
    for n in (1, 63, 65, 1000, 12345):
        bk = default_block_keys(n, 4)
        assert 1 <= bk <= n and -(-n // bk) <= 1024


@pytest.mark.parametrize(
    "bits,group_size,dtype,dim,block_keys",
    [(8, 64, mx.float16, 64, None), (8, 32, mx.bfloat16, 128, 16), (8, 64, mx.float32, 128, 8),
     (4, 64, mx.float16, 64, 16)],
)
def test_quantized_cache(bits, group_size, dtype, dim, block_keys):
    """The kernel reads (packed, scales, biases) directly; compare with attention on the
    dequantized cache (what the reference path computes)."""
    q, k, v = random_qkv(1, 7, 1, dim, 41, dtype, seed=bits + dim)
    kq = mx.quantize(k, group_size=group_size, bits=bits)
    vq = mx.quantize(v, group_size=group_size, bits=bits)
    # Sliced views of the triples, as QuantizedKVCache stores them in a larger buffer.
    kq = tuple(mx.concatenate([a, a[:, :, :3]], axis=2)[:, :, :41] for a in kq)
    vq = tuple(mx.concatenate([a, a[:, :, :3]], axis=2)[:, :, :41] for a in vq)
    got = run_decode(q, kq, vq, block_keys=block_keys, bits=bits, group_size=group_size)
    kd = mx.dequantize(*kq, group_size=group_size, bits=bits)
    vd = mx.dequantize(*vq, group_size=group_size, bits=bits)
    np.testing.assert_allclose(as_f64(got), numpy_attention(q, kd, vd, dim**-0.5),
                               atol=ATOL[dtype], rtol=0)


# ---------------------------------------------------------------------------------------------
# Dispatch: the model's call sites
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def kernels_on(monkeypatch, use_kernels):
    use_kernels("1")
    # Spies count launcher calls: keep the (separately tested) self-check out of them.
    monkeypatch.setattr(dispatch, "SELF_CHECK_BACKENDS", set())
    calls = []
    real = attention_module.gqa_decode

    def spy(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_module, "gqa_decode", spy)
    return calls


def test_dispatch_runs_the_kernel_for_decode(kernels_on):
    q, k, v = random_qkv(1, 14, 2, 64, 29, mx.float32, seed=9, spare=3)
    got = scaled_dot_product_attention(q, k, v, scale=0.125)
    assert kernels_on == [BACKEND]
    np.testing.assert_allclose(as_f64(got), numpy_attention(q, k, v, 0.125), atol=2e-5, rtol=0)
    # "causal" for a single query sees every key: still the kernel.
    scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
    assert len(kernels_on) == 2


def test_dispatch_falls_back_for_masks_prefill_and_odd_shapes(kernels_on):
    q, k, v = random_qkv(1, 14, 2, 64, 29, mx.float32, seed=10)
    mask = mx.arange(29)[None, :] >= 3  # a sliding window's boolean mask
    got = scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-6)
    q2 = mx.concatenate([q, q], axis=2)  # two query tokens: MLX's SDPA
    scaled_dot_product_attention(q2, k, v, scale=0.125, mask="causal")
    q16, k16, v16 = random_qkv(1, 4, 2, 16, 5, mx.float32)  # head_dim 16: no kernel
    scaled_dot_product_attention(q16, k16, v16, scale=0.25)
    assert kernels_on == []


def test_reference_runs_when_kernels_are_forced_off(monkeypatch, kernels_on):
    dispatch.set_kernel_backend("0")  # the fixture restores it
    q, k, v = random_qkv(1, 14, 2, 64, 29, mx.float32, seed=11)
    scaled_dot_product_attention(q, k, v, scale=0.125)
    assert kernels_on == []


def test_quantized_dispatch_kernel_and_reference_agree(monkeypatch, kernels_on):
    q, k, v = random_qkv(1, 12, 2, 128, 23, mx.float16, seed=12)
    kq, vq = (mx.quantize(a, group_size=64, bits=8) for a in (k, v))
    got = quantized_scaled_dot_product_attention(q, kq, vq, scale=0.09, group_size=64, bits=8)
    assert kernels_on == [BACKEND]
    dispatch.set_kernel_backend("0")  # the fixture restores it
    ref = quantized_scaled_dot_product_attention(q, kq, vq, scale=0.09, group_size=64, bits=8)
    assert ref.dtype == got.dtype == mx.float16
    np.testing.assert_allclose(as_f64(got), as_f64(ref), atol=3e-3, rtol=0)


def test_quantized_dispatch_rejects_bad_triples():
    q, k, _ = random_qkv(1, 4, 2, 64, 5, mx.float32)
    with pytest.raises(ValueError, match="triple"):
        quantized_scaled_dot_product_attention(q, k, k, scale=1.0, group_size=64, bits=8)
    with pytest.raises(ValueError, match="packed uint32"):
        quantized_scaled_dot_product_attention(q, (k, k, k), (k, k, k), scale=1.0,
                                               group_size=64, bits=8)


def test_wrong_head_mapping_would_be_caught(monkeypatch):
    """Sanity of the test itself: a kernel mapping query heads to the wrong KV head fails."""
    from qwen2_mlx.metal_kernels.dispatch import KernelProgram

    broken = KernelProgram(DECODE.name + "_broken", DECODE.input_names, DECODE.output_names,
                           DECODE.source.replace("const int64_t kvh = bh % n_kv;",
                                                 "const int64_t kvh = (bh + 1) % n_kv;"),
                           ensure_row_contiguous=False)
    monkeypatch.setattr("qwen2_mlx.metal_kernels.gqa_decode.DECODE", broken)
    q, k, v = random_qkv(1, 4, 2, 64, 9, mx.float32, seed=13)
    got = run_decode(q, k, v)
    assert np.abs(as_f64(got) - numpy_attention(q, k, v, 0.125)).max() > 1e-2
