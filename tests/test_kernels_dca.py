"""Dual Chunk Attention kernels (decode: gqa_decode.py with three query copies; prefill tiles:
dca_prefill.py) against the pure-MLX reference `dual_chunk_attention_reference`, itself
tested against a float64 numpy transcription of Qwen's code in test_dual_chunk_attention.py.

Geometries: Qwen2's real heads (14/2 d64, 12/2 d128, 28/4 d128, 64/8 d128) with small
chunks so that short sequences cross several chunk boundaries (intra, successive and
inter-chunk parts all present), chunked prefill (queries = the last Tq of Tk keys), strided
cache views, float32/float16/bfloat16, and a randomised thread schedule for the barriers.
"""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest

from qwen2_mlx.dca import (
    DualChunkConfig,
    dual_chunk_attention,
    dual_chunk_attention_kernel,
    dual_chunk_attention_reference,
)
from qwen2_mlx.metal_kernels import dispatch
from qwen2_mlx.metal_kernels import dual_chunk_attention as dca_module
from qwen2_mlx.metal_kernels.dca_prefill import PREFILL
from qwen2_mlx.metal_kernels.dispatch import metal_available

BACKEND = "metal" if metal_available() else "emulator"
pytestmark = pytest.mark.skipif(
    BACKEND == "emulator" and shutil.which("g++") is None, reason="the emulator needs g++"
)
ATOL = {mx.float32: 2e-5, mx.float16: 3e-3, mx.bfloat16: 2e-2}
QWEN2_GEOMETRY = {"0.5B": (14, 2, 64), "1.5B": (12, 2, 128), "7B": (28, 4, 128),
                  "72B": (64, 8, 128)}
CFG = DualChunkConfig(chunk_size=16, local_size=4, original_max_position_embeddings=8)  # L = 12


def inputs(q_heads, kv_heads, dim, q_len, k_len, dtype, seed=0, spare=0, batch=1):
    r = np.random.default_rng(seed)
    q = mx.array(r.standard_normal((batch, q_heads, q_len, dim)), mx.float32).astype(dtype)
    shape = (batch, kv_heads, k_len + spare, dim)
    k = mx.array(r.standard_normal(shape), mx.float32).astype(dtype)[:, :, :k_len]
    v = mx.array(r.standard_normal(shape), mx.float32).astype(dtype)[:, :, :k_len]
    inv_freq = 1.0 / (1e6 ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim))
    return q, k, v, inv_freq


def compare(q, k, v, inv_freq, *, cfg=CFG, temperature=1.15, block_keys=None):
    args = dict(q_start=k.shape[2] - q.shape[2], cfg=cfg, inv_freq=inv_freq,
                scale=q.shape[-1] ** -0.5, q_temperature=temperature)
    got = dual_chunk_attention_kernel(BACKEND, q, k, v, block_keys=block_keys, **args)
    f32 = mx.float32
    expected = dual_chunk_attention_reference(q.astype(f32), k.astype(f32), v.astype(f32),
                                              **args)
    assert got.dtype == q.dtype and got.shape == q.shape
    np.testing.assert_allclose(np.array(got.astype(f32)), np.array(expected),
                               atol=ATOL[q.dtype], rtol=0)


@pytest.mark.parametrize("model", QWEN2_GEOMETRY)
def test_decode_qwen2_geometry(model):
    q_heads, kv_heads, dim = QWEN2_GEOMETRY[model]
    # Position 40 is in chunk 3: keys 36-40 intra, 24-35 successive, 0-23 inter.
    q, k, v, inv_freq = inputs(q_heads, kv_heads, dim, 1, 41, mx.float32, seed=1, spare=7)
    compare(q, k, v, inv_freq)
    compare(q, k, v, inv_freq, block_keys=5)  # blocks straddle the part boundaries


@pytest.mark.parametrize("k_len", [1, 5, 12, 13, 24, 25, 100])
def test_decode_positions_across_chunk_boundaries(k_len):
    """Chunk 0 only (no successive/inter part), first token of a chunk, long caches."""
    q, k, v, inv_freq = inputs(7, 1, 64, 1, k_len, mx.float32, seed=k_len)
    compare(q, k, v, inv_freq, block_keys=16)


@pytest.mark.parametrize("model", QWEN2_GEOMETRY)
def test_prefill_qwen2_geometry(model):
    q_heads, kv_heads, dim = QWEN2_GEOMETRY[model]
    q, k, v, inv_freq = inputs(q_heads, kv_heads, dim, 30, 30, mx.float32, seed=2)
    compare(q, k, v, inv_freq)


@pytest.mark.parametrize("q_len,k_len", [(1 + 7, 45), (13, 13), (9, 50), (37, 37)])
def test_chunked_prefill_shapes(q_len, k_len):
    """Row counts that are not multiples of the tile, starts inside a chunk, strided K/V."""
    q, k, v, inv_freq = inputs(6, 2, 64, q_len, k_len, mx.float32, seed=q_len, spare=4)
    compare(q, k, v, inv_freq)


@pytest.mark.parametrize("q_len", [1, 11])
def test_batch_of_two(q_len):
    q, k, v, inv_freq = inputs(14, 2, 64, q_len, 30, mx.float32, seed=8, spare=2, batch=2)
    compare(q, k, v, inv_freq, block_keys=8 if q_len == 1 else None)


def test_long_prefill_runs_in_several_launches(monkeypatch):
    """Prompts longer than one launch are split by rows (each launch its own q_start)."""
    monkeypatch.setattr(dca_module, "PREFILL_ROWS_PER_LAUNCH", 8)
    q, k, v, inv_freq = inputs(7, 1, 64, 21, 33, mx.float32, seed=7)
    compare(q, k, v, inv_freq)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("q_len", [1, 19])
def test_half_precision(dtype, q_len):
    q, k, v, inv_freq = inputs(14, 2, 64, q_len, 40, dtype, seed=3)
    compare(q, k, v, inv_freq, block_keys=16 if q_len == 1 else None)


def test_qwen_chunk_geometry_and_no_temperature():
    """A chunk/local ratio like Qwen's (C = 8192, W = 1024 scaled down 256x), s = 1."""
    cfg = DualChunkConfig(chunk_size=32, local_size=4)
    q, k, v, inv_freq = inputs(14, 2, 64, 20, 90, mx.float32, seed=4)
    compare(q, k, v, inv_freq, cfg=cfg, temperature=1.0)


def test_prefill_barriers_under_random_schedules(monkeypatch):
    """Threads of a tile run in a shuffled order: a missing barrier would read a block
    that is half overwritten (emulator only; Metal schedules its own way)."""
    if BACKEND != "emulator":
        pytest.skip("schedule randomisation is an emulator feature")
    q, k, v, inv_freq = inputs(7, 1, 64, 20, 40, mx.float32, seed=5)
    for seed in (1, 2):
        monkeypatch.setattr(PREFILL, "emulator_seed", seed)
        compare(q, k, v, inv_freq)


def test_missing_barrier_is_caught(monkeypatch):
    """Sanity of the test above: without the barrier after the block, results go wrong."""
    if BACKEND != "emulator":
        pytest.skip("schedule randomisation is an emulator feature")
    from qwen2_mlx.metal_kernels.dispatch import KernelProgram

    source = PREFILL.source
    last = source.rindex("threadgroup_barrier(mem_flags::mem_threadgroup);")
    broken = KernelProgram(PREFILL.name + "_no_barrier", PREFILL.input_names,
                           PREFILL.output_names,
                           source[:last] + source[last:].replace(
                               "threadgroup_barrier(mem_flags::mem_threadgroup);", "", 1),
                           ensure_row_contiguous=False)
    broken.emulator_seed = 3
    monkeypatch.setattr("qwen2_mlx.metal_kernels.dca_prefill.PREFILL", broken)
    q, k, v, inv_freq = inputs(7, 1, 64, 20, 40, mx.float32, seed=5)
    with pytest.raises(AssertionError):
        compare(q, k, v, inv_freq)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch, use_kernels):
    use_kernels("1")
    # Spies count launcher calls: keep the (separately tested) self-check out of them.
    monkeypatch.setattr(dispatch, "SELF_CHECK_BACKENDS", set())
    calls = []
    real = dca_module.dual_chunk_attention_kernel

    def spy(*args, **kwargs):
        calls.append(kwargs.get("q_start"))
        return real(*args, **kwargs)

    monkeypatch.setattr(dca_module, "dual_chunk_attention_kernel", spy)
    return calls


def test_dispatch_runs_kernels_and_matches_reference(monkeypatch, kernel_calls):
    q, k, v, inv_freq = inputs(14, 2, 64, 10, 40, mx.float32, seed=6)
    args = dict(cfg=CFG, inv_freq=inv_freq, scale=0.125, q_temperature=1.1)
    prefill = dual_chunk_attention(q, k, v, q_start=30, **args)
    decode = dual_chunk_attention(q[:, :, -1:], k, v, q_start=39, **args)
    assert kernel_calls == [30, 39]
    dispatch.set_kernel_backend("0")  # the fixture restores it
    np.testing.assert_allclose(np.array(prefill),
                               np.array(dual_chunk_attention(q, k, v, q_start=30, **args)),
                               atol=2e-5)
    np.testing.assert_allclose(
        np.array(decode), np.array(dual_chunk_attention(q[:, :, -1:], k, v, q_start=39, **args)),
        atol=2e-5)
    assert kernel_calls == [30, 39]


def test_dispatch_falls_back_for_unsupported_shapes(kernel_calls):
    q, k, v, inv_freq = inputs(4, 2, 16, 3, 20, mx.float32)  # head_dim 16
    dual_chunk_attention(q, k, v, q_start=17, cfg=CFG, inv_freq=inv_freq, scale=0.25)
    q, k, v, inv_freq = inputs(18, 1, 128, 1, 20, mx.float32)  # G * D = 2304 registers
    dual_chunk_attention(q, k, v, q_start=19, cfg=CFG, inv_freq=inv_freq, scale=0.1)
    assert kernel_calls == []


def test_dispatch_still_validates_inputs(kernel_calls):
    q, k, v, inv_freq = inputs(14, 2, 64, 3, 20, mx.float32)
    with pytest.raises(ValueError, match="q_start"):
        dual_chunk_attention(q, k, v, q_start=3, cfg=CFG, inv_freq=inv_freq, scale=0.1)
