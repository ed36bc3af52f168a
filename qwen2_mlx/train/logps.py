"""Log-probabilities of target tokens: the one computation behind the fine-tuning loss, DPO's
sequence log-probs and every evaluation.

The output head runs on the scored positions only (`trained_logits`), so prompt and padding
tokens cost no (B, L, vocab) logits tensor.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from qwen2_mlx.train.data import Batch


def trained_logits(model: nn.Module, inputs: mx.array, positions: mx.array) -> mx.array:
    """Logits (N, vocab) at the flat `positions` of the (B, L) grid only.

    The output head runs on the trained positions alone, so masked prompt tokens cost no
    (B, L, vocab) logits tensor; the result equals ``model(inputs)`` gathered there.
    """
    if not hasattr(model, "head"):  # any callable returning logits (a test stand-in)
        logits = model(inputs)
        return logits.reshape(-1, logits.shape[-1])[positions]
    hidden = model.model(inputs)
    return model.head(hidden.reshape(-1, hidden.shape[-1])[positions])




def token_logps(model: nn.Module, batch: Batch) -> mx.array:
    """(N,) float32 ``log p(target)`` of each of the batch's N scored targets, in the flat
    order of ``batch.positions`` (row-major over the (B, L) grid)."""
    logits = trained_logits(model, batch.inputs, batch.positions).astype(mx.float32)
    targets = batch.targets.reshape(-1)[batch.positions]
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return picked - mx.logsumexp(logits, axis=-1)
