"""Dual Chunk Attention (DCA) on the model's side: its configuration, where keys and queries sit,
the length temperature, and the attention strategy a layer uses in DCA mode.

Follows the code of ChunkLlama / vLLM / SGLang (spec ``long-context.md`` §3, §4, §8), not the
paper. C = chunk_size, W = local_size, L = C - W. Keys are cached rotated at ``t mod L`` and
scaled by the length temperature of the step that wrote them (`dca_write_keys`); each query is
rotated three ways and attends its own chunk, the previous one and all older keys in one
softmax (`qwen2_mlx.metal_kernels.dual_chunk_attention`, which takes plain parameters: the
geometry and a rotation, built here from the config and the model's RoPE frequencies).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import mlx.core as mx

from qwen2_mlx.metal_kernels import dual_chunk_attention as kernels
from qwen2_mlx.rope import apply_rotary

__all__ = [
    "DualChunkAttention",
    "DualChunkConfig",
    "QueryPositions",
    "dca_write_keys",
    "distance_matrix",
    "dual_chunk_attention",
    "dual_chunk_attention_kernel",
    "dual_chunk_attention_reference",
    "key_positions",
    "length_temperature",
    "query_positions",
    "rotation",
]

# vLLM's defaults when a key is missing from `dual_chunk_attention_config` (spec §2).
_DEFAULT_CHUNK_SIZE = 8192
_DEFAULT_LOCAL_SIZE = 1024
_SPARSE_KEYS = frozenset(
    {
        "sparse_attention_config",
        "sparse_attention_enabled",
        "sparse_attention_threshold",
        "sparse_attention_last_q",
    }
)
_KNOWN_KEYS = frozenset({"chunk_size", "local_size", "original_max_position_embeddings"})


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DualChunkConfig:
    """DCA geometry: ``chunk_size`` C, ``local_size`` W and ``original_max_position_embeddings`` O.

    O > 0 enables the length temperature (§4.4); O = 0 disables it.
    """

    chunk_size: int
    local_size: int
    original_max_position_embeddings: int = 0

    def __post_init__(self) -> None:
        if not _is_int(self.chunk_size) or self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {self.chunk_size!r}")
        if not _is_int(self.local_size) or self.local_size <= 0:
            raise ValueError(f"local_size must be a positive int, got {self.local_size!r}")
        if self.local_size >= self.chunk_size:
            raise ValueError(
                f"local_size ({self.local_size}) must be smaller than chunk_size "
                f"({self.chunk_size})"
            )
        original = self.original_max_position_embeddings
        if not _is_int(original) or original < 0:
            raise ValueError(
                f"original_max_position_embeddings must be an int >= 0, got {original!r}"
            )

    @property
    def chunk_len(self) -> int:
        """L = C - W: tokens per chunk (the paper's chunk size s)."""
        return self.chunk_size - self.local_size

    @property
    def inter_query_position(self) -> int:
        """Constant inter-chunk query position ``min(2L - 1, C)`` (vLLM: ``qc_cache[L - 1]``)."""
        return min(2 * self.chunk_len - 1, self.chunk_size)

    def temperature(self, length: int) -> float:
        """Length temperature s(length) for this config (§4.4)."""
        return length_temperature(length, self.original_max_position_embeddings)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> DualChunkConfig:
        """Build from a HF ``dual_chunk_attention_config`` dict.

        Missing keys take vLLM's defaults (C = 8192, W = 1024, O = 0). The ``sparse_attention_*``
        keys are accepted but sparse attention (an approximation, §0.4) is not implemented: if it
        is enabled a warning says that attention runs dense. Unknown keys are warned about.
        """
        if not isinstance(config, Mapping):
            raise ValueError(
                f"dual_chunk_attention_config must be a dict, got {type(config).__name__}"
            )
        unknown = sorted(set(config) - _KNOWN_KEYS - _SPARSE_KEYS)
        if unknown:
            warnings.warn(
                f"ignoring unknown dual_chunk_attention_config keys: {unknown}", stacklevel=2
            )
        # vLLM: sparse attention defaults to enabled whenever a sparse config is given.
        sparse_enabled = config.get(
            "sparse_attention_enabled", config.get("sparse_attention_config") is not None
        )
        if sparse_enabled:
            warnings.warn(
                "dual_chunk_attention_config enables sparse attention, which qwen2-mlx does "
                "not support; running dense Dual Chunk Attention instead",
                stacklevel=2,
            )
        original = config.get("original_max_position_embeddings")
        return cls(
            chunk_size=config.get("chunk_size", _DEFAULT_CHUNK_SIZE),
            local_size=config.get("local_size", _DEFAULT_LOCAL_SIZE),
            original_max_position_embeddings=0 if original is None else original,
        )


def length_temperature(length: int, original_max: int) -> float:
    """DCA's "YaRN" temperature ``s = max(1, 0.1 ln(length / O) + 1)`` if O > 0, else 1 (§4.4).

    It multiplies both queries and keys, so logits scale by ``s_q * s_k``.
    """
    if not _is_int(length) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if not _is_int(original_max) or original_max < 0:
        raise ValueError(f"original_max must be an int >= 0, got {original_max!r}")
    if original_max == 0:
        return 1.0
    return max(1.0, 0.1 * math.log(length / original_max) + 1.0)


def _check_start_n(start: int, n: int) -> None:
    if not _is_int(start) or start < 0:
        raise ValueError(f"start position must be an int >= 0, got {start!r}")
    if not _is_int(n) or n < 0:
        raise ValueError(f"token count must be an int >= 0, got {n!r}")


def key_positions(start: int, n: int, chunk_len: int) -> mx.array:
    """RoPE positions of keys at absolute positions ``start .. start+n-1``: ``t mod L`` (int32)."""
    _check_start_n(start, n)
    if not _is_int(chunk_len) or chunk_len <= 0:
        raise ValueError(f"chunk_len must be a positive int, got {chunk_len!r}")
    return mx.arange(start, start + n, dtype=mx.int32) % chunk_len


class QueryPositions(NamedTuple):
    """The three RoPE positions of each query (int32 arrays of shape (n,))."""

    intra: mx.array  # i mod L, against keys of the query's own chunk
    succ: mx.array  # min(i mod L + L, C), against keys of the previous chunk
    inter: mx.array  # min(2L - 1, C) for every query, against all older keys


def query_positions(start: int, n: int, chunk_size: int, local_size: int) -> QueryPositions:
    """Intra, successive and inter RoPE positions of queries at ``start .. start+n-1`` (§3.1)."""
    cfg = DualChunkConfig(chunk_size, local_size)
    intra = key_positions(start, n, cfg.chunk_len)
    succ = mx.minimum(intra + cfg.chunk_len, cfg.chunk_size)
    inter = mx.full((n,), cfg.inter_query_position, dtype=mx.int32)
    return QueryPositions(intra, succ, inter)


def distance_matrix(n: int, chunk_size: int, local_size: int) -> mx.array:
    """Effective relative distance ``M[i, j] = pq_part(i) - pk(j)`` for j <= i (-1 above it).

    The part is intra if chunk(i) == chunk(j), successive if they differ by one, inter otherwise.
    """
    cfg = DualChunkConfig(chunk_size, local_size)
    queries = query_positions(0, n, chunk_size, local_size)
    keys = key_positions(0, n, cfg.chunk_len)
    chunk = mx.arange(n, dtype=mx.int32) // cfg.chunk_len
    chunk_gap = chunk[:, None] - chunk[None, :]
    query_pos = mx.where(
        chunk_gap == 0,
        queries.intra[:, None],
        mx.where(chunk_gap == 1, queries.succ[:, None], queries.inter[:, None]),
    )
    causal = mx.arange(n)[None, :] <= mx.arange(n)[:, None]
    return mx.where(causal, query_pos - keys[None, :], -1)


def dca_write_keys(
    keys: mx.array,
    start_pos: int,
    cfg: DualChunkConfig,
    inv_freq: mx.array,
    temperature: float = 1.0,
) -> mx.array:
    """Keys as the DCA cache stores them: rotated at ``t mod L`` and multiplied by ``temperature``.

    ``keys`` (B, Hkv, T, D) are unrotated keys of absolute positions ``start_pos ..
    start_pos+T-1``. ``temperature`` is s of the step writing them (prefill: the whole prompt
    length; decode: the current length), and cached keys keep it (vLLM, §4.4).
    The rotation and scaling run in float32; the result has the dtype of ``keys``.
    """
    if keys.ndim != 4:
        raise ValueError(f"keys must have shape (B, Hkv, T, D), got {tuple(keys.shape)}")
    if not _is_int(start_pos) or start_pos < 0:
        raise ValueError(f"start_pos must be an int >= 0, got {start_pos!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    compute = mx.float64 if keys.dtype == mx.float64 else mx.float32
    positions = key_positions(start_pos, keys.shape[2], cfg.chunk_len)
    rotated = apply_rotary(keys.astype(compute), positions, inv_freq)
    if temperature != 1.0:
        rotated = rotated * temperature
    return rotated.astype(keys.dtype)


def rotation(inv_freq: mx.array) -> kernels.Rotate:
    """The DCA kernels' `rotate`: plain RoPE at explicit positions with these frequencies."""
    return partial(apply_rotary, inv_freq=inv_freq)


def _plain_parameters(cfg: DualChunkConfig, inv_freq: mx.array, queries: mx.array) -> dict:
    head_dim = queries.shape[-1]
    if inv_freq.ndim != 1 or inv_freq.shape[0] * 2 != head_dim:
        raise ValueError(
            f"inv_freq of shape {tuple(inv_freq.shape)} does not match head dim {head_dim}"
        )
    return dict(chunk_size=cfg.chunk_size, local_size=cfg.local_size, rotate=rotation(inv_freq))


def dual_chunk_attention(queries: mx.array, keys: mx.array, values: mx.array, *,
                         cfg: DualChunkConfig, inv_freq: mx.array, **kwargs) -> mx.array:
    """`metal_kernels.dual_chunk_attention.dual_chunk_attention` (the kernel dispatch) given the
    model's config and RoPE frequencies; other arguments as there (q_start, scale, ...)."""
    return kernels.dual_chunk_attention(queries, keys, values,
                                        **_plain_parameters(cfg, inv_freq, queries), **kwargs)


def dual_chunk_attention_reference(queries: mx.array, keys: mx.array, values: mx.array, *,
                                   cfg: DualChunkConfig, inv_freq: mx.array,
                                   **kwargs) -> mx.array:
    """The pure-MLX reference of `dual_chunk_attention`, with the model's config."""
    return kernels.dual_chunk_attention_reference(
        queries, keys, values, **_plain_parameters(cfg, inv_freq, queries), **kwargs)


def dual_chunk_attention_kernel(backend: str, queries: mx.array, keys, values, *,
                                cfg: DualChunkConfig, inv_freq: mx.array,
                                **kwargs) -> mx.array:
    """The kernel path of `dual_chunk_attention` on `backend`, with the model's config."""
    return kernels.dual_chunk_attention_kernel(
        backend, queries, keys, values, **_plain_parameters(cfg, inv_freq, queries), **kwargs)


class DualChunkAttention:
    """A layer's attention in DCA mode: what `Attention` runs after the q/k/v projections
    instead of RoPE at consecutive positions. The cache it is given (a `KVCache`, an 8/4-bit
    `QuantizedKVCache`, or none) chooses the float or quantized path itself."""

    def __init__(self, config: DualChunkConfig, inv_freq: mx.array, scale: float) -> None:
        self.config, self.inv_freq, self.scale = config, inv_freq, scale
        self.rotate = rotation(inv_freq)

    def __call__(self, queries: mx.array, keys: mx.array, values: mx.array, cache) -> mx.array:
        offset = cache.offset
        # The length temperature comes from the whole prompt during (chunked) prefill and
        # from the current length in decode; cached keys keep the one they were written with
        # (vLLM's behaviour, spec §4.4).
        temperature = self.config.temperature(max(offset + queries.shape[2],
                                                  cache.prompt_length))
        keys = dca_write_keys(keys, offset, self.config, self.inv_freq, temperature=temperature)
        return cache.attend_dual_chunk(
            queries, keys, values, chunk_size=self.config.chunk_size,
            local_size=self.config.local_size, rotate=self.rotate, scale=self.scale,
            q_temperature=temperature)
