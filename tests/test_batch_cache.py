"""The batched, left-padded KV cache: a batch's greedy tokens equal each row decoded alone.

The reference is the single-sequence path (`Model.__call__` on a `ModelCache`), itself checked
against transformers in test_model.py; float32 makes "equal" exact (the reference BLAS sums
each output element in the same order whatever the batch size).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from qwen2_mlx.batch_cache import BatchCache, cache_from_state, copy_state, state_positions
from qwen2_mlx.loader import load_model

STEPS = 12


def _alone(model, prompt: list[int], steps: int, kv_bits=None) -> list[int]:
    cache = model.make_cache(kv_bits=kv_bits)
    logits = model(mx.array([prompt]), cache=cache)
    out = []
    for _ in range(steps):
        token = mx.argmax(logits[:, -1], axis=-1)
        out.append(token.item())
        logits = model(token[None], cache=cache)
    return out


def _prefilled(model, prompt: list[int], kv_bits=None):
    """Per-layer states of `prompt` but its last token (which the batch feeds)."""
    cache = model.make_cache(kv_bits=kv_bits)
    model(mx.array([prompt[:-1]]), cache=cache)
    return [layer.state for layer in cache], getattr(cache[0], "group_size", 64)


def _batched(model, prompts, steps: int, kv_bits=None, join_at: int = 3) -> list[list[int]]:
    """Greedy decoding in one batch: the first half of the prompts start together, the others
    join after `join_at` steps; a row leaves when it has `steps` tokens (rows start at
    different times, so they leave at different times and the batch shrinks)."""
    first, later = list(range(len(prompts) // 2)), list(range(len(prompts) // 2, len(prompts)))
    states = [_prefilled(model, prompts[i], kv_bits) for i in first]
    group = states[0][1]
    batch = BatchCache.from_rows([s for s, _ in states], bits=kv_bits, group_size=group)
    rows = list(first)
    nxt = [prompts[i][-1] for i in first]
    outs: list[list[int]] = [[] for _ in prompts]
    step = 0
    while rows:
        if step == join_at:
            batch.add_rows([_prefilled(model, prompts[i], kv_bits)[0] for i in later])
            rows += later
            nxt += [prompts[i][-1] for i in later]
        logits = model(mx.array([[t] for t in nxt]), cache=batch)
        tokens = mx.argmax(logits[:, -1], axis=-1).tolist()
        keep = []
        for r, (i, t) in enumerate(zip(rows, tokens, strict=True)):
            outs[i].append(t)
            if len(outs[i]) < steps:
                keep.append(r)
        if keep and len(keep) < len(rows):
            batch.keep_rows(keep)
        rows, nxt = [rows[r] for r in keep], [tokens[r] for r in keep]
        step += 1
    return outs


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 500, size=n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model(checkpoint_factory):
    return load_model(checkpoint_factory(hidden_size=128, num_heads=4, num_kv_heads=2))


@pytest.fixture(scope="module")
def sliding_model(checkpoint_factory):
    # Every layer slides (max_window_layers=0) over a window shorter than the sequences.
    return load_model(checkpoint_factory(hidden_size=128, num_heads=4, num_kv_heads=2,
                                         sliding_window=8, max_window_layers=0))


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_batched_greedy_equals_each_row_alone(model, kv_bits):
    prompts = _prompts((3, 17, 9, 30, 2, 12))
    expected = [_alone(model, p, STEPS, kv_bits) for p in prompts]
    assert _batched(model, prompts, STEPS, kv_bits) == expected


def test_batched_sliding_window_equals_alone(sliding_model):
    prompts = _prompts((3, 17, 9, 30), seed=1)
    expected = [_alone(sliding_model, p, STEPS) for p in prompts]
    assert _batched(sliding_model, prompts, STEPS) == expected


def test_padding_is_masked_and_positions_are_per_row(model):
    """A long row next to a short one: the short row's padding is many columns, so a mask
    or RoPE offset that ignored it would change its tokens."""
    prompts = _prompts((40, 2), seed=2)
    expected = [_alone(model, p, STEPS) for p in prompts]
    states = [_prefilled(model, p)[0] for p in prompts]
    batch = BatchCache.from_rows(states)
    assert batch.padding == [0, 38]
    nxt, outs = [p[-1] for p in prompts], [[], []]
    for _ in range(STEPS):
        tokens = mx.argmax(model(mx.array([[t] for t in nxt]), cache=batch)[:, -1], -1).tolist()
        for out, t in zip(outs, tokens, strict=True):
            out.append(t)
        nxt = tokens
    assert outs == expected


def test_row_states_round_trip_and_keep_rows_trims_padding(model):
    prompts = _prompts((5, 9, 3), seed=3)
    states = [_prefilled(model, p)[0] for p in prompts]
    batch = BatchCache.from_rows(states)
    assert batch.padding == [4, 0, 6] and batch.columns == 8
    for row, state in enumerate(states):
        out = batch.row_states(row)
        for (k, v), (k0, v0) in zip(out, state, strict=True):
            assert mx.array_equal(k, k0) and mx.array_equal(v, v0)
    batch.keep_rows([2, 0])  # the longest row leaves: the columns padded in both go
    assert batch.padding == [2, 0] and batch.columns == 4
    assert mx.array_equal(batch.row_states(0)[0][0], states[2][0][0])


def test_cache_from_state_never_writes_into_the_state(model):
    """A prefix-cache entry handed to a request stays as it was after the request writes."""
    state = copy_state(_prefilled(model, _prompts((10,), seed=4)[0])[0])
    before = [np.array(k) for k, _ in state]
    cache = cache_from_state(state, list(range(6)))  # the first 6 positions
    assert cache.offset == 6 and state_positions(state) == 9
    model(mx.array([[1, 2]]), cache=cache)  # writes positions 6 and 7, which the state holds
    mx.eval([c.state for c in cache])
    for (k, _), b in zip(state, before, strict=True):
        assert np.array_equal(np.array(k), b)
