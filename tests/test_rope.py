"""Tests for qwen2_mlx.rope: plain / linear / YaRN frequencies and the RoPE module (spec §5, T7)."""

import math

import mlx.core as mx
import numpy as np
import pytest

from qwen2_mlx.rope import (
    RoPE,
    apply_rotary,
    rope_frequencies,
    rope_inv_freq,
    yarn_get_mscale,
    yarn_inv_freq_and_scale,
)

import dca_reference as ref

QWEN2_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
ATOL = 1e-5  # fp32 tolerance of spec §10


def _rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------- frequencies
@pytest.mark.parametrize("d,theta", [(128, 1e6), (64, 1e4), (16, 1e4), (128, 1e7)])
def test_rope_inv_freq_matches_float64_formula(d, theta):
    got = np.array(rope_inv_freq(d, theta))
    assert got.dtype == np.float32 and got.shape == (d // 2,)
    np.testing.assert_allclose(got, ref.inv_freq(d, theta), rtol=3e-7)


def test_yarn_qwen2_numbers():
    """T7: spec §5.2 for d=128, theta=1e6, f=4, Lo=32768 (low=23, high=40, ratio table, mscale)."""
    _, ref_mscale, low, high = ref.yarn(128, 1e6, 4.0, 32768)
    assert (low, high) == (23, 40)
    assert ref_mscale == pytest.approx(1.138629436111989, abs=1e-15)

    inv, mscale = yarn_inv_freq_and_scale(128, 1e6, 4.0, 32768)
    assert mscale == pytest.approx(1.138629436111989, abs=1e-15)
    assert mscale**2 == pytest.approx(1.296476992780706, abs=1e-14)
    ratio = np.array(inv).astype(np.float64) / np.array(rope_inv_freq(128, 1e6))
    table = {
        0: 1.0,
        23: 1.0,
        24: 0.955882352941,
        31: 0.647058823529,
        32: 0.602941176471,
        39: 0.294117647059,
        40: 0.25,
        63: 0.25,
    }
    for k, expected in table.items():
        assert ratio[k] == pytest.approx(expected, rel=1e-6), k
    # The ramp starts right after low=23 and ends at high=40.
    assert np.all(ratio[:24] == 1.0) and np.all(ratio[40:] == pytest.approx(0.25, rel=1e-6))
    assert np.all(np.diff(ratio[23:41]) < 0)


@pytest.mark.parametrize(
    "d,theta,factor,original,beta_fast,beta_slow",
    [
        (128, 1e6, 4.0, 32768, 32.0, 1.0),
        (64, 1e4, 8.0, 2048, 16.0, 2.0),
        (16, 1e4, 2.0, 64, 32.0, 1.0),
    ],
)
def test_yarn_matches_float64_reference(d, theta, factor, original, beta_fast, beta_slow):
    inv, mscale = yarn_inv_freq_and_scale(d, theta, factor, original, beta_fast, beta_slow)
    ref_inv, ref_mscale, _, _ = ref.yarn(d, theta, factor, original, beta_fast, beta_slow)
    np.testing.assert_allclose(np.array(inv), ref_inv, rtol=5e-7)
    assert mscale == pytest.approx(ref_mscale, abs=1e-15)


def test_yarn_factor_one_is_plain():
    """T7: f = 1 must give plain frequencies and scale 1 (the transformers override bug, §5.4 b)."""
    inv, mscale = yarn_inv_freq_and_scale(128, 1e6, 1.0, 32768)
    np.testing.assert_array_equal(np.array(inv), np.array(rope_inv_freq(128, 1e6)))
    assert mscale == 1.0
    # Qwen's snippet with max_position_embeddings == original must still use factor 4 as given.
    inv4, mscale4 = rope_frequencies(128, 1e6, QWEN2_YARN, 32768)
    assert mscale4 == pytest.approx(1.138629436111989)
    assert float(np.array(inv4)[-1] / np.array(rope_inv_freq(128, 1e6))[-1]) == pytest.approx(0.25)


def test_yarn_attention_factor_and_mscale_keys():
    _, explicit = yarn_inv_freq_and_scale(64, 1e4, 4.0, 2048, attention_factor=1.5)
    assert explicit == 1.5
    _, ratio = yarn_inv_freq_and_scale(64, 1e4, 4.0, 2048, mscale=1.0, mscale_all_dim=0.5)
    assert ratio == pytest.approx((0.1 * math.log(4) + 1) / (0.05 * math.log(4) + 1), abs=1e-15)
    assert yarn_get_mscale(0.5) == 1.0


def test_rope_frequencies_dispatch():
    plain = np.array(rope_inv_freq(16, 1e4))
    for scaling in (None, {"rope_type": "default"}, {"type": "default", "rope_theta": 1e4}):
        inv, factor = rope_frequencies(16, 1e4, scaling, 4096)
        np.testing.assert_array_equal(np.array(inv), plain)
        assert factor == 1.0
    inv, factor = rope_frequencies(16, 1e4, {"rope_type": "linear", "factor": 2.0}, 4096)
    np.testing.assert_allclose(np.array(inv), plain / 2, rtol=1e-7)
    assert factor == 1.0
    # YaRN without original_max_position_embeddings falls back to max_position_embeddings (HF).
    a, _ = rope_frequencies(16, 1e4, {"rope_type": "yarn", "factor": 4.0}, 64)
    b, _ = yarn_inv_freq_and_scale(16, 1e4, 4.0, 64)
    np.testing.assert_array_equal(np.array(a), np.array(b))
    # ...and a missing factor to max_position_embeddings / original (HF).
    a, s = rope_frequencies(
        16, 1e4, {"rope_type": "yarn", "original_max_position_embeddings": 32}, 128
    )
    b, t = yarn_inv_freq_and_scale(16, 1e4, 4.0, 32)
    np.testing.assert_array_equal(np.array(a), np.array(b))
    assert s == t


@pytest.mark.parametrize(
    "scaling,match",
    [
        ({"rope_type": "dynamic", "factor": 2.0}, "'dynamic'"),
        ({"type": "su"}, "'su'"),
        ({"rope_type": "linear"}, "factor"),
        ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5}, "rope_theta"),
        ({"rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5}, "partial_rotary"),
        ({"rope_type": "yarn", "factor": -1.0, "original_max_position_embeddings": 64}, "factor"),
        ("yarn", "dict"),
    ],
)
def test_rope_frequencies_rejects_bad_scaling(scaling, match):
    with pytest.raises(ValueError, match=match):
        rope_frequencies(16, 1e4, scaling, 4096)


@pytest.mark.parametrize("head_dim,theta", [(15, 1e4), (0, 1e4), (16, 1.0), (16, "1e4")])
def test_rope_inv_freq_rejects_bad_arguments(head_dim, theta):
    with pytest.raises(ValueError):
        rope_inv_freq(head_dim, theta)


def test_yarn_without_lengths_is_an_error():
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        rope_frequencies(16, 1e4, {"rope_type": "yarn", "factor": 4.0}, None)


# ---------------------------------------------------------------- RoPE module
@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    ],
)
@pytest.mark.parametrize("offset", [0, 37])
def test_rope_call_matches_rotate_half_reference(scaling, offset):
    """mx.fast.rope with freqs = 1/inv_freq (periods) is the rotate_half rotation."""
    rope = RoPE(16, 1e4, scaling, 256)
    x = _rand((2, 3, 5, 16), 0)
    got = np.array(rope(mx.array(x), offset=offset))
    inv = np.array(rope.inv_freq).astype(np.float64)
    expected = ref.rope(x.astype(np.float64), np.arange(offset, offset + 5), inv)
    np.testing.assert_allclose(got, expected * rope.attention_scale, atol=ATOL)


def test_rope_offset_array_per_batch():
    rope = RoPE(16, 1e4, None, 256)
    x = _rand((2, 2, 4, 16), 1)
    got = np.array(rope(mx.array(x), offset=mx.array([3, 10])))
    inv = ref.inv_freq(16, 1e4)
    for b, start in enumerate((3, 10)):
        expected = ref.rope(x[b].astype(np.float64), np.arange(start, start + 4), inv)
        np.testing.assert_allclose(got[b], expected, atol=ATOL)


def test_rotate_at_matches_call_and_arbitrary_positions():
    rope = RoPE(
        16, 1e4, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    )
    x = mx.array(_rand((1, 2, 6, 16), 2))
    consecutive = rope.rotate_at(x, mx.arange(9, 15))
    np.testing.assert_allclose(np.array(consecutive), np.array(rope(x, offset=9)), atol=ATOL)

    positions = np.array([5, 0, 17, 17, 3, 40])
    got = np.array(rope.rotate_at(x, mx.array(positions)))
    inv = np.array(rope.inv_freq).astype(np.float64)
    expected = ref.rope(np.array(x).astype(np.float64), positions, inv) * rope.attention_scale
    np.testing.assert_allclose(got, expected, atol=ATOL)
    with pytest.raises(ValueError, match="positions"):
        rope.rotate_at(x, mx.arange(5))


def test_yarn_logits_scale_by_mscale_squared():
    """T7: mscale on both q and k multiplies the logits by mscale**2 (spec §5.1)."""
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    rope = RoPE(16, 1e4, scaling, 256)
    q, k = mx.array(_rand((1, 1, 8, 16), 3)), mx.array(_rand((1, 1, 8, 16), 4))
    logits = np.array(rope(q) @ rope(k).swapaxes(-1, -2))
    unscaled = np.array(
        apply_rotary(q, mx.arange(8), rope.inv_freq)
        @ apply_rotary(k, mx.arange(8), rope.inv_freq).swapaxes(-1, -2)
    )
    assert rope.attention_scale == pytest.approx(0.1 * math.log(4) + 1)
    np.testing.assert_allclose(logits, unscaled * rope.attention_scale**2, rtol=1e-5, atol=1e-5)


def test_static_yarn_applies_to_short_inputs():
    """T10 (RoPE side): static YaRN changes even a 2-token input, unlike plain RoPE."""
    x = mx.array(_rand((1, 1, 2, 16), 5))
    yarn = RoPE(
        16, 1e4, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 256
    )
    plain = RoPE(16, 1e4, None, 256)
    assert not np.allclose(np.array(yarn(x)), np.array(plain(x)), atol=1e-3)
    assert yarn.rope_type == "yarn" and plain.rope_type == "default"


def test_rope_has_no_parameters_and_checks_shape():
    rope = RoPE(16, 1e4, QWEN2_YARN, 131072)
    assert not rope.parameters()  # inv_freq is not a checkpoint weight
    with pytest.raises(ValueError, match="shape"):
        rope(mx.zeros((1, 2, 3, 8)))


def test_rope_keeps_bfloat16():
    rope = RoPE(16, 1e4, None, 256)
    x = mx.array(_rand((1, 2, 3, 16), 6)).astype(mx.bfloat16)
    assert rope(x).dtype == mx.bfloat16 and rope.rotate_at(x, mx.arange(3)).dtype == mx.bfloat16


# ---------------------------------------------------------------- transformers parity (test-only)
def _hf_config(rope_parameters, max_positions):
    transformers = pytest.importorskip("transformers")
    return transformers.Qwen2Config(
        hidden_size=128 * 4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        rope_parameters=rope_parameters,
    )


@pytest.mark.parametrize(
    "params,max_positions",
    [
        (
            {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32768,
                "rope_theta": 1e6,
            },
            131072,
        ),
        # Qwen's documented snippet with max_position_embeddings 32768: factor stays 4.
        (
            {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32768,
                "rope_theta": 1e6,
            },
            32768,
        ),
        (
            {
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 4096,
                "rope_theta": 1e4,
                "beta_fast": 16,
                "beta_slow": 2,
                "truncate": False,
            },
            32768,
        ),
        (
            {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 4096,
                "rope_theta": 1e4,
                "attention_factor": 1.25,
            },
            16384,
        ),
        (
            {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 4096,
                "rope_theta": 1e4,
                "mscale": 1.0,
                "mscale_all_dim": 0.5,
            },
            16384,
        ),
        ({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}, 32768),
    ],
)
def test_frequencies_match_transformers(params, max_positions):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_inv, hf_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](
        _hf_config(dict(params), max_positions), "cpu"
    )
    inv, factor = rope_frequencies(128, params["rope_theta"], params, max_positions)
    np.testing.assert_allclose(np.array(inv), hf_inv.numpy(), rtol=2.5e-7)
    assert factor == pytest.approx(hf_factor, abs=1e-12)


@pytest.mark.parametrize(
    "params", [None, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}]
)
def test_rotation_matches_transformers_qwen2(params):
    torch = pytest.importorskip("torch")
    from transformers.models.qwen2 import modeling_qwen2 as hf

    rope_parameters = (
        {"rope_type": "default", "rope_theta": 1e4}
        if params is None
        else {**params, "rope_theta": 1e4}
    )
    config = _hf_config(rope_parameters, 256)
    rotary = hf.Qwen2RotaryEmbedding(config)
    q, k = _rand((1, 4, 9, 128), 7), _rand((1, 2, 9, 128), 8)
    positions = torch.arange(40, 49)[None]
    cos, sin = rotary(torch.from_numpy(q), positions)
    hf_q, hf_k = hf.apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(k), cos, sin)

    rope = RoPE(128, 1e4, params, 256)
    np.testing.assert_allclose(np.array(rope(mx.array(q), offset=40)), hf_q.numpy(), atol=ATOL)
    np.testing.assert_allclose(np.array(rope(mx.array(k), offset=40)), hf_k.numpy(), atol=ATOL)
