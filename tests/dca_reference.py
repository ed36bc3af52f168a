"""Independent float64 numpy reference for YaRN and Dual Chunk Attention (spec long-context.md §9).

Written apart from the MLX code and in other forms, so the tests compare two derivations:

* positions come from scalar per-(i, j) branches (``dca_distance``), not array builders;
* ``dca_attention_dense`` uses the relative form: logit[i, j] = (R(M[i, j]) q_i) . k_j with
  *unrotated* keys, which equals R(pq) q_i . R(pk) k_j because RoPE rotations compose;
* ``dca_attention_three_logits`` is the §9 pseudo-code (three full logit matrices picked by
  chunk gap) with per-key temperatures;
* ``dca_decode`` is vLLM's decode (§4.3) with concatenated logits and one softmax;
* ``dca_prefill_vllm_loop`` transcribes vLLM's prefill loop (§4.2) with LSE merging and
  flash-attn's bottom-right causal mask.

Shapes: q (B, Hq, T, d), k and v (B, Hkv, T, d), all float64.
"""

from __future__ import annotations

import math

import numpy as np


# ---------------------------------------------------------------- RoPE and YaRN
def inv_freq(d: int, theta: float) -> np.ndarray:
    return np.array([theta ** (-2.0 * k / d) for k in range(d // 2)], dtype=np.float64)


def yarn(
    d: int, base: float, factor: float, original_max: int, beta_fast=32.0, beta_slow=1.0
) -> tuple[np.ndarray, float, int, int]:
    """§5.1 in float64: returns (inv_freq, mscale, low, high)."""

    def corr_dim(rotations):
        return d * math.log(original_max / (2 * math.pi * rotations)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), d - 1)
    span = (high - low) if high != low else 0.001
    extra = inv_freq(d, base)
    out = np.empty(d // 2)
    for k in range(d // 2):
        ramp = min(max((k - low) / span, 0.0), 1.0)
        out[k] = extra[k] / factor * ramp + extra[k] * (1.0 - ramp)
    mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return out, mscale, low, high


def rope(x: np.ndarray, pos, inv: np.ndarray) -> np.ndarray:
    """rotate_half RoPE of x (..., d) by angles pos * inv; pos broadcasts against x[..., 0]."""
    angles = np.asarray(pos, dtype=np.float64)[..., None] * inv
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = np.cos(angles), np.sin(angles)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# ---------------------------------------------------------------- DCA positions
def length_temperature(n: int, original_max: int) -> float:
    if original_max <= 0:
        return 1.0
    return max(1.0, 0.1 * math.log(n / original_max) + 1.0)


def dca_distance(i: int, j: int, C: int, W: int) -> int:
    """Effective distance for query i and key j <= i, branch by branch (§3.1)."""
    L = C - W
    key_pos = j % L
    gap = i // L - j // L
    if gap == 0:
        query_pos = i % L
    elif gap == 1:
        query_pos = min(i % L + L, C)
    else:
        query_pos = min(2 * L - 1, C)
    return query_pos - key_pos


def distance_matrix(n: int, C: int, W: int) -> np.ndarray:
    M = -np.ones((n, n), dtype=np.int64)
    for i in range(n):
        for j in range(i + 1):
            M[i, j] = dca_distance(i, j, C, W)
    return M


# ---------------------------------------------------------------- attention helpers
def expand_gqa(x: np.ndarray, q_heads: int) -> np.ndarray:
    return np.repeat(x, q_heads // x.shape[1], axis=1)


def softmax(logits: np.ndarray) -> np.ndarray:
    top = logits.max(axis=-1, keepdims=True)
    e = np.exp(logits - top)
    return e / e.sum(axis=-1, keepdims=True)


def causal_rope_attention(q, k, v, inv, scale) -> np.ndarray:
    """Plain causal attention with RoPE at absolute positions (the oracle for T1)."""
    T = q.shape[2]
    t = np.arange(T)
    qr = rope(q, t, inv)
    kr = expand_gqa(rope(k, t, inv), q.shape[1])
    logits = np.einsum("bhid,bhjd->bhij", qr, kr) * scale
    logits = np.where(t[None, :] <= t[:, None], logits, -np.inf)
    return softmax(logits) @ expand_gqa(v, q.shape[1])


def dca_attention_dense(q, k, v, inv, scale, C, W, s_q=1.0, s_k=None) -> np.ndarray:
    """DCA prefill in relative form: logit[i, j] = (R(M[i, j]) q_i) . k_j * scale * s_q * s_k[j]."""
    T = q.shape[2]
    M = distance_matrix(T, C, W)
    s_k = np.ones(T) if s_k is None else np.asarray(s_k, dtype=np.float64)
    q_rel = rope(q[:, :, :, None, :], np.maximum(M, 0), inv)  # (B, H, T, T, d)
    logits = np.einsum("bhijd,bhjd->bhij", q_rel, expand_gqa(k, q.shape[1]))
    logits = logits * scale * s_q * s_k
    logits = np.where(M >= 0, logits, -np.inf)
    return softmax(logits) @ expand_gqa(v, q.shape[1])


def dca_attention_three_logits(q, k, v, inv, scale, C, W, s_q=1.0, s_k=None) -> np.ndarray:
    """§9 pseudo-code: keys rotated at t mod L, three full logit matrices picked by chunk gap."""
    T = q.shape[2]
    L = C - W
    t = np.arange(T)
    s_k = np.ones(T) if s_k is None else np.asarray(s_k, dtype=np.float64)
    K = expand_gqa(rope(k, t % L, inv) * s_k[:, None], q.shape[1])
    V = expand_gqa(v, q.shape[1])
    li = rope(q, t % L, inv) @ K.swapaxes(-1, -2)
    ls = rope(q, np.minimum(t % L + L, C), inv) @ K.swapaxes(-1, -2)
    lx = rope(q, np.full(T, min(2 * L - 1, C)), inv) @ K.swapaxes(-1, -2)
    gap = t[:, None] // L - t[None, :] // L
    logits = np.where(gap == 0, li, np.where(gap == 1, ls, lx)) * scale * s_q
    logits = np.where(t[None, :] <= t[:, None], logits, -np.inf)
    return softmax(logits) @ V


def write_keys(k, start, inv, C, W, s=1.0) -> np.ndarray:
    """Cache form of keys at absolute positions start..: rotated at t mod L, times s."""
    t = start + np.arange(k.shape[2])
    return rope(k, t % (C - W), inv) * s


def dca_decode(q1, k_cache, v_cache, inv, scale, C, W, s_q=1.0) -> np.ndarray:
    """vLLM decode (§4.3): query n-1 against n cached (rotated, scaled) keys, one softmax."""
    n = k_cache.shape[2]
    L = C - W
    p = n - 1
    c = p // L
    K = expand_gqa(k_cache, q1.shape[1])
    V = expand_gqa(v_cache, q1.shape[1])
    blocks = [(p % L, c * L, n)]
    if c >= 1:
        blocks.append((min(p % L + L, C), (c - 1) * L, c * L))
    if c >= 2:
        blocks.append((min(2 * L - 1, C), 0, (c - 1) * L))
    logits, values = [], []
    for pos, lo, hi in blocks:
        qr = rope(q1 * s_q, np.array([pos]), inv)
        logits.append(qr @ K[:, :, lo:hi].swapaxes(-1, -2) * scale)
        values.append(V[:, :, lo:hi])
    return softmax(np.concatenate(logits, axis=-1)) @ np.concatenate(values, axis=2)


def _flash_attn_with_lse(q, k, v, scale, causal):
    """flash-attn semantics: bottom-right aligned causal mask; returns (out, lse)."""
    m, n = q.shape[2], k.shape[2]
    logits = q @ k.swapaxes(-1, -2) * scale
    if causal:
        r = np.arange(m)[:, None]
        logits = np.where(np.arange(n)[None, :] <= n - m + r, logits, -np.inf)
    top = logits.max(axis=-1, keepdims=True)
    e = np.exp(logits - top)
    total = e.sum(axis=-1, keepdims=True)
    return (e / total) @ v, (top + np.log(total))[..., 0]


def dca_prefill_vllm_loop(q, k_cache, v_cache, inv, scale, C, W, s_q=1.0) -> np.ndarray:
    """vLLM prefill loop (§4.2): q holds the last Tq of Tk positions; parts merged by LSE."""
    Tq, Tk = q.shape[2], k_cache.shape[2]
    L = C - W
    qpos = np.arange(Tk - Tq, Tk)
    Qi = rope(q, qpos % L, inv)
    Qs = rope(q, np.minimum(qpos % L + L, C), inv)
    Qx = rope(q, np.full(Tq, min(2 * L - 1, C)), inv)
    K = expand_gqa(k_cache, q.shape[1])
    V = expand_gqa(v_cache, q.shape[1])
    out = np.zeros(q.shape[:3] + (v_cache.shape[-1],))
    begin = Tk - Tq
    while begin < Tk:
        cs = (begin // L) * L
        end = min(cs + L, Tk)
        rows = slice(begin - (Tk - Tq), end - (Tk - Tq))
        parts = [
            _flash_attn_with_lse(
                Qi[:, :, rows], K[:, :, cs:end], V[:, :, cs:end], scale * s_q, causal=True
            )
        ]
        if cs - L >= 0:
            parts.append(
                _flash_attn_with_lse(
                    Qs[:, :, rows],
                    K[:, :, cs - L : cs],
                    V[:, :, cs - L : cs],
                    scale * s_q,
                    causal=False,
                )
            )
        if cs - 2 * L >= 0:
            parts.append(
                _flash_attn_with_lse(
                    Qx[:, :, rows], K[:, :, : cs - L], V[:, :, : cs - L], scale * s_q, causal=False
                )
            )
        lses = np.stack([lse for _, lse in parts])
        w = np.exp(lses - lses.max(axis=0))
        w = w / w.sum(axis=0)
        out[:, :, rows] = sum(wp[..., None] * op for wp, (op, _) in zip(w, parts, strict=True))
        begin = end
    return out
