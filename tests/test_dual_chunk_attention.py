"""Tests for qwen2_mlx.dual_chunk_attention against the float64 reference (spec §10, T1-T6, T8/T9).

Random inputs use a seeded numpy generator; the golden tests (T8/T9) use deterministic inputs.
Inputs are rounded to float32 once and the reference runs on those same values in float64.
"""

import warnings

import mlx.core as mx
import numpy as np
import pytest

from qwen2_mlx.dca import (
    DualChunkConfig,
    dca_write_keys,
    distance_matrix,
    dual_chunk_attention,
    key_positions,
    length_temperature,
    query_positions,
)
from qwen2_mlx.metal_kernels.dual_chunk_attention import (
    attention_with_lse,
    merge_attention_partials,
)
from qwen2_mlx.rope import rope_inv_freq

import dca_reference as ref

ATOL = 1e-5  # fp32 tolerance of spec §10 (d=16, theta=1e4, small C)
D, HQ, HKV, THETA = 16, 4, 2, 1e4
SCALE = D**-0.5
INV32 = rope_inv_freq(D, THETA)
INV64 = np.array(INV32).astype(np.float64)  # the reference uses the very same frequencies
T3_CONFIGS = [(8, 2), (16, 4), (10, 4), (8, 5), (12, 3)]


def _qkv(n, seed, hq=HQ, hkv=HKV, batch=1):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, hq, n, D)).astype(np.float32).astype(np.float64)
    k = rng.standard_normal((batch, hkv, n, D)).astype(np.float32).astype(np.float64)
    v = rng.standard_normal((batch, hkv, n, D)).astype(np.float32).astype(np.float64)
    return q, k, v


def _mx(x):
    return mx.array(x.astype(np.float32))


def _dca(q, k, v, cfg, *, s_q=1.0, s_k=1.0, q_start=0, cache=None, **kw):
    """MLX prefill of q (last rows) against keys written in one step at temperature s_k."""
    keys = cache if cache is not None else dca_write_keys(_mx(k), 0, cfg, INV32, s_k)
    out = dual_chunk_attention(
        _mx(q),
        keys,
        _mx(v),
        q_start=q_start,
        cfg=cfg,
        inv_freq=INV32,
        scale=SCALE,
        q_temperature=s_q,
        **kw,
    )
    return np.array(out)


# ---------------------------------------------------------------- config
def test_config_geometry_and_validation():
    cfg = DualChunkConfig(10, 4)
    assert cfg.chunk_len == 6 and cfg.inter_query_position == 10
    assert DualChunkConfig(16, 8).inter_query_position == 15  # min(2L-1, C) with W > L-1
    for bad in [(8, 8), (8, 9), (0, 1), (8, 0), (8.0, 2), (8, 2, -1), (True, 1)]:
        with pytest.raises(ValueError):
            DualChunkConfig(*bad)


def test_config_from_dict():
    qwen_1m = {"chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings": 262144}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = DualChunkConfig.from_dict(qwen_1m)
        assert DualChunkConfig.from_dict({}) == DualChunkConfig(8192, 1024, 0)  # vLLM defaults
        DualChunkConfig.from_dict(
            {**qwen_1m, "sparse_attention_enabled": False, "sparse_attention_config": {"x": 1}}
        )
    assert cfg == DualChunkConfig(262144, 8192, 262144) and cfg.chunk_len == 253952
    with pytest.warns(UserWarning, match="sparse attention"):
        DualChunkConfig.from_dict({**qwen_1m, "sparse_attention_config": {"layer": [1]}})
    with pytest.warns(UserWarning, match="sparse attention"):
        DualChunkConfig.from_dict({**qwen_1m, "sparse_attention_enabled": True})
    with pytest.warns(UserWarning, match="chunk_sise"):
        DualChunkConfig.from_dict({**qwen_1m, "chunk_sise": 4})
    with pytest.raises(ValueError, match="local_size"):
        DualChunkConfig.from_dict({"chunk_size": 512, "local_size": 1024})
    with pytest.raises(ValueError, match="dict"):
        DualChunkConfig.from_dict([("chunk_size", 8)])


# ---------------------------------------------------------------- T2 positions
def test_positions_hand_checked_example():
    """T2: spec §3.4 (C=8, W=2, L=6) and the code-version clamp row for C=10, W=4."""
    q = query_positions(0, 6, 8, 2)
    assert np.array(q.intra).tolist() == [0, 1, 2, 3, 4, 5]
    assert np.array(q.succ).tolist() == [6, 7, 8, 8, 8, 8]
    assert np.array(q.inter).tolist() == [8] * 6
    assert np.array(key_positions(0, 6, 6)).tolist() == [0, 1, 2, 3, 4, 5]
    M = np.array(distance_matrix(20, 8, 2))
    assert M[13, :14].tolist() == [8, 7, 6, 5, 4, 3, 7, 6, 5, 4, 3, 2, 1, 0]
    assert M[16, :17].tolist() == [8, 7, 6, 5, 4, 3, 8, 7, 6, 5, 4, 3, 4, 3, 2, 1, 0]
    assert M[19].tolist() == [8, 7, 6, 5, 4, 3, 8, 7, 6, 5, 4, 3, 7, 6, 5, 4, 3, 2, 1, 0]

    q = query_positions(0, 6, 10, 4)
    assert np.array(q.succ).tolist() == [6, 7, 8, 9, 10, 10]  # clamp at C, not C-1 (§3.3)
    assert np.array(q.inter).tolist() == [10] * 6


def test_positions_absolute_start_wraps_per_chunk():
    assert np.array(key_positions(10, 5, 6)).tolist() == [4, 5, 0, 1, 2]
    q = query_positions(10, 5, 8, 2)
    assert np.array(q.intra).tolist() == [4, 5, 0, 1, 2]
    assert np.array(q.succ).tolist() == [8, 8, 6, 7, 8]
    with pytest.raises(ValueError):
        key_positions(-1, 3, 6)


@pytest.mark.parametrize("C,W", T3_CONFIGS + [(16, 8), (12, 1), (8, 7), (32, 4)])
def test_distance_matrix_invariants_and_reference(C, W):
    n = 4 * (C - W) + 3
    M = np.array(distance_matrix(n, C, W))
    np.testing.assert_array_equal(M, ref.distance_matrix(n, C, W))
    i, j = np.tril_indices(n)
    assert M[i, j].min() >= 0 and M[i, j].max() <= C
    if C - W > W:  # the local window is exact when L > W (spec §3.2)
        local = (i - j) <= W
        np.testing.assert_array_equal(M[i, j][local], (i - j)[local])
    assert np.all(M[np.triu_indices(n, 1)] == -1)


# ---------------------------------------------------------------- T6 temperature numbers
def test_length_temperature():
    assert length_temperature(20, 8) == pytest.approx(1.091629073187, abs=1e-12)
    assert all(length_temperature(n, 32) == 1.0 for n in (1, 16, 32))
    assert length_temperature(10**6, 0) == 1.0
    assert DualChunkConfig(8, 2, 8).temperature(20) == length_temperature(20, 8)
    for bad in [(0, 8), (5, -1), (2.5, 8)]:
        with pytest.raises(ValueError):
            length_temperature(*bad)


# ---------------------------------------------------------------- LSE attention and merge (T3)
def _np_softmax_attention(q, k, v, scale, mask):
    logits = np.where(mask, q @ k.swapaxes(-1, -2) * scale, -np.inf)
    top = logits.max(-1, keepdims=True)
    e = np.exp(logits - top)
    return e / e.sum(-1, keepdims=True) @ v, (top + np.log(e.sum(-1, keepdims=True)))[..., 0]


def test_attention_with_lse_and_merge_equal_one_softmax():
    rng = np.random.default_rng(3)
    q, k, v = (
        rng.standard_normal(s).astype(np.float32) for s in [(2, 5, 8), (2, 11, 8), (2, 11, 8)]
    )
    mask = np.tril(np.ones((5, 11), bool), 6)
    full_out, full_lse = _np_softmax_attention(q, k, v, 0.3, mask)
    whole = attention_with_lse(mx.array(q), mx.array(k), mx.array(v), 0.3, mx.array(mask))
    np.testing.assert_allclose(np.array(whole[0]), full_out, atol=1e-6)
    np.testing.assert_allclose(np.array(whole[1]), full_lse, atol=1e-6)

    # Key sets [0,4), [4,7), [7,11): the last is fully masked for rows 0..1 (lse = -inf, out = 0).
    parts = [
        attention_with_lse(
            mx.array(q), mx.array(k[:, a:b]), mx.array(v[:, a:b]), 0.3, mx.array(mask[:, a:b])
        )
        for a, b in [(0, 4), (4, 7), (7, 11)]
    ]
    assert np.all(np.isneginf(np.array(parts[2][1])[:, :1]))
    np.testing.assert_array_equal(np.array(parts[2][0])[:, 0], 0.0)
    out, lse = merge_attention_partials(parts)
    np.testing.assert_allclose(np.array(out), full_out, atol=1e-6)
    np.testing.assert_allclose(np.array(lse), full_lse, atol=1e-6)
    # Order does not matter and pairwise (online) merging gives the same result.
    online = merge_attention_partials([merge_attention_partials(parts[2:0:-1]), parts[0]])
    np.testing.assert_allclose(np.array(online[0]), full_out, atol=1e-6)
    with pytest.raises(ValueError):
        merge_attention_partials([])


def test_merge_of_all_empty_parts_is_zero():
    empty = (mx.zeros((1, 2, 4)), mx.full((1, 2), -mx.inf))
    out, lse = merge_attention_partials([empty, empty])
    assert np.all(np.array(out) == 0) and np.all(np.isneginf(np.array(lse)))


@pytest.mark.parametrize("C,W", T3_CONFIGS)
def test_reference_lse_merge_equals_single_softmax(C, W):
    """T3 in float64: vLLM's three-part LSE merge == one softmax == relative (M) form, 1e-12."""
    n = 4 * (C - W) + 3
    q, k, v = _qkv(n, 4)
    dense = ref.dca_attention_dense(q, k, v, INV64, SCALE, C, W)
    three = ref.dca_attention_three_logits(q, k, v, INV64, SCALE, C, W)
    loop = ref.dca_prefill_vllm_loop(q, ref.write_keys(k, 0, INV64, C, W), v, INV64, SCALE, C, W)
    np.testing.assert_allclose(three, dense, atol=1e-12, rtol=0)
    np.testing.assert_allclose(loop, dense, atol=1e-12, rtol=0)


@pytest.mark.parametrize("C,W", T3_CONFIGS)
@pytest.mark.parametrize("query_tile,key_block", [(512, 4096), (1, 1), (2, 3), (5, 2)])
def test_prefill_matches_reference(C, W, query_tile, key_block):
    """T3 on the MLX implementation, through every tiling path (tiles, key blocks, masks)."""
    n = 4 * (C - W) + 3
    q, k, v = _qkv(n, 5)
    got = _dca(q, k, v, DualChunkConfig(C, W), query_tile=query_tile, key_block=key_block)
    np.testing.assert_allclose(got, ref.dca_attention_dense(q, k, v, INV64, SCALE, C, W), atol=ATOL)


# ---------------------------------------------------------------- T1 reduction to causal attention
@pytest.mark.parametrize(
    "C,W,equal_up_to", [(16, 4, 17), (16, 8, 16), (12, 1, 13), (8, 7, 2), (32, 4, 33)]
)
def test_reduces_to_causal_rope_attention(C, W, equal_up_to):
    """T1: DCA == causal RoPE attention for n <= min(C+1, 2L), not at n = that + 1.

    Causality makes row i of an n-token prefill the output for i+1 tokens, so one prefill of
    equal_up_to + 1 tokens covers every n.
    """
    assert equal_up_to == min(C + 1, 2 * (C - W))
    n = equal_up_to + 1
    q, k, v = _qkv(n, 6)
    causal = ref.causal_rope_attention(q, k, v, INV64, SCALE)
    np.testing.assert_allclose(
        ref.dca_attention_dense(q, k, v, INV64, SCALE, C, W)[:, :, :-1],
        causal[:, :, :-1],
        atol=1e-12,
    )
    got = _dca(q, k, v, DualChunkConfig(C, W), query_tile=3, key_block=4)
    np.testing.assert_allclose(got[:, :, :-1], causal[:, :, :-1], atol=ATOL)
    assert np.abs(got[:, :, -1] - causal[:, :, -1]).max() > 1e-2  # measured 0.2-0.4


# ---------------------------------------------------------------- T4 decode == last prefill row
@pytest.mark.parametrize("C,W", [(8, 2), (10, 4), (8, 5)])
def test_decode_equals_last_prefill_row(C, W):
    cfg = DualChunkConfig(C, W)
    total = 4 * cfg.chunk_len + 3
    q, k, v = _qkv(total, 7)
    keys = dca_write_keys(_mx(k), 0, cfg, INV32)
    prefill = _dca(q, k, v, cfg, cache=keys)
    for n in range(1, total + 1):
        decode = dual_chunk_attention(
            _mx(q[:, :, n - 1 : n]),
            keys[:, :, :n],
            _mx(v[:, :, :n]),
            q_start=n - 1,
            cfg=cfg,
            inv_freq=INV32,
            scale=SCALE,
        )
        decode = np.array(decode)
        np.testing.assert_allclose(decode[:, :, 0], prefill[:, :, n - 1], atol=ATOL, err_msg=n)
        expected = ref.dca_decode(
            q[:, :, n - 1 : n],
            ref.write_keys(k[:, :, :n], 0, INV64, C, W),
            v[:, :, :n],
            INV64,
            SCALE,
            C,
            W,
        )
        np.testing.assert_allclose(decode, expected, atol=ATOL, err_msg=n)


# ---------------------------------------------------------------- T5 stepwise prefill
@pytest.mark.parametrize("C,W", [(8, 2), (10, 4)])
def test_stepwise_prefill_equals_one_shot(C, W):
    cfg = DualChunkConfig(C, W)
    L = cfg.chunk_len
    n = 4 * L + 3
    q, k, v = _qkv(n, 8)
    one_shot = _dca(q, k, v, cfg)
    splits = [1, L - 1, L, L + 1, 2 * L + 2, n - 1]
    for split in splits:
        cache = mx.concatenate(
            [
                dca_write_keys(_mx(k[:, :, :split]), 0, cfg, INV32),
                dca_write_keys(_mx(k[:, :, split:]), split, cfg, INV32),
            ],
            axis=2,
        )
        head = _dca(q[:, :, :split], k, v[:, :, :split], cfg, cache=cache[:, :, :split])
        tail = _dca(q[:, :, split:], k, v, cfg, cache=cache, q_start=split)
        np.testing.assert_allclose(
            np.concatenate([head, tail], axis=2), one_shot, atol=ATOL, err_msg=split
        )
    # All the splits in sequence, as a step-by-step prefill does.
    bounds = [0, *splits, n]
    cache, outs = None, []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        written = dca_write_keys(_mx(k[:, :, lo:hi]), lo, cfg, INV32)
        cache = written if cache is None else mx.concatenate([cache, written], axis=2)
        outs.append(_dca(q[:, :, lo:hi], k, v[:, :, :hi], cfg, cache=cache, q_start=lo))
    np.testing.assert_allclose(np.concatenate(outs, axis=2), one_shot, atol=ATOL)


# ---------------------------------------------------------------- T6 temperature semantics
def test_temperature_equals_scaled_inputs():
    cfg = DualChunkConfig(8, 2, 8)
    q, k, v = _qkv(20, 9)
    s = cfg.temperature(20)
    with_s = _dca(q, k, v, cfg, s_q=s, s_k=s)
    pre_scaled = _dca(q * s, k * s, v, cfg)
    np.testing.assert_allclose(with_s, pre_scaled, atol=ATOL)
    expected = ref.dca_attention_dense(q, k, v, INV64, SCALE, 8, 2, s_q=s, s_k=np.full(20, s))
    np.testing.assert_allclose(with_s, expected, atol=ATOL)
    assert np.abs(with_s - _dca(q, k, v, cfg)).max() > 1e-3  # s really changes the result


def test_cached_keys_keep_write_time_temperature():
    """T6: prefill 16 tokens at s(16), decode token 16 at s(17) (vLLM, §4.4)."""
    cfg = DualChunkConfig(8, 2, 8)
    q, k, v = _qkv(17, 10)
    s16, s17 = cfg.temperature(16), cfg.temperature(17)
    cache = mx.concatenate(
        [
            dca_write_keys(_mx(k[:, :, :16]), 0, cfg, INV32, s16),
            dca_write_keys(_mx(k[:, :, 16:]), 16, cfg, INV32, s17),
        ],
        axis=2,
    )
    decode = _dca(q[:, :, 16:], k, v, cfg, cache=cache, q_start=16, s_q=s17)
    per_key = ref.dca_attention_dense(
        q, k, v, INV64, SCALE, 8, 2, s_q=s17, s_k=np.array([s16] * 16 + [s17])
    )[:, :, 16:]
    np.testing.assert_allclose(decode, per_key, atol=ATOL)
    re_prefill = ref.dca_attention_dense(
        q, k, v, INV64, SCALE, 8, 2, s_q=s17, s_k=np.full(17, s17)
    )[:, :, 16:]
    assert np.abs(decode - re_prefill).max() > 1e-3  # measured 2.7e-3 (spec: ~3.5e-3)


def test_write_keys_match_reference():
    cfg = DualChunkConfig(10, 4, 8)
    _, k, _ = _qkv(9, 11)
    got = np.array(dca_write_keys(_mx(k), 5, cfg, INV32, 1.25))
    np.testing.assert_allclose(got, ref.write_keys(k, 5, INV64, 10, 4, 1.25), atol=ATOL)
    kb = dca_write_keys(_mx(k).astype(mx.bfloat16), 5, cfg, INV32, 1.25)
    assert kb.dtype == mx.bfloat16
    with pytest.raises(ValueError):
        dca_write_keys(_mx(k), -1, cfg, INV32)
    with pytest.raises(ValueError):
        dca_write_keys(_mx(k), 0, cfg, INV32, 0.0)


# ---------------------------------------------------------------- T8/T9 golden values
def _deterministic(heads, n, a, b, c, fn):
    h, t, i = np.meshgrid(np.arange(heads), np.arange(n), np.arange(D), indexing="ij")
    return fn(a * t + b * i + c * h)[None].astype(np.float32).astype(np.float64)


def _golden_inputs():
    q = _deterministic(HQ, 21, 0.37, 1.3, 0.7, np.sin)
    k = _deterministic(HKV, 21, 0.53, -0.8, 1.1, np.cos)
    v = _deterministic(HKV, 21, 0.29, 0.6, -0.4, lambda x: np.sin(x) + 0.5 * np.cos(2 * x))
    return q, k, v


# Pinned by tests/dca_reference.py in float64, frequencies included (ref.inv_freq; the other tests
# feed the reference MLX's float32 frequencies), for C=8, W=2, O=8, d=16, Hq=4, Hkv=2, theta=1e4
# and the inputs of _golden_inputs. dca_attention_dense and dca_attention_three_logits agree on
# them to 4e-16, and dca_decode matches the dense form with per-key s to 1.4e-16.
# Prefill of 20 tokens (4 chunks) with s_q = s_k = s(20): out[0, h, t, i].
GOLDEN_PREFILL = {
    (0, 19, 0): 0.18581612889719348,
    (1, 13, 5): -0.21516440199231668,
    (3, 7, 15): 0.20432523168142794,
    (2, 19, 9): 0.25527209489482877,
}
# vLLM-style decode of token 20 (ref.dca_decode): keys 0..19 cached at s(20), key 20 at s(21),
# query at s(21): out[0, h, 0, i].
GOLDEN_DECODE = {
    (0, 0): 0.1939781412119313,
    (1, 7): 0.19595212289796457,
    (3, 15): 0.07770802949320804,
}


def test_golden_prefill_over_several_chunks():
    cfg = DualChunkConfig(8, 2, 8)
    q, k, v = (x[:, :, :20] for x in _golden_inputs())
    s = cfg.temperature(20)
    inv = ref.inv_freq(D, THETA)
    expected = ref.dca_attention_dense(q, k, v, inv, SCALE, 8, 2, s_q=s, s_k=np.full(20, s))
    got = _dca(q, k, v, cfg, s_q=s, s_k=s, query_tile=4, key_block=4)
    for (h, t, i), value in GOLDEN_PREFILL.items():
        assert expected[0, h, t, i] == pytest.approx(value, abs=1e-12)
        assert got[0, h, t, i] == pytest.approx(value, abs=ATOL)
    np.testing.assert_allclose(got, expected, atol=ATOL)


def test_golden_decode_with_length_temperature():
    cfg = DualChunkConfig(8, 2, 8)
    q, k, v = _golden_inputs()
    s20, s21 = cfg.temperature(20), cfg.temperature(21)
    cache = mx.concatenate(
        [
            dca_write_keys(_mx(k[:, :, :20]), 0, cfg, INV32, s20),
            dca_write_keys(_mx(k[:, :, 20:]), 20, cfg, INV32, s21),
        ],
        axis=2,
    )
    inv = ref.inv_freq(D, THETA)
    ref_cache = np.concatenate(
        [
            ref.write_keys(k[:, :, :20], 0, inv, 8, 2, s20),
            ref.write_keys(k[:, :, 20:], 20, inv, 8, 2, s21),
        ],
        axis=2,
    )
    expected = ref.dca_decode(q[:, :, 20:], ref_cache, v, inv, SCALE, 8, 2, s_q=s21)
    got = _dca(q[:, :, 20:], k, v, cfg, cache=cache, q_start=20, s_q=s21)
    for (h, i), value in GOLDEN_DECODE.items():
        assert expected[0, h, 0, i] == pytest.approx(value, abs=1e-12)
        assert got[0, h, 0, i] == pytest.approx(value, abs=ATOL)


# ---------------------------------------------------------------- shapes, dtypes, errors
def test_gqa_groups_and_batch():
    cfg = DualChunkConfig(8, 2)
    q, k, v = _qkv(17, 12, hq=6, hkv=2, batch=2)
    got = _dca(q, k, v, cfg, query_tile=4, key_block=3)
    for b in range(2):
        expected = ref.dca_attention_dense(
            q[b : b + 1], k[b : b + 1], v[b : b + 1], INV64, SCALE, 8, 2
        )
        np.testing.assert_allclose(got[b : b + 1], expected, atol=ATOL)


def test_bfloat16_inputs():
    cfg = DualChunkConfig(8, 2)
    q, k, v = _qkv(15, 13)
    keys = dca_write_keys(_mx(k).astype(mx.bfloat16), 0, cfg, INV32)
    out = dual_chunk_attention(
        _mx(q).astype(mx.bfloat16),
        keys,
        _mx(v).astype(mx.bfloat16),
        q_start=0,
        cfg=cfg,
        inv_freq=INV32,
        scale=SCALE,
    )
    assert out.dtype == mx.bfloat16
    expected = ref.dca_attention_dense(q, k, v, INV64, SCALE, 8, 2)
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), expected, atol=5e-2)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(q_start=1), "q_start"),
        (dict(query_tile=0), "query_tile"),
        (dict(key_block=0), "key_block"),
        (dict(inv_freq=rope_inv_freq(8, THETA)), "inv_freq"),
        (dict(queries=mx.zeros((1, 3, 5, D))), "multiple"),
        (dict(values=mx.zeros((1, HKV, 4, D))), "values"),
        (dict(queries=mx.zeros((HQ, 5, D))), "4-D"),
    ],
)
def test_bad_inputs_are_rejected(change, match):
    args = dict(
        queries=mx.zeros((1, HQ, 5, D)),
        keys=mx.zeros((1, HKV, 5, D)),
        values=mx.zeros((1, HKV, 5, D)),
        q_start=0,
        cfg=DualChunkConfig(8, 2),
        inv_freq=INV32,
        scale=SCALE,
    )
    args.update(change)
    queries, keys, values = args.pop("queries"), args.pop("keys"), args.pop("values")
    with pytest.raises(ValueError, match=match):
        dual_chunk_attention(queries, keys, values, **args)


# ---------------------------------------------------------------- bounded memory
def test_long_prefill_memory_is_bounded():
    """8K tokens: the peak stays far below one 8K x 8K float32 score matrix per head (~268 MB)."""
    n, d, tile, block = 8192, 8, 256, 1024
    cfg = DualChunkConfig(1024, 128)
    inv = rope_inv_freq(d, THETA)
    q = mx.sin(mx.arange(n * 2 * d, dtype=mx.float32) * 0.37).reshape(1, 2, n, d)
    k = mx.cos(mx.arange(n * d, dtype=mx.float32) * 0.53).reshape(1, 1, n, d)
    v = mx.sin(mx.arange(n * d, dtype=mx.float32) * 0.29).reshape(1, 1, n, d)
    keys = dca_write_keys(k, 0, cfg, inv)
    mx.eval(q, keys, v)
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    out = dual_chunk_attention(
        q,
        keys,
        v,
        q_start=0,
        cfg=cfg,
        inv_freq=inv,
        scale=d**-0.5,
        query_tile=tile,
        key_block=block,
    )
    mx.eval(out)
    peak = mx.get_peak_memory() - before
    full_scores = 2 * n * n * 4  # Hq heads x n x n float32
    assert peak < full_scores / 10, (peak, full_scores)  # measured ~20 MB vs 537 MB
    # Spot-check the last row (inter + succ + intra parts) against the float64 reference decode.
    last = ref.dca_decode(
        np.array(q[:, :, -1:]).astype(np.float64),
        np.array(keys).astype(np.float64),
        np.array(v).astype(np.float64),
        np.array(inv).astype(np.float64),
        d**-0.5,
        1024,
        128,
    )
    np.testing.assert_allclose(np.array(out[:, :, -1:]), last, atol=ATOL)
