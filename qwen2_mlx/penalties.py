"""OpenAI's sampling adjustments as logits processors: presence and frequency penalties, and
logit_bias.

OpenAI defines (API reference, "Parameter details: frequency and presence penalties")

    mu[j] -> mu[j] - c[j] * frequency_penalty - float(c[j] > 0) * presence_penalty

where c[j] counts how often token j was sampled before the current position: the generated
tokens, not the prompt (as vLLM does). `logit_bias` adds a bias in [-100, 100] to chosen token
ids. Each processor is ``(tokens, logits) -> logits`` like `qwen2_mlx.sampling`'s: `tokens`
is the sequence's history (prompt, then generated ids), `logits` one row (1, vocab).
"""

from __future__ import annotations

from collections.abc import Mapping

import mlx.core as mx

from qwen2_mlx.sampling import LogitsProcessor


def presence_frequency_penalty(presence: float, frequency: float,
                               prompt_length: int) -> LogitsProcessor:
    """Subtract `presence` once and `frequency` per occurrence for each generated token
    (history positions from `prompt_length` on)."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        generated = tokens.reshape(-1)[prompt_length:]
        x = logits.astype(mx.float32)
        if generated.size == 0:
            return x
        vocab = x.shape[-1]
        counts = mx.zeros((vocab,), mx.float32).at[generated.astype(mx.int32)].add(1.0)
        return x - frequency * counts - presence * (counts > 0).astype(mx.float32)

    return process


def logit_bias(bias: Mapping[int, float], vocab_size: int) -> LogitsProcessor:
    """Add `bias[id]` to the logit of each listed token id."""
    ids = mx.array(list(bias.keys()), dtype=mx.int32)
    dense = mx.zeros((vocab_size,), mx.float32).at[ids].add(
        mx.array(list(bias.values()), dtype=mx.float32))

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        return logits.astype(mx.float32) + dense[: logits.shape[-1]]

    return process
