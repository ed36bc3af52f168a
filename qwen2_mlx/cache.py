"""Key/value caches for incremental decoding.

`KVCache` preallocates its buffers in steps of `step` positions and writes new keys into a
slice, so decoding does not concatenate (and copy) the whole cache for every token.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx


class KVCache:
    """A per-layer cache of rotated keys and values, shaped (B, kv_heads, positions, head_dim)."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append `keys`/`values` (B, H, L, D) and return everything cached so far."""
        prev = self.offset
        needed = prev + keys.shape[2]
        if self.keys is None or needed > self.keys.shape[2]:
            self._grow(keys, values, needed)
        self.offset = needed
        self.keys[..., prev:needed, :] = keys
        self.values[..., prev:needed, :] = values
        return self.keys[..., :needed, :], self.values[..., :needed, :]

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        B, H, _, Dk = keys.shape
        Dv = values.shape[3]
        capacity = ((needed + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((B, H, capacity, Dk), keys.dtype)
        new_v = mx.zeros((B, H, capacity, Dv), values.dtype)
        if self.keys is not None and self.offset > 0:
            new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_k, new_v

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        """The cached keys and values, trimmed to `offset` (empty when nothing is cached)."""
        if self.keys is None or self.offset == 0:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, value: tuple[mx.array, mx.array] | tuple[()]) -> None:
        if not value:
            self.keys = self.values = None
            self.offset = 0
            return
        keys, values = value
        self.keys, self.values = keys, values
        self.offset = keys.shape[2]

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Forget the last `n` positions (e.g. rejected draft tokens); returns how many went."""
        n = min(max(n, 0), self.offset)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


def save_cache(
    path: str | Path, caches: list[KVCache], metadata: dict[str, str] | None = None
) -> None:
    """Write per-layer cache states to a safetensors file (atomically)."""
    arrays: dict[str, mx.array] = {}
    for i, cache in enumerate(caches):
        state = cache.state
        if state:
            arrays[f"{i}.keys"], arrays[f"{i}.values"] = state
    meta = dict(metadata or {})
    meta["num_layers"] = str(len(caches))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata=meta)
    tmp.replace(path)


def load_cache(path: str | Path) -> tuple[list[KVCache], dict[str, str]]:
    """Read caches written by `save_cache`; returns (caches, metadata)."""
    arrays, meta = mx.load(str(path), return_metadata=True)
    num_layers = int(meta.pop("num_layers"))
    caches = [KVCache() for _ in range(num_layers)]
    for i, cache in enumerate(caches):
        if f"{i}.keys" in arrays:
            cache.state = (arrays[f"{i}.keys"], arrays[f"{i}.values"])
    return caches, meta
