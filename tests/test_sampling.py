"""Tests for qwen2_mlx.sampling against transformers' logits processors/warpers.

Statistical checks use a fixed seed (so they are deterministic) and a per-category
bound of 5 binomial standard deviations, sqrt(p(1-p)/N): with <= 16 categories the
chance that a correct sampler would break it is < 1e-5 for any seed, while each test
also asserts that the wrong alternative (argmax-only, temperature ignored, temperature
applied last) is further away than the bound.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwen2_mlx.sampling import (
    SamplingParams,
    apply_logits_processors,
    filter_logits,
    logprobs_from_logits,
    make_logits_processors,
    make_sampler,
)

N_DRAWS = 4000
SIGMAS = 5.0


# --- references ----------------------------------------------------------------------------


def hf_filtered(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """transformers' warper chain (GenerationMixin order) on float32 logits."""
    keep = params.min_tokens_to_keep
    chain = LogitsProcessorList()
    if params.temperature != 1.0:
        chain.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        chain.append(TopKLogitsWarper(params.top_k, min_tokens_to_keep=keep))
    if params.top_p < 1.0:
        chain.append(TopPLogitsWarper(params.top_p, min_tokens_to_keep=keep))
    if params.min_p > 0.0:
        chain.append(MinPLogitsWarper(params.min_p, min_tokens_to_keep=keep))
    scores = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    dummy_ids = torch.zeros((scores.shape[0], 1), dtype=torch.long)
    return chain(dummy_ids, scores).numpy()


def softmax64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - np.max(x[np.isfinite(x)]))
    return e / e.sum()


def top_p_set_by_definition(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Smallest set of most probable tokens whose mass reaches top_p (distinct probs)."""
    order = np.argsort(-probs)
    mass = np.cumsum(probs[order])
    n_keep = int(np.searchsorted(mass, top_p) + 1)
    keep = np.zeros(probs.shape, dtype=bool)
    keep[order[:n_keep]] = True
    return keep


def draw_many(params: SamplingParams, row: np.ndarray, n: int = N_DRAWS) -> np.ndarray:
    """n independent draws for one logits row: the row repeated n times as a batch."""
    logits = mx.broadcast_to(mx.array(row, dtype=mx.float32)[None], (n, row.shape[-1]))
    out = make_sampler(params)(logits)
    assert out.shape == (n,)
    return np.array(out)


def assert_frequencies_match(samples: np.ndarray, probs: np.ndarray) -> None:
    n = samples.size
    freq = np.bincount(samples, minlength=probs.size) / n
    bound = SIGMAS * np.sqrt(probs * (1 - probs) / n)
    excess = np.abs(freq - probs) - bound
    assert np.all(excess <= 0), f"freq {np.round(freq, 4)} vs p {np.round(probs, 4)}"


def far_from(probs: np.ndarray, other: np.ndarray, n: int = N_DRAWS) -> bool:
    """True if `other` would break the frequency bound set by `probs`."""
    return bool(np.any(np.abs(other - probs) > SIGMAS * np.sqrt(probs * (1 - probs) / n)))


# --- parameter validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.1, "temperature must be a finite number >= 0"),
        ("temperature", math.nan, "temperature must be a finite number >= 0"),
        ("temperature", math.inf, "temperature must be a finite number >= 0"),
        ("temperature", "0.7", "temperature must be a finite number >= 0"),
        ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
        ("top_p", 1.01, r"top_p must be in \(0, 1\]"),
        ("top_p", -0.5, r"top_p must be in \(0, 1\]"),
        ("top_p", math.nan, r"top_p must be in \(0, 1\]"),
        ("top_k", -1, "top_k must be an int >= 0"),
        ("top_k", 2.0, "top_k must be an int >= 0"),
        ("top_k", True, "top_k must be an int >= 0"),
        ("min_p", -0.01, r"min_p must be in \[0, 1\]"),
        ("min_p", 1.5, r"min_p must be in \[0, 1\]"),
        ("min_p", math.nan, r"min_p must be in \[0, 1\]"),
        ("min_tokens_to_keep", 0, "min_tokens_to_keep must be an int >= 1"),
        ("min_tokens_to_keep", 2.0, "min_tokens_to_keep must be an int >= 1"),
        ("repetition_penalty", 0.0, "repetition_penalty must be a finite number > 0"),
        ("repetition_penalty", -1.2, "repetition_penalty must be a finite number > 0"),
        ("repetition_penalty", math.inf, "repetition_penalty must be a finite number > 0"),
        ("repetition_penalty", math.nan, "repetition_penalty must be a finite number > 0"),
        ("repetition_context_size", 0, "repetition_context_size must be an int >= 1"),
        ("repetition_context_size", 8.5, "repetition_context_size must be an int >= 1"),
        ("seed", -1, r"seed must be None or an int in \[0, 2\*\*64\)"),
        ("seed", 2**64, r"seed must be None or an int in \[0, 2\*\*64\)"),
        ("seed", 1.0, r"seed must be None or an int in \[0, 2\*\*64\)"),
    ],
)
def test_invalid_params_raise(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        SamplingParams(**{field: value})
    assert repr(value) in str(info.value)  # the message names the bad value


def test_boundary_params_are_valid() -> None:
    SamplingParams(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=0)
    SamplingParams(temperature=1e-4, top_p=1e-6, top_k=1, min_p=1.0, seed=2**64 - 1)
    assert SamplingParams().greedy and not SamplingParams(temperature=0.7).greedy


def test_bad_logits_shape_and_greedy_filter_raise() -> None:
    with pytest.raises(ValueError, match=r"shape \(batch, vocab\)"):
        make_sampler(SamplingParams(temperature=1.0))(mx.zeros((8,)))
    with pytest.raises(ValueError, match="floating dtype"):
        make_sampler(SamplingParams())(mx.zeros((2, 8), dtype=mx.int32))
    with pytest.raises(ValueError, match="temperature > 0"):
        filter_logits(mx.zeros((1, 8)), SamplingParams())


# --- greedy and top-k ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_greedy_is_argmax(dtype: mx.Dtype) -> None:
    rng = np.random.default_rng(0)
    logits = mx.array(rng.standard_normal((32, 300)).astype(np.float32)).astype(dtype)
    tokens = make_sampler(SamplingParams(top_k=3, top_p=0.5))(logits)  # filters ignored
    assert tokens.shape == (32,) and tokens.dtype in (mx.uint32, mx.int32)
    expected = np.argmax(np.array(logits.astype(mx.float32)), axis=-1)
    np.testing.assert_array_equal(np.array(tokens), expected)


def test_top_k_1_sampling_equals_greedy() -> None:
    rng = np.random.default_rng(1)
    sample = make_sampler(SamplingParams(temperature=0.7, top_k=1, seed=11))
    for _ in range(5):
        logits = mx.array(rng.standard_normal((256, 500)).astype(np.float32) * 3)
        greedy = np.argmax(np.array(logits), axis=-1)
        np.testing.assert_array_equal(np.array(sample(logits)), greedy)


# --- filters: exact parity with transformers ----------------------------------------------

FILTER_CASES = [
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_k=1000),  # k > vocab is clipped
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=0.6, top_p=0.3, min_tokens_to_keep=4),
    SamplingParams(temperature=1.5, min_p=0.1),
    SamplingParams(temperature=0.8, min_p=0.5, min_tokens_to_keep=3),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.8),  # Qwen2-Instruct's recommendation
    SamplingParams(temperature=2.0, top_k=30, top_p=0.95, min_p=0.05, min_tokens_to_keep=2),
    SamplingParams(temperature=0.5, top_p=1e-6),  # keeps only the argmax
    SamplingParams(temperature=1.1, min_p=1.0),
    SamplingParams(temperature=0.9, top_k=2, min_tokens_to_keep=5),  # keep wins over k
]


@pytest.mark.parametrize("params", FILTER_CASES, ids=str)
def test_filter_logits_matches_transformers(params: SamplingParams) -> None:
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((16, 200)) * 2.5).astype(np.float32)
    assert all(np.unique(row).size == row.size for row in x)  # no ties: exact parity applies
    ours = filter_logits(mx.array(x), params)
    assert ours.dtype == mx.float32
    np.testing.assert_array_equal(np.array(ours), hf_filtered(x, params))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_filter_logits_upcasts_half_precision(dtype: mx.Dtype) -> None:
    rng = np.random.default_rng(4)
    logits = mx.array((rng.standard_normal((16, 200)) * 2.5).astype(np.float32)).astype(dtype)
    params = FILTER_CASES[-4]
    ours = filter_logits(logits, params)
    assert ours.dtype == mx.float32
    as_f32 = logits.astype(mx.float32)  # exact
    np.testing.assert_array_equal(np.array(ours), np.array(filter_logits(as_f32, params)))


@pytest.mark.parametrize(("row", "cut"), [([0.0, 1.0], 0), ([0.3, -1.2, 2.0], 1)])
def test_top_p_removes_tokens_whose_cumulative_mass_equals_one_minus_top_p(
    row: list[float], cut: int
) -> None:
    # TopPLogitsWarper removes sorted tokens with cumulative probability <= 1 - top_p, so
    # a cumulative mass exactly on the boundary is removed. Choose top_p = 1 - cum[cut].
    x = np.array([row], np.float32)
    ascending = torch.from_numpy(np.sort(x, axis=-1))
    cumulative = ascending.softmax(-1).cumsum(-1).numpy()[0]
    ours_cumulative = np.array(mx.cumsum(mx.softmax(mx.array(np.sort(x)), axis=-1), axis=-1))
    assert ours_cumulative[0, cut] == cumulative[cut]  # premise: same float32 value
    params = SamplingParams(temperature=1.0, top_p=1.0 - float(cumulative[cut]))
    reference = hf_filtered(x, params)
    assert np.isfinite(reference).sum() == x.size - cut - 1  # the boundary token is gone
    np.testing.assert_array_equal(np.array(filter_logits(mx.array(x), params)), reference)


def test_filters_keep_boundary_ties_together() -> None:
    # transformers splits a tie group at a top-p / min_tokens_to_keep cut in torch's
    # (unstable) sort order; we keep the whole group. Check: our kept set is transformers'
    # plus only tokens tied with one transformers keeps, and the kept values are equal.
    rng = np.random.default_rng(3)
    cases = [
        SamplingParams(temperature=0.9, top_p=0.5),
        SamplingParams(temperature=1.2, top_p=0.3, min_tokens_to_keep=3),
        SamplingParams(temperature=0.7, min_p=0.3, min_tokens_to_keep=4),
        SamplingParams(temperature=1.0, top_k=4, top_p=0.6, min_p=0.1, min_tokens_to_keep=2),
    ]
    extra_seen = 0
    for params in cases:
        x = np.round(rng.standard_normal((64, 40)) * 2).astype(np.float32)  # many ties
        ours = np.array(filter_logits(mx.array(x), params))
        ref = hf_filtered(x, params)
        kept, ref_kept = np.isfinite(ours), np.isfinite(ref)
        assert np.all(kept[ref_kept])
        np.testing.assert_array_equal(ours[ref_kept], ref[ref_kept])
        for row in range(x.shape[0]):
            extra = kept[row] & ~ref_kept[row]
            extra_seen += int(extra.sum())
            assert np.all(np.isin(x[row, extra], x[row, ref_kept[row]]))
    assert extra_seen > 0  # the ties really hit the cuts
    # Hand case: three tied maxima and top_p tiny -> all three survive.
    x = mx.array([[2.0, 0.0, 2.0, 2.0, -1.0]])
    kept = np.isfinite(np.array(filter_logits(x, SamplingParams(temperature=1.0, top_p=0.01))))
    np.testing.assert_array_equal(kept, [[True, False, True, True, False]])


# --- sampling: support and distribution ----------------------------------------------------

# Distinct logits with a few large ones; V = 12.
ROW = np.array([2.1, 0.3, 1.7, -0.4, 1.2, -2.0, 0.9, 2.4, -1.1, 0.0, 1.5, -0.7], np.float32)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=4, seed=1),
        SamplingParams(temperature=0.8, top_p=0.7, seed=2),
        SamplingParams(temperature=1.4, min_p=0.3, seed=3),
        SamplingParams(temperature=0.9, top_k=6, top_p=0.9, min_p=0.1, seed=4),
    ],
    ids=str,
)
def test_draws_stay_in_allowed_set_with_renormalised_probs(params: SamplingParams) -> None:
    allowed = np.isfinite(hf_filtered(ROW[None], params)[0])
    # Independent check of the support from the definitions (numpy, float64).
    probs_t = softmax64(ROW / params.temperature)
    by_definition = np.ones(ROW.size, dtype=bool)
    if params.top_k:
        by_definition &= ROW >= np.sort(ROW)[-params.top_k]
    if params.top_p < 1.0:
        by_definition &= top_p_set_by_definition(
            softmax64(np.where(by_definition, ROW, -np.inf) / params.temperature), params.top_p
        )
    if params.min_p:
        by_definition &= probs_t >= params.min_p * probs_t.max()
    np.testing.assert_array_equal(allowed, by_definition)
    assert 2 <= allowed.sum() < ROW.size  # a real, non-trivial filter

    samples = draw_many(params, ROW)
    assert np.all(allowed[samples]), "sampled a filtered-out token"
    expected = np.where(allowed, probs_t, 0.0)
    expected /= expected.sum()
    assert_frequencies_match(samples, expected)
    # An argmax-only sampler would fail the same bound.
    assert far_from(expected, np.eye(ROW.size)[np.argmax(ROW)])


def test_top_k_allowed_set_is_k_largest() -> None:
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((64, 100)).astype(np.float32)
    sample = make_sampler(SamplingParams(temperature=3.0, top_k=7, seed=5))
    top7 = np.argsort(-logits, axis=-1)[:, :7]
    for _ in range(20):
        tokens = np.array(sample(mx.array(logits)))
        assert all(tokens[i] in top7[i] for i in range(64))


def test_temperature_is_applied_before_top_p() -> None:
    # Logits where the order matters: scaling by T=2 first flattens the distribution, so
    # top_p=0.8 keeps more tokens than with temperature last (mlx-lm / llama.cpp order).
    row = np.array([3.0, 2.0, 1.0, 0.0, -1.0, -2.0], np.float32)
    params = SamplingParams(temperature=2.0, top_p=0.8, seed=6)
    first = top_p_set_by_definition(softmax64(row / 2.0), 0.8)
    last = top_p_set_by_definition(softmax64(row), 0.8)
    assert first.sum() > last.sum()
    samples = draw_many(params, row)
    assert np.all(first[samples])
    assert np.any(~last[samples]), "never drew a token only the temperature-first set allows"
    expected = np.where(first, softmax64(row / 2.0), 0.0)
    expected /= expected.sum()
    assert_frequencies_match(samples, expected)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_temperature_frequencies_match_softmax(temperature: float) -> None:
    row = np.array([1.0, 0.2, -0.5, 0.7, -1.5, 0.0], np.float32)
    samples = draw_many(SamplingParams(temperature=temperature, seed=7), row, n=8000)
    expected = softmax64(row / temperature)
    assert_frequencies_match(samples, expected)
    if temperature != 1.0:  # the bound can tell this temperature from T = 1
        assert far_from(expected, softmax64(row), n=8000)


# --- seeding -------------------------------------------------------------------------------


def _sequence(params: SamplingParams, logits: mx.array, steps: int = 6) -> np.ndarray:
    sample = make_sampler(params)
    return np.stack([np.array(sample(logits)) for _ in range(steps)])


def test_seed_reproducible_and_independent_of_global_state() -> None:
    logits = mx.zeros((64, 1000))  # uniform: every draw is pure randomness
    params = SamplingParams(temperature=1.0, seed=1234)
    first = _sequence(params, logits)
    mx.random.seed(999)
    mx.random.uniform(shape=(10,))  # advance the global state
    second = _sequence(params, logits)
    np.testing.assert_array_equal(first, second)
    assert len({row.tobytes() for row in first}) == len(first)  # each call uses a new key
    other = _sequence(SamplingParams(temperature=1.0, seed=1235), logits)
    assert not np.array_equal(first, other)


def test_unseeded_sampler_uses_global_random_state() -> None:
    logits = mx.zeros((64, 1000))
    params = SamplingParams(temperature=1.0)
    mx.random.seed(42)
    first = _sequence(params, logits, steps=3)
    mx.random.seed(42)
    np.testing.assert_array_equal(first, _sequence(params, logits, steps=3))
    mx.random.seed(43)
    assert not np.array_equal(first, _sequence(params, logits, steps=3))


# --- repetition penalty --------------------------------------------------------------------


def hf_repetition_penalty(ids: np.ndarray, logits: np.ndarray, penalty: float) -> np.ndarray:
    ids_t = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
    if ids_t.ndim == 1:
        ids_t = ids_t[None].expand(logits.shape[0], -1)
    scores = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    return RepetitionPenaltyLogitsProcessor(penalty)(ids_t, scores).numpy()


HISTORY = np.array([4, 17, 4, 0, 29, 17, 17, 8, 3, 25, 4, 12], np.int64)  # repeats


@pytest.mark.parametrize("penalty", [1.3, 0.7])
@pytest.mark.parametrize("context_size", [1, 5, 12, 64])
def test_repetition_penalty_matches_transformers(penalty: float, context_size: int) -> None:
    rng = np.random.default_rng(8)
    logits = (rng.standard_normal((3, 30)) * 2).astype(np.float32)  # both signs
    params = SamplingParams(repetition_penalty=penalty, repetition_context_size=context_size)
    processors = make_logits_processors(params)
    assert len(processors) == 1
    ours = apply_logits_processors(processors, mx.array(HISTORY), mx.array(logits))
    expected = hf_repetition_penalty(HISTORY[-context_size:], logits, penalty)
    np.testing.assert_array_equal(np.array(ours), expected)


def test_repetition_window_limits_penalised_tokens() -> None:
    logits = np.full((1, 30), 2.0, np.float32)
    logits[0, ::2] = -2.0
    params = SamplingParams(repetition_penalty=2.0, repetition_context_size=3)
    (process,) = make_logits_processors(params)
    out = np.array(process(mx.array(HISTORY), mx.array(logits)))[0]
    window = set(HISTORY[-3:].tolist())  # {25, 4, 12}
    changed = set(np.flatnonzero(out != logits[0]).tolist())
    assert changed == window
    assert out[29] == 2.0 and out[0] == -2.0  # in the history, outside the window
    np.testing.assert_array_equal(out[[4, 12, 25]], [-4.0, -4.0, 1.0])


def test_repetition_penalty_edge_cases() -> None:
    rng = np.random.default_rng(9)
    logits = (rng.standard_normal((2, 20)) * 2).astype(np.float32)
    (process,) = make_logits_processors(SamplingParams(repetition_penalty=1.5))
    # Ids outside the vocab (embedding table larger than lm_head) are ignored, as in HF.
    ids = np.array([3, 25, 3, 7, 40], np.int64)  # 25, 40 >= V = 20
    expected = hf_repetition_penalty(ids, logits, 1.5)
    np.testing.assert_array_equal(np.array(process(mx.array(ids), mx.array(logits))), expected)
    # Per-row 2-D histories match HF's batched input_ids.
    ids2 = np.array([[1, 2, 2, 7], [7, 7, 0, 19]], np.int64)
    expected2 = hf_repetition_penalty(ids2, logits, 1.5)
    np.testing.assert_array_equal(np.array(process(mx.array(ids2), mx.array(logits))), expected2)
    # bf16 logits are processed in float32.
    bf16 = mx.array(logits).astype(mx.bfloat16)
    out = process(mx.array(ids), bf16)
    assert out.dtype == mx.float32
    expected_bf16 = hf_repetition_penalty(ids, np.array(bf16.astype(mx.float32)), 1.5)
    np.testing.assert_array_equal(np.array(out), expected_bf16)
    # Empty history leaves logits unchanged; penalty 1.0 means no processor.
    empty = mx.array(np.zeros((0,), np.int32))
    np.testing.assert_array_equal(np.array(process(empty, mx.array(logits))), logits)
    assert make_logits_processors(SamplingParams(repetition_penalty=1.0)) == []
    with pytest.raises(ValueError, match="one row per logits row"):
        process(mx.array(np.zeros((3, 4), np.int32)), mx.array(logits))


# --- logprobs ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_logprobs_from_logits_matches_log_softmax(dtype: mx.Dtype) -> None:
    rng = np.random.default_rng(10)
    logits = mx.array((rng.standard_normal((4, 500)) * 8).astype(np.float32)).astype(dtype)
    ours = logprobs_from_logits(logits)
    assert ours.dtype == mx.float32
    reference = torch.log_softmax(
        torch.from_numpy(np.array(logits.astype(mx.float32))).double(), dim=-1
    ).numpy()
    np.testing.assert_allclose(np.array(ours), reference, rtol=0, atol=2e-5)
