"""Key/value caches for incremental decoding.

`KVCache` keeps keys and values in preallocated buffers and writes new positions into a
slice, so decoding does not concatenate (and copy) the whole cache for every token. Buffers
grow in blocks of at least `step` positions and at least 1/8 of what they hold, so a
131K-token prefill copies the cache a bounded number of times (amortised O(n), not O(n^2));
`reserve(n)` sizes them once when the final length is known.

`QuantizedKVCache` stores keys and values with MLX's 8-bit affine quantization (about half
the bytes of bfloat16), and hands attention dequantized copies of one layer at a time.

A cache remembers the attention `mode` that wrote it ("standard" or "dca"): DCA stores keys
already rotated at chunk-relative positions, so a cache cannot change mode mid-sequence.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx


class KVCache:
    """A per-layer cache of rotated keys and values, shaped (B, kv_heads, positions, head_dim)."""

    step = 256

    def __init__(self, mode: str = "standard") -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self.mode = mode
        # Total prompt length of the sequence being prefilled (DCA's length temperature
        # is taken from the whole prompt even when it is prefilled in steps).
        self.prompt_length = 0
        self._reserved = 0

    def reserve(self, positions: int) -> None:
        """Make room for `positions` in total at the next write, in one allocation."""
        self._reserved = max(self._reserved, positions)

    def _capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _capacity_for(self, needed: int) -> int:
        current = self._capacity()
        target = max(needed, current + max(self.step, current // 8), self._reserved)
        return ((target + self.step - 1) // self.step) * self.step

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append `keys`/`values` (B, H, L, D) and return everything cached so far."""
        prev = self.offset
        needed = prev + keys.shape[2]
        if needed > self._capacity():
            capacity = self._capacity_for(needed)
            self.keys = self._grow(self.keys, keys, capacity)
            self.values = self._grow(self.values, values, capacity)
        self.offset = needed
        self.keys[..., prev:needed, :] = keys
        self.values[..., prev:needed, :] = values
        return self.keys[..., :needed, :], self.values[..., :needed, :]

    def _grow(self, buffer: mx.array | None, new: mx.array, capacity: int) -> mx.array:
        B, H, _, D = new.shape
        grown = mx.zeros((B, H, capacity, D), new.dtype)
        if buffer is not None and self.offset > 0:
            grown[..., : self.offset, :] = buffer[..., : self.offset, :]
        return grown

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
        """Bytes held by the cached positions."""
        return sum(a.nbytes for a in self.state)


class QuantizedKVCache(KVCache):
    """A KV cache stored with affine quantization (`bits`, `group_size` along head_dim).

    Each stored tensor is the triple (packed uint32, scales, biases) that `mx.quantize`
    returns; `update_and_fetch` returns dequantized keys and values in the input dtype.
    """

    def __init__(self, bits: int = 8, group_size: int = 64, mode: str = "standard") -> None:
        if bits not in (4, 8):
            raise ValueError(f"KV cache bits must be 4 or 8, got {bits}")
        if group_size not in (32, 64, 128):
            raise ValueError(f"KV cache group_size must be 32, 64 or 128, got {group_size}")
        super().__init__(mode)
        self.bits = bits
        self.group_size = group_size
        self._dtype = mx.float32

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = self._append(keys, values)
        return self._dequantize(self.keys, n), self._dequantize(self.values, n)

    def update_and_fetch_quantized(
        self, keys: mx.array, values: mx.array
    ) -> tuple[tuple[mx.array, ...], tuple[mx.array, ...]]:
        """Append, and return the cached (packed, scales, biases) triples as stored, for an
        attention that reads the quantized cache directly."""
        n = self._append(keys, values)
        return (tuple(p[..., :n, :] for p in self.keys),
                tuple(p[..., :n, :] for p in self.values))

    def _append(self, keys: mx.array, values: mx.array) -> int:
        if keys.shape[-1] % self.group_size:
            raise ValueError(
                f"head_dim {keys.shape[-1]} is not a multiple of the KV group size "
                f"{self.group_size}"
            )
        self._dtype = keys.dtype
        prev = self.offset
        needed = prev + keys.shape[2]
        new_k = mx.quantize(keys, group_size=self.group_size, bits=self.bits)
        new_v = mx.quantize(values, group_size=self.group_size, bits=self.bits)
        if needed > self._capacity():
            capacity = self._capacity_for(needed)
            self.keys = tuple(self._grow(b, n, capacity) for b, n in
                              zip(self.keys or (None,) * 3, new_k, strict=True))
            self.values = tuple(self._grow(b, n, capacity) for b, n in
                                zip(self.values or (None,) * 3, new_v, strict=True))
        self.offset = needed
        for buffer, part in zip(self.keys + self.values, new_k + new_v, strict=True):
            buffer[..., prev:needed, :] = part
        return needed

    def _capacity(self) -> int:
        return 0 if self.keys is None else self.keys[0].shape[2]

    def _dequantize(self, parts: tuple[mx.array, ...], n: int) -> mx.array:
        w, scales, biases = (p[..., :n, :] for p in parts)
        out = mx.dequantize(w, scales, biases, group_size=self.group_size, bits=self.bits)
        return out.astype(self._dtype)

    @property
    def state(self):
        if self.keys is None or self.offset == 0:
            return ()
        n = self.offset
        return (tuple(p[..., :n, :] for p in self.keys), tuple(p[..., :n, :] for p in self.values))

    @state.setter
    def state(self, value) -> None:
        if not value:
            self.keys = self.values = None
            self.offset = 0
            return
        self.keys, self.values = tuple(value[0]), tuple(value[1])
        self.offset = self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        state = self.state
        return sum(a.nbytes for part in state for a in part) if state else 0


def kv_cache_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                             bits: int = 16, group_size: int = 64) -> float:
    """Bytes one token adds to the KV cache (keys and values, every layer).

    With quantization, each group of `group_size` values also stores a float16 scale and
    bias (2 x 2 bytes).
    """
    values = num_layers * 2 * num_kv_heads * head_dim
    if bits in (16, 32):  # float16/bfloat16 or float32, unquantized
        return float(values * bits // 8)
    return values * bits / 8 + values / group_size * 4


def save_cache(
    path: str | Path, caches: list[KVCache], metadata: dict[str, str] | None = None
) -> None:
    """Write per-layer cache states to a safetensors file (atomically)."""
    arrays: dict[str, mx.array] = {}
    kinds = []
    for i, cache in enumerate(caches):
        kinds.append(f"{type(cache).__name__}:{cache.mode}:{getattr(cache, 'bits', 16)}:"
                     f"{getattr(cache, 'group_size', 0)}")
        state = cache.state
        if not state:
            continue
        for name, part in zip(("keys", "values"), state, strict=True):
            if isinstance(part, tuple):
                for j, p in enumerate(part):
                    arrays[f"{i}.{name}.{j}"] = p
            else:
                arrays[f"{i}.{name}"] = part
    meta = dict(metadata or {})
    meta["num_layers"] = str(len(caches))
    meta["cache_kinds"] = ",".join(kinds)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata=meta)
    tmp.replace(path)


def load_cache(path: str | Path) -> tuple[list[KVCache], dict[str, str]]:
    """Read caches written by `save_cache`; returns (caches, user metadata)."""
    arrays, meta = mx.load(str(path), return_metadata=True)
    num_layers = int(meta.pop("num_layers"))
    kinds = meta.pop("cache_kinds").split(",")
    caches: list[KVCache] = []
    for i in range(num_layers):
        kind, mode, bits, group_size = kinds[i].split(":")
        if kind == "QuantizedKVCache":
            cache: KVCache = QuantizedKVCache(int(bits), int(group_size), mode=mode)
            if f"{i}.keys.0" in arrays:
                cache.state = tuple(tuple(arrays[f"{i}.{n}.{j}"] for j in range(3))
                                    for n in ("keys", "values"))
        else:
            cache = KVCache(mode=mode)
            if f"{i}.keys" in arrays:
                cache.state = (arrays[f"{i}.keys"], arrays[f"{i}.values"])
        caches.append(cache)
    return caches, meta
