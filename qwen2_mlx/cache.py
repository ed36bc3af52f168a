"""Key/value caches for incremental decoding.

`KVCache` keeps keys and values in preallocated buffers and writes new positions into a
slice, so decoding does not concatenate (and copy) the whole cache for every token. Buffers
grow in blocks of at least `step` positions and at least 1/8 of what they hold, so a
131K-token prefill copies the cache a bounded number of times (amortised O(n), not O(n^2));
`reserve(n)` sizes them once when the final length is known.

`QuantizedKVCache` stores keys and values with MLX's 8-bit affine quantization (about half
the bytes of bfloat16), and hands attention dequantized copies of one layer at a time.

A cache is also the attention's entry point: `cache.attend(q, k, v, scale=, mask=)` appends the
new keys and values and attends over everything held, reading them as they are stored (float,
or 8/4-bit through the quantized attention), and `attend_dual_chunk` does the same for Dual
Chunk Attention; `NO_CACHE` stands for "no cache" (training, a plain forward pass). So the
model's attention never asks which kind of cache it has.

A cache remembers the attention `mode` that wrote it ("standard" or "dca"): DCA stores keys
already rotated at chunk-relative positions, so a cache cannot change mode mid-sequence.

`ModelCache` is what `Model.make_cache()` returns: the list of a model's per-layer caches, plus
the token ids whose keys and values they hold (`tokens`), trimmed together (`trim`). The
repetition penalty, and prompt caches and chat sessions, read what a cache holds from it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen2_mlx.metal_kernels.attention import (
    quantized_scaled_dot_product_attention,
    scaled_dot_product_attention,
)
from qwen2_mlx.metal_kernels.dual_chunk_attention import (
    dual_chunk_attention,
    quantized_dual_chunk_attention,
)

Mask = mx.array | str | None


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

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, *, scale: float,
               mask: Mask = None) -> mx.array:
        """Append `keys`/`values` (B, H_kv, L, D) and attend `queries` (B, H, L, D) over all
        the cached positions (`mask` as `scaled_dot_product_attention` takes it)."""
        self._check_mode("standard")
        keys, values = self.update_and_fetch(keys, values)
        return scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)

    def attend_dual_chunk(self, queries: mx.array, keys: mx.array, values: mx.array,
                          **dca) -> mx.array:
        """Append DCA keys (already rotated and scaled) and values, and run Dual Chunk
        Attention of `queries` over the cache (`dca`: the geometry, rotation and scales)."""
        self._check_mode("dca")
        q_start = self.offset
        keys, values = self.update_and_fetch(keys, values)
        return dual_chunk_attention(queries, keys, values, q_start=q_start, **dca)

    def _check_mode(self, mode: str) -> None:
        if self.mode != mode:
            raise ValueError(
                f"this KV cache was written in {self.mode!r} attention mode but the model "
                f"runs {mode!r}: the mode is fixed per sequence, start a new cache"
            )

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

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, *, scale: float,
               mask: Mask = None) -> mx.array:
        # The attention reads the 8/4-bit cache as stored (a kernel does on Metal).
        self._check_mode("standard")
        keys, values = self.update_and_fetch_quantized(keys, values)
        return quantized_scaled_dot_product_attention(
            queries, keys, values, scale=scale, mask=mask, group_size=self.group_size,
            bits=self.bits)

    def attend_dual_chunk(self, queries: mx.array, keys: mx.array, values: mx.array,
                          **dca) -> mx.array:
        # Decode reads the quantized cache as stored (a kernel does on Metal).
        self._check_mode("dca")
        q_start = self.offset
        keys, values = self.update_and_fetch_quantized(keys, values)
        return quantized_dual_chunk_attention(queries, keys, values, q_start=q_start,
                                              group_size=self.group_size, bits=self.bits, **dca)

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


class NoCache:
    """The cache of a forward pass that keeps nothing (training, a plain `model(ids)`):
    position 0, and attention over just the keys and values given."""

    offset = 0
    prompt_length = 0

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, *, scale: float,
               mask: Mask = None) -> mx.array:
        return scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)

    def attend_dual_chunk(self, queries: mx.array, keys: mx.array, values: mx.array,
                          **dca) -> mx.array:
        return dual_chunk_attention(queries, keys, values, q_start=0, **dca)


NO_CACHE = NoCache()

UNKNOWN_TOKEN = -1


class ModelCache(list):
    """The KV caches of a model, one per layer (it is a list of them), and the ids they hold.

    `tokens` is the list of token ids whose keys and values the layers hold, oldest first;
    ``len(cache.tokens) == cache.offset`` always. A position whose id is not known (a plain
    list of layer caches wrapped by `ModelCache.wrap`, a cache file written before ids were
    saved, or a batch of several rows) holds `UNKNOWN_TOKEN` (-1), which matches no real id.

    The model's forward pass records the ids it writes (`add_tokens`); as lazy arrays, so a
    decode step never waits for its input token: they are read into the list when `tokens`
    is. Trim through `trim`, which trims every layer and the ids together (trimming a layer
    directly is also tolerated: `tokens` follows the layers' offset).
    """

    def __init__(self, layers: Iterable[KVCache] = (), tokens: Sequence[int] | None = None):
        super().__init__(layers)
        offset = self.offset
        if tokens is None:
            tokens = [UNKNOWN_TOKEN] * offset
        elif len(tokens) != offset:
            raise ValueError(f"{len(tokens)} token ids for a cache holding {offset} positions")
        self._tokens: list[int] = [int(t) for t in tokens]
        self._pending: list[mx.array] = []

    @classmethod
    def wrap(cls, caches: Sequence[KVCache]) -> ModelCache:
        """`caches` itself if it is a ModelCache, else a ModelCache over the same layer caches
        (their ids unknown)."""
        return caches if isinstance(caches, ModelCache) else cls(caches)

    @property
    def offset(self) -> int:
        """Positions held (every layer holds the same number)."""
        return self[0].offset if len(self) else 0

    def add_tokens(self, ids: mx.array | Sequence[int]) -> None:
        """Record the ids of positions just written to the layers, (L,) or (1, L).

        An array is kept as is and read when `tokens` is next accessed (no sync here).
        A batch of several rows records unknown ids: one list cannot say which row is which.
        """
        if isinstance(ids, mx.array):
            if ids.ndim == 2 and ids.shape[0] != 1:
                self._tokens.extend([UNKNOWN_TOKEN] * ids.shape[1])
            else:
                self._pending.append(ids.reshape(-1))
        else:
            self._tokens.extend(int(t) for t in ids)

    @property
    def tokens(self) -> list[int]:
        """The ids of the positions the layers hold (-1 where unknown)."""
        if self._pending:
            pending = self._pending
            self._pending = []
            flat = pending[0] if len(pending) == 1 else mx.concatenate(pending)
            self._tokens.extend(np.array(flat).astype(np.int64).tolist())
        offset = self.offset
        if len(self._tokens) > offset:  # layers trimmed directly: the ids follow
            del self._tokens[offset:]
        elif len(self._tokens) < offset:  # layers written past the model's forward pass
            self._tokens.extend([UNKNOWN_TOKEN] * (offset - len(self._tokens)))
        return self._tokens

    @property
    def tokens_known(self) -> bool:
        """Whether every held position's id is known."""
        return UNKNOWN_TOKEN not in self.tokens

    def trim(self, n: int) -> int:
        """Forget the last `n` positions of every layer and their ids; returns how many went."""
        tokens = self.tokens
        trimmed = min((layer.trim(n) for layer in self), default=0)
        del tokens[len(tokens) - trimmed:]
        return trimmed


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
    path: str | Path, caches: Sequence[KVCache], metadata: dict[str, str] | None = None
) -> None:
    """Write per-layer cache states and the ids they hold to a safetensors file (atomically).

    Any file name works (the format does not depend on the suffix); a plain list of layer
    caches is saved with unknown ids.
    """
    caches = ModelCache.wrap(caches)
    arrays: dict[str, mx.array] = {"tokens": mx.array(np.array(caches.tokens, dtype=np.int32))}
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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.safetensors")  # MLX adds the suffix
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=meta)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_cache(path: str | Path) -> tuple[ModelCache, dict[str, str]]:
    """Read a cache written by `save_cache` (any file name); returns (cache, user metadata).

    Files written before the ids were saved load with unknown ids.
    """
    try:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:  # MLX raises RuntimeError/ValueError for missing or damaged files
        raise ValueError(f"cannot read the cache file {path}: {e}") from e
    if "num_layers" not in meta or "cache_kinds" not in meta:
        raise ValueError(f"{path} is not a cache written by save_cache")
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
    tokens = arrays.get("tokens")
    return ModelCache(caches, None if tokens is None else np.array(tokens).tolist()), meta
