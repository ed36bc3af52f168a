"""A KV cache for a batch of sequences of different lengths (continuous batching).

Rows are left-padded: every row's newest position sits in the same column, so one forward pass
of (B, L) new tokens writes one block of columns for all rows. Row b's first `padding[b]`
columns hold nothing: the cache builds the model's attention masks (`attention_masks`, the
hook `qwen2_mlx.masks.create_attention_masks` calls) so that no query sees them, and RoPE
rotates each row from its own position (`offset` is a (B,) array: columns minus padding).

Rows come and go between forward passes, as single-sequence caches: `BatchCache.from_rows`
and `add_rows` take the per-layer states of `ModelCache`s (prefilled apart, or from the prefix
cache) and pad whichever side is shorter on the left; `keep_rows` drops finished rows and the
columns no remaining row uses; `row_states` copies one row out (for the prefix cache, or to
continue it alone). Every row operation rebuilds the buffers (one copy of the batch), so a
forward pass never pays for them.

Stored as a float cache (`bits=None`) or 8/4-bit like `QuantizedKVCache`: each of keys and
values is a tuple of "parts" (float: the array; quantized: packed, scales, biases), all
shaped (B, kv_heads, columns, ...), so padding, copying and selecting rows treat both alike.
Dual Chunk Attention is not batched (a DCA model decodes one sequence at a time).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from qwen2_mlx.cache import KVCache, ModelCache, QuantizedKVCache
from qwen2_mlx.masks import AttentionMasks, Mask, attention_mask
from qwen2_mlx.metal_kernels.attention import (
    quantized_scaled_dot_product_attention,
    scaled_dot_product_attention,
)

Parts = tuple[mx.array, ...]
# One layer of one sequence, as `KVCache.state` gives it: (keys, values), each an array or,
# quantized, a (packed, scales, biases) triple; shaped (1, kv_heads, positions, ...).
LayerState = tuple[mx.array | Parts, mx.array | Parts]


def _parts(x: mx.array | Parts) -> Parts:
    return tuple(x) if isinstance(x, tuple | list) else (x,)


def state_positions(state: Sequence[LayerState]) -> int:
    """Positions held by a sequence's per-layer states (0 for empty states)."""
    return _parts(state[0][0])[0].shape[2] if state and state[0] else 0


def state_nbytes(state: Sequence[LayerState]) -> int:
    """Bytes of a sequence's per-layer states."""
    return sum(p.nbytes for layer in state for side in layer for p in _parts(side))


def copy_state(state: Sequence[LayerState], positions: int | None = None) -> list[LayerState]:
    """Contiguous, evaluated copies of the first `positions` (all) of each layer's state:
    they own their memory (no view into a larger buffer) and share nothing with the source."""
    def cut(side):
        parts = tuple(mx.contiguous(p[..., :positions, :]) for p in _parts(side))
        return parts if isinstance(side, tuple | list) else parts[0]

    copied = [(cut(k), cut(v)) for k, v in state]
    mx.eval(copied)
    return copied


def cache_from_state(state: Sequence[LayerState], tokens: Sequence[int], *, mode: str = "standard",
                     bits: int | None = None, group_size: int = 64) -> ModelCache:
    """A single-sequence `ModelCache` holding the first ``len(tokens)`` positions of `state`
    (per layer) and their token ids.

    The layers get new array objects (slices) over the state, and a KVCache's first write
    grows into a fresh buffer (its capacity is exactly what it holds), so the caller's arrays
    are never written through: a prefix-cache entry can be handed to any number of requests.
    """
    n = len(tokens)
    layers = []
    for keys, values in state:
        layer = KVCache(mode=mode) if bits is None else QuantizedKVCache(bits, group_size, mode)
        if isinstance(keys, tuple | list):
            layer.state = (tuple(p[..., :n, :] for p in keys), tuple(p[..., :n, :] for p in values))
        else:
            layer.state = (keys[..., :n, :], values[..., :n, :])
        layers.append(layer)
    return ModelCache(layers, tokens=list(tokens))


class BatchKVCache:
    """One layer's keys and values for B left-padded rows (see the module docstring)."""

    step = 256

    def __init__(self, keys: list[mx.array], values: list[mx.array], columns: int,
                 padding: list[int], bits: int | None, group_size: int) -> None:
        self.keys, self.values = keys, values  # parts, each (B, H, capacity, ...)
        self.columns = columns
        self.bits, self.group_size = bits, group_size
        self.mode = "standard"
        self.prompt_length = 0
        self.set_padding(padding)

    def set_padding(self, padding: list[int]) -> None:
        self.padding = list(padding)
        self._padding = mx.array(self.padding, dtype=mx.int32)

    @property
    def offset(self) -> mx.array:
        """Each row's position of the next token written, (B,): RoPE's per-row offset."""
        return self.columns - self._padding

    @property
    def batch_size(self) -> int:
        return len(self.padding)

    def _encode(self, x: mx.array) -> Parts:
        if self.bits is None:
            return (x,)
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def _reserve(self, needed: int) -> None:
        capacity = self.keys[0].shape[2]
        if needed <= capacity:
            return
        grown = ((max(needed, capacity + max(self.step, capacity // 8)) + self.step - 1)
                 // self.step) * self.step
        self.keys = [_resized(p, self.columns, grown) for p in self.keys]
        self.values = [_resized(p, self.columns, grown) for p in self.values]

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, *, scale: float,
               mask: Mask = None) -> mx.array:
        """Write `keys`/`values` (B, H_kv, L, D) at the next L columns of every row and attend
        `queries` (B, H, L, D) over all columns (`mask` from `attention_masks`)."""
        start, length = self.columns, keys.shape[2]
        self._reserve(start + length)
        for buffer, new in zip(self.keys + self.values,
                               self._encode(keys) + self._encode(values), strict=True):
            buffer[..., start:start + length, :] = new
        self.columns = start + length
        k = tuple(p[..., :self.columns, :] for p in self.keys)
        v = tuple(p[..., :self.columns, :] for p in self.values)
        if self.bits is None:
            return scaled_dot_product_attention(queries, k[0], v[0], scale=scale, mask=mask)
        return quantized_scaled_dot_product_attention(
            queries, k, v, scale=scale, mask=mask, group_size=self.group_size, bits=self.bits)

    def attend_dual_chunk(self, *args, **kwargs) -> mx.array:
        raise ValueError("Dual Chunk Attention is not batched: decode DCA sequences one at a time")

    def attention_masks(self, n_queries: int, sliding_window: int | None) -> AttentionMasks:
        """The masks of a forward pass of `n_queries` new columns: causal (and sliding) as for
        one sequence, and each row's padding columns hidden from its queries."""
        n_keys = self.columns + n_queries
        full = attention_mask(n_queries, n_keys, None)
        sliding = attention_mask(n_queries, n_keys, sliding_window) if sliding_window else None
        if not any(self.padding):
            return AttentionMasks(full, sliding)
        visible = (mx.arange(n_keys)[None, :] >= self._padding[:, None])[:, None, None, :]

        def with_padding(mask: Mask) -> mx.array:
            if mask is None:
                return visible
            if isinstance(mask, str):  # "causal", bottom-right aligned
                q_pos = mx.arange(n_keys - n_queries, n_keys)[:, None]
                mask = mx.arange(n_keys)[None, :] <= q_pos
            return visible & mask

        return AttentionMasks(with_padding(full),
                              with_padding(sliding) if sliding_window else None)

    @property
    def nbytes(self) -> int:
        return sum(p[..., :self.columns, :].nbytes for p in self.keys + self.values)


def _resized(buffer: mx.array, columns: int, capacity: int) -> mx.array:
    """`buffer`'s first `columns` columns in a zeroed buffer of `capacity` columns."""
    out = mx.zeros((*buffer.shape[:2], capacity, buffer.shape[3]), buffer.dtype)
    if columns:
        out[..., :columns, :] = buffer[..., :columns, :]
    return out


class BatchCache(list):
    """The per-layer `BatchKVCache`s of a batch (a list, as the model's forward pass takes),
    with the row operations that keep every layer's padding in step."""

    def __init__(self, layers: Sequence[BatchKVCache]):
        super().__init__(layers)

    @property
    def padding(self) -> list[int]:
        return self[0].padding

    @property
    def columns(self) -> int:
        return self[0].columns

    @property
    def batch_size(self) -> int:
        return self[0].batch_size

    def row_length(self, row: int) -> int:
        """Positions row `row` holds."""
        return self.columns - self.padding[row]

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[LayerState]], *, bits: int | None = None,
                  group_size: int = 64) -> BatchCache:
        """A batch of the given sequences (each a list of per-layer states, one row each)."""
        if not rows:
            raise ValueError("a batch needs at least one row")
        lengths = [state_positions(r) for r in rows]
        if min(lengths) < 1:
            raise ValueError("every row of a batch must hold at least one position")
        columns = max(lengths)
        padding = [columns - n for n in lengths]
        layers = []
        for i in range(len(rows[0])):
            keys = _stack([_parts(r[i][0]) for r in rows], padding, columns)
            values = _stack([_parts(r[i][1]) for r in rows], padding, columns)
            layers.append(BatchKVCache(keys, values, columns, padding, bits, group_size))
        return cls(layers)

    def add_rows(self, rows: Sequence[Sequence[LayerState]]) -> None:
        """Append sequences as new rows (after the existing ones), padding on the left."""
        lengths = [state_positions(r) for r in rows]
        if min(lengths) < 1:
            raise ValueError("every row of a batch must hold at least one position")
        columns = max(self.columns, *lengths)
        shift = columns - self.columns
        new_padding = [columns - n for n in lengths]
        padding = [p + shift for p in self.padding] + new_padding
        for i, layer in enumerate(self):
            for side, held in ((0, layer.keys), (1, layer.values)):
                old = tuple(p[..., :layer.columns, :] for p in held)
                stacked = _stack([old] + [_parts(r[i][side]) for r in rows],
                                 [shift] + new_padding, columns)
                if side == 0:
                    layer.keys = stacked
                else:
                    layer.values = stacked
            layer.columns = columns
            layer.set_padding(padding)

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order) and drop the columns that are padding in all."""
        if not rows:
            raise ValueError("keep at least one row (drop the batch instead)")
        padding = [self.padding[r] for r in rows]
        drop = min(padding)
        index = mx.array(list(rows), dtype=mx.int32)
        for layer in self:
            layer.keys = [_select(p, index, drop, layer.columns) for p in layer.keys]
            layer.values = [_select(p, index, drop, layer.columns) for p in layer.values]
            layer.columns -= drop
            layer.set_padding([p - drop for p in padding])

    def row_states(self, row: int, positions: int | None = None) -> list[LayerState]:
        """Contiguous copies of row `row`'s first `positions` (all its) positions per layer,
        in `KVCache.state`'s shape: (1, H, positions, ...) arrays or quantized triples."""
        start = self.padding[row]
        end = self.columns if positions is None else start + positions

        def cut(parts: list[mx.array]):
            out = tuple(mx.contiguous(p[row:row + 1, :, start:end, :]) for p in parts)
            return out if len(out) > 1 else out[0]

        states = [(cut(layer.keys), cut(layer.values)) for layer in self]
        mx.eval(states)
        return states

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self)


def _stack(rows: Sequence[Parts], padding: Sequence[int], columns: int) -> list[mx.array]:
    """Parts of several rows (each (b, H, n, ...)) left-padded to `columns` and concatenated
    along the batch axis; room for `BatchKVCache.step` more columns."""
    capacity = ((columns + BatchKVCache.step) // BatchKVCache.step) * BatchKVCache.step
    stacked = []
    for j in range(len(rows[0])):
        blocks = []
        for parts, pad in zip(rows, padding, strict=True):
            p = parts[j]
            b, h, n, d = p.shape
            blocks.append(mx.concatenate([
                mx.zeros((b, h, pad, d), p.dtype), p[..., :n, :],
                mx.zeros((b, h, capacity - pad - n, d), p.dtype)], axis=2))
        stacked.append(mx.concatenate(blocks, axis=0))
    return stacked


def _select(buffer: mx.array, rows: mx.array, drop: int, columns: int) -> mx.array:
    """Rows `rows` of `buffer` without its first `drop` columns, with the same spare room."""
    kept = buffer[rows][..., drop:columns, :]
    spare = buffer.shape[2] - columns
    b, h, _, d = kept.shape
    return mx.concatenate([kept, mx.zeros((b, h, spare + drop, d), buffer.dtype)], axis=2)
