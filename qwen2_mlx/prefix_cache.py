"""A prefix cache: KV states of earlier sequences, found by the token ids they start with.

A chat client re-sends the whole conversation every turn, and many requests share one system
prompt; the keys and values of a shared prefix are the same whoever computed them (attention is
causal), so a new request can start from a stored sequence's first k positions and prefill only
the rest. Entries are kept in a trie over token ids: a lookup walks the query down the trie as
far as it matches, and any entry below that point shares exactly that many leading tokens with
it (an entry longer than the query is used cut to the common prefix; a shorter one whole).

Memory is bounded by `max_bytes` (the entries' own bytes: each entry is a contiguous copy, never
a view into a larger buffer), evicting the least recently used entries first. An entry that
another one extends (the previous turn of a conversation) is dropped when the longer one
arrives: it would never be the better match again.

Entries are immutable: `lookup` returns the stored arrays, and `batch_cache.cache_from_state`
builds a request's cache over new array objects whose first write copies into a fresh buffer,
so no request ever writes into an entry another request is reading. The cache is used by one
thread (the server's engine) and takes no locks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from qwen2_mlx.batch_cache import LayerState, state_nbytes, state_positions


@dataclass
class PrefixCacheEntry:
    """One stored sequence: its token ids and per-layer KV states (one row each)."""

    tokens: tuple[int, ...]
    state: list[LayerState]
    nbytes: int


@dataclass
class PrefixMatch:
    """A lookup's result: `tokens` leading positions of `entry` can be reused."""

    entry: PrefixCacheEntry
    tokens: int


class _Node:
    __slots__ = ("children", "entry", "count")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.entry: PrefixCacheEntry | None = None
        self.count = 0  # entries at or below this node


class PrefixCache:
    """Token-id trie of KV states with a byte budget and LRU eviction (module docstring)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._root = _Node()
        self._lru: OrderedDict[int, PrefixCacheEntry] = OrderedDict()  # id(entry) -> entry
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._lru)

    def lookup(self, tokens: Sequence[int], limit: int | None = None) -> PrefixMatch | None:
        """The entry sharing the longest prefix with `tokens`, and how many of its positions
        to reuse (at most `limit`, default all but the last token: a forward pass needs one
        new token to produce logits). None when nothing useful is stored."""
        limit = len(tokens) - 1 if limit is None else min(limit, len(tokens))
        node, depth = self._root, 0
        while depth < limit and tokens[depth] in node.children:
            node = node.children[tokens[depth]]
            depth += 1
        entry = _any_entry(node) if depth else None
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._lru.move_to_end(id(entry))
        return PrefixMatch(entry, depth)

    def insert(self, tokens: Sequence[int], state: list[LayerState]) -> bool:
        """Store `state` (contiguous, evaluated arrays, one row per layer) for `tokens`.

        Returns False when it is not stored: larger than the whole budget, or already covered
        by a stored entry that extends it.
        """
        tokens = tuple(int(t) for t in tokens)
        if state_positions(state) != len(tokens):
            raise ValueError(f"{len(tokens)} token ids for a state of "
                             f"{state_positions(state)} positions")
        nbytes = state_nbytes(state)
        if not tokens or nbytes > self.max_bytes:
            return False
        path = [self._root]
        for t in tokens:
            node = path[-1].children.get(t)
            if node is None:
                break
            path.append(node)
        if len(path) == len(tokens) + 1 and path[-1].count:
            return False  # an entry equal to or extending this one is stored
        for node in path[1:]:
            if node.entry is not None:  # a shorter entry this one extends: never better again
                self._remove(node.entry)
        entry = PrefixCacheEntry(tokens, state, nbytes)
        node = self._root
        node.count += 1
        for t in tokens:
            node = node.children.setdefault(t, _Node())
            node.count += 1
        node.entry = entry
        self._lru[id(entry)] = entry
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            self.evictions += 1
            self._remove(next(iter(self._lru.values())))
        return True

    def clear(self) -> None:
        for entry in list(self._lru.values()):
            self._remove(entry)

    def _remove(self, entry: PrefixCacheEntry) -> None:
        del self._lru[id(entry)]
        self.nbytes -= entry.nbytes
        node = self._root
        node.count -= 1
        for t in entry.tokens:
            child = node.children[t]
            child.count -= 1
            if child.count == 0:
                del node.children[t]  # nothing else below: drop the whole branch
                return
            node = child
        node.entry = None


def _any_entry(node: _Node) -> PrefixCacheEntry | None:
    """An entry at or below `node` (each shares the path to `node` with the query)."""
    while node.entry is None:
        if not node.children:
            return None
        node = next(iter(node.children.values()))
    return node.entry
