"""Rotary position embeddings (RoPE) for Qwen2: plain, linear and static YaRN.

Conventions follow Hugging Face transformers (``modeling_rope_utils.py``, ``Qwen2RotaryEmbedding``):

* non-interleaved halves ("rotate_half", ``traditional=False`` in MLX): feature ``k`` pairs with
  feature ``k + d/2`` and rotates by ``pos * inv_freq[k]``;
* frequencies are computed in float32 with the same operation order as transformers, so they agree
  with it to the last bit or one ulp;
* YaRN's attention factor multiplies cos and sin in transformers, applied to both q and k, hence
  the logits by ``attention_factor**2``. Here it multiplies x before rotation, which is the same
  linear map (spec ``long-context.md`` §5.1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import mlx.core as mx
import mlx.nn as nn

__all__ = [
    "RoPE",
    "apply_rotary",
    "rope_frequencies",
    "rope_inv_freq",
    "yarn_get_mscale",
    "yarn_inv_freq_and_scale",
]


def apply_rotary(x: mx.array, positions: mx.array, inv_freq: mx.array) -> mx.array:
    """Rotate ``x`` (..., L, D) at explicit integer ``positions`` (L,) (or broadcastable (..., L)).

    cos/sin come from float32 angles ``pos * inv_freq`` (as transformers computes them) and the
    rotation runs in float32 (both in float64 if x is float64); the result has x's dtype. Unlike
    ``mx.fast.rope`` the positions need not be consecutive, which Dual Chunk Attention needs
    (it is the rotation `qwen2_mlx.dca` hands the DCA kernels).
    """
    half = x.shape[-1] // 2
    if inv_freq.ndim != 1 or inv_freq.shape[0] * 2 != x.shape[-1]:
        raise ValueError(
            f"inv_freq of shape {tuple(inv_freq.shape)} does not match head dim {x.shape[-1]}"
        )
    # float64 x (CPU only) stays float64 rather than being silently downcast.
    compute = mx.float64 if x.dtype == mx.float64 else mx.float32
    angles = positions.astype(compute)[..., None] * inv_freq.astype(compute)
    cos, sin = mx.cos(angles), mx.sin(angles)
    xc = x.astype(compute)
    x1, x2 = xc[..., :half], xc[..., half:]
    rotated = mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def _check_head_dim(head_dim: int) -> None:
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotate_half RoPE, got {head_dim}")


def _check_theta(theta: float) -> None:
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 1.0:
        raise ValueError(f"rope theta must be a number > 1, got {theta!r}")


def _base_powers(head_dim: int, theta: float) -> mx.array:
    # theta^(2k/d) in float32, same operation order as transformers
    # (`base ** (arange(0, dim, 2).float() / dim)`), which keeps bit-level agreement with it.
    return theta ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim)


def rope_inv_freq(head_dim: int, theta: float) -> mx.array:
    """Plain RoPE inverse frequencies ``1 / theta^(2k/d)`` for k < d/2, float32 of shape (d/2,)."""
    _check_head_dim(head_dim)
    _check_theta(theta)
    return 1.0 / _base_powers(head_dim, theta)


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention magnitude ``0.1 * mscale * ln(factor) + 1`` (1 when factor <= 1)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, original_max: int) -> float:
    # Dimension index whose wavelength completes `num_rotations` turns over the original context.
    return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_inv_freq_and_scale(
    head_dim: int,
    theta: float,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    attention_factor: float | None = None,
    truncate: bool = True,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
) -> tuple[mx.array, float]:
    """Static YaRN inverse frequencies and attention factor (spec §5.1).

    Matches transformers' current ``_compute_yarn_parameters``: ``factor`` is used as given (the
    2025 override by ``max_position_embeddings / original_max_position_embeddings`` is a known bug,
    spec §5.4 (b)). Low-index (fast) dimensions extrapolate, high-index ones are interpolated by
    ``1/factor``, with a linear ramp between ``low`` and ``high``.

    The attention factor is ``attention_factor`` if given, else
    ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both of those keys are set
    (DeepSeek style), else ``0.1 ln(factor) + 1`` for factor > 1 and 1 otherwise.

    Returns ``(inv_freq float32 (d/2,), attention_factor)``.
    """
    _check_head_dim(head_dim)
    _check_theta(theta)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ValueError(f"YaRN factor must be a positive number, got {factor!r}")
    if (
        isinstance(original_max_position_embeddings, bool)
        or not isinstance(original_max_position_embeddings, int)
        or original_max_position_embeddings <= 0
    ):
        raise ValueError(
            "YaRN original_max_position_embeddings must be a positive int, got "
            f"{original_max_position_embeddings!r}"
        )
    if attention_factor is not None and not attention_factor > 0:
        raise ValueError(f"YaRN attention_factor must be > 0, got {attention_factor!r}")

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(
                factor, mscale_all_dim
            )
        else:
            attention_factor = yarn_get_mscale(factor)

    low = _yarn_correction_dim(beta_fast, head_dim, theta, original_max_position_embeddings)
    high = _yarn_correction_dim(beta_slow, head_dim, theta, original_max_position_embeddings)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers: avoid a zero-width ramp

    pos_freqs = _base_powers(head_dim, theta)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    ramp = mx.clip((mx.arange(head_dim // 2, dtype=mx.float32) - low) / (high - low), 0.0, 1.0)
    extrapolation_weight = 1.0 - ramp
    inv_freq = (
        inv_freq_interpolation * (1.0 - extrapolation_weight)
        + inv_freq_extrapolation * extrapolation_weight
    )
    return inv_freq.astype(mx.float32), float(attention_factor)


def _scaling_type(scaling: Mapping[str, Any]) -> str:
    rope_type = scaling.get("rope_type", scaling.get("type"))
    return "default" if rope_type is None else str(rope_type)


def rope_frequencies(
    head_dim: int,
    theta: float,
    scaling: Mapping[str, Any] | None,
    max_position_embeddings: int | None = None,
) -> tuple[mx.array, float]:
    """Inverse frequencies and attention factor from a HF ``rope_scaling``/``rope_parameters`` dict.

    Supported types (key ``rope_type`` or the legacy ``type``): ``default`` (or no dict), ``linear``
    (``inv_freq / factor``) and ``yarn``. For YaRN, a missing ``original_max_position_embeddings``
    falls back to ``max_position_embeddings`` and a missing ``factor`` to their ratio, as in
    transformers (mlx-lm's 4096 fallback is not followed, spec §5.4). Other types raise ValueError.
    """
    if scaling is None:
        return rope_inv_freq(head_dim, theta), 1.0
    if not isinstance(scaling, Mapping):
        raise ValueError(f"rope scaling must be a dict or None, got {type(scaling).__name__}")
    dict_theta = scaling.get("rope_theta")
    if dict_theta is not None and float(dict_theta) != float(theta):
        raise ValueError(
            f"rope scaling dict has rope_theta={dict_theta!r}, which conflicts with theta={theta!r}"
        )
    partial = scaling.get("partial_rotary_factor", 1.0)
    if partial is not None and float(partial) != 1.0:
        raise ValueError(
            f"partial_rotary_factor={partial!r} is not supported (Qwen2 rotates all dims)"
        )

    rope_type = _scaling_type(scaling)
    if rope_type == "default":
        return rope_inv_freq(head_dim, theta), 1.0
    if rope_type == "linear":
        factor = scaling.get("factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ValueError(f"linear rope scaling needs a positive 'factor', got {factor!r}")
        return rope_inv_freq(head_dim, theta) / factor, 1.0
    if rope_type == "yarn":
        original_max = scaling.get("original_max_position_embeddings") or max_position_embeddings
        if original_max is None:
            raise ValueError(
                "yarn rope scaling needs 'original_max_position_embeddings' or "
                "max_position_embeddings to fall back on"
            )
        factor = scaling.get("factor")
        if factor is None:
            if max_position_embeddings is None:
                raise ValueError("yarn rope scaling without 'factor' needs max_position_embeddings")
            factor = max_position_embeddings / original_max
        return yarn_inv_freq_and_scale(
            head_dim,
            theta,
            factor,
            original_max,
            # `or` as in transformers: an explicit null means the default.
            beta_fast=scaling.get("beta_fast") or 32.0,
            beta_slow=scaling.get("beta_slow") or 1.0,
            attention_factor=scaling.get("attention_factor"),
            truncate=scaling.get("truncate", True),
            mscale=scaling.get("mscale"),
            mscale_all_dim=scaling.get("mscale_all_dim"),
        )
    raise ValueError(
        f"unsupported rope scaling type {rope_type!r}; supported: 'default', 'linear', 'yarn'"
    )


class RoPE(nn.Module):
    """Qwen2 rotary embedding: plain, linear or static YaRN, chosen by a HF scaling dict.

    ``__call__`` rotates consecutive positions starting at ``offset`` with ``mx.fast.rope``;
    ``rotate_at`` rotates arbitrary per-token positions. Both apply the YaRN attention factor to x.
    """

    def __init__(
        self,
        head_dim: int,
        theta: float,
        scaling: Mapping[str, Any] | None = None,
        max_position_embeddings: int | None = None,
    ) -> None:
        super().__init__()
        inv_freq, attention_scale = rope_frequencies(
            head_dim, theta, scaling, max_position_embeddings
        )
        self.head_dim = head_dim
        self.rope_type = "default" if scaling is None else _scaling_type(scaling)
        self.attention_scale = attention_scale
        # Underscore names keep these out of `parameters()` (they are not checkpoint weights).
        self._inv_freq = inv_freq
        # mx.fast.rope's `freqs` are periods: angle = position / freqs (checked in the tests).
        self._periods = 1.0 / inv_freq

    @property
    def inv_freq(self) -> mx.array:
        """float32 (d/2,) inverse frequencies."""
        return self._inv_freq

    def _check_x(self, x: mx.array) -> None:
        if x.ndim != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"expected x of shape (B, H, L, {self.head_dim}), got {tuple(x.shape)}"
            )

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        """Rotate x (B, H, L, D) at positions offset..offset+L-1 (offset: int, scalar or (B,))."""
        self._check_x(x)
        if self.attention_scale != 1.0:
            x = x * self.attention_scale
        return mx.fast.rope(
            x,
            self.head_dim,
            traditional=False,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._periods,
        )

    def rotate_at(self, x: mx.array, positions: mx.array) -> mx.array:
        """Rotate x (B, H, L, D) at explicit integer positions (L,), cos/sin from fp32 angles."""
        self._check_x(x)
        if positions.ndim < 1 or positions.shape[-1] != x.shape[-2]:
            raise ValueError(
                f"positions of shape {tuple(positions.shape)} do not match L={x.shape[-2]}"
            )
        out = apply_rotary(x, positions, self._inv_freq)
        if self.attention_scale != 1.0:
            out = out * self.attention_scale
        return out
