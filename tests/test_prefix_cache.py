"""The prefix cache's trie, byte budget and LRU order, on synthetic states whose values say
which position (and entry) they came from."""

from __future__ import annotations

import mlx.core as mx
import pytest

from qwen2_mlx.prefix_cache import PrefixCache

LAYERS, HEADS, DIM = 2, 1, 4
BYTES_PER_TOKEN = LAYERS * 2 * HEADS * DIM * 4  # keys and values, float32


def _state(n: int, tag: float = 0.0):
    """Layer states for n positions: position i holds i + tag."""
    keys = (mx.arange(n, dtype=mx.float32) + tag).reshape(1, 1, n, 1) * mx.ones((DIM,))
    return [(keys, keys + 0.5) for _ in range(LAYERS)]


def test_lookup_finds_the_longest_shared_prefix():
    cache = PrefixCache(1 << 20)
    cache.insert([1, 2, 3, 4, 5], _state(5, tag=100))
    cache.insert([1, 2, 9], _state(3, tag=200))
    match = cache.lookup([1, 2, 3, 4, 5, 6, 7])  # extends the first entry
    assert match.tokens == 5 and match.entry.tokens == (1, 2, 3, 4, 5)
    match = cache.lookup([1, 2, 3, 7])  # shares 3 tokens with the first, 2 with the second
    assert match.tokens == 3 and match.entry.tokens[:3] == (1, 2, 3)
    assert cache.lookup([1, 2, 9, 9]).entry.tokens == (1, 2, 9)
    assert cache.lookup([5, 1, 2]) is None
    assert (cache.hits, cache.misses) == (3, 1)


def test_lookup_leaves_the_last_token_to_compute():
    """A forward pass needs one new token for its logits: an exact match reuses all but it."""
    cache = PrefixCache(1 << 20)
    cache.insert([1, 2, 3, 4], _state(4))
    assert cache.lookup([1, 2, 3, 4]).tokens == 3
    assert cache.lookup([1, 2]).tokens == 1
    assert cache.lookup([1]) is None
    assert cache.lookup([1, 2, 3, 4], limit=4).tokens == 4


def test_a_longer_entry_replaces_the_one_it_extends():
    """The next turn of a conversation extends the previous one: one entry remains."""
    cache = PrefixCache(1 << 20)
    cache.insert([1, 2, 3], _state(3))
    cache.insert([1, 2, 3, 4, 5], _state(5))
    assert len(cache) == 1 and cache.nbytes == 5 * BYTES_PER_TOKEN
    assert not cache.insert([1, 2, 3], _state(3))  # already covered by the longer one
    assert len(cache) == 1


def test_byte_budget_evicts_least_recently_used():
    cache = PrefixCache(10 * BYTES_PER_TOKEN)
    cache.insert([1, 1, 1, 1], _state(4, tag=1))
    cache.insert([2, 2, 2, 2], _state(4, tag=2))
    cache.lookup([1, 1, 1, 1, 7])  # entry 1 is now the most recently used
    cache.insert([3, 3, 3, 3], _state(4, tag=3))  # 12 tokens > 10: the LRU one (2) goes
    assert cache.evictions == 1 and len(cache) == 2
    assert cache.nbytes == 8 * BYTES_PER_TOKEN <= cache.max_bytes
    assert cache.lookup([2, 2, 2]) is None
    assert cache.lookup([1, 1, 1]).entry.tokens == (1, 1, 1, 1)
    assert not cache.insert([4] * 11, _state(11))  # larger than the whole budget
    assert len(cache) == 2


def test_an_evicted_branch_no_longer_hides_a_shorter_match():
    cache = PrefixCache(8 * BYTES_PER_TOKEN)
    cache.insert([1, 2, 3, 4], _state(4))
    cache.insert([1, 2, 9], _state(3))
    cache.insert([5, 5], _state(2))  # 9 tokens > 8: [1, 2, 3, 4] goes
    match = cache.lookup([1, 2, 3, 4, 5])
    assert match.entry.tokens == (1, 2, 9) and match.tokens == 2


def test_entries_keep_their_values_and_the_trie_empties():
    cache = PrefixCache(100 * BYTES_PER_TOKEN)
    cache.insert([7, 8, 9], _state(3, tag=10))
    match = cache.lookup([7, 8, 9, 1])
    assert match.entry.state[1][0][0, 0, :, 0].tolist() == [10.0, 11.0, 12.0]
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0 and cache.lookup([7, 8, 9, 1]) is None


def test_state_must_match_tokens():
    with pytest.raises(ValueError, match="3 token ids for a state of 2 positions"):
        PrefixCache(1 << 20).insert([1, 2, 3], _state(2))
