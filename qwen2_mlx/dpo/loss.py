"""DPO losses and the metrics TRL users read, per preference pair.

With the policy's and the reference's summed reply log-probabilities, the implicit rewards
are ``r_c = beta * (log pi(y_c|x) - log ref(y_c|x))`` and likewise ``r_r`` (Rafailov et al.
2023, eq. 5), and ``h = (log pi_c - log pi_r) - (log ref_c - log ref_r)``. The losses follow
TRL's `DPOTrainer` (huggingface/trl, trl/trainer/dpo_trainer.py):

- ``sigmoid``: ``-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``: DPO (eq. 7 of the
  paper), and with label smoothing ``eps`` conservative DPO (Mitchell 2023, eq. 3), as TRL's
  "sigmoid" loss computed it up to v0.28 (later versions moved smoothing to other loss names);
- ``hinge``: ``max(0, 1 - beta h)`` (SLiC, Zhao et al. 2023);
- ``ipo``: ``(h' - 1 / (2 beta))^2`` (Azar et al. 2023, eq. 17, beta is their tau) where
  ``h'`` divides each reply's log-ratio by its number of scored tokens, as TRL does (the IPO
  authors confirmed to TRL that their results use this length normalisation).

The rewards, margins and accuracies are always from the summed log-ratios (TRL v1). The
accuracy is per pair, ``r_c > r_r`` (a tie counts as wrong, so an untrained adapter scores 0,
as in TRL); mlx-lm-lora compares batch-mean rewards instead, which is not an accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

LOSS_TYPES = ("sigmoid", "ipo", "hinge")

# Metric names as TRL logs them; `metric_sums` returns their sums over pairs in this order.
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected")


def check_loss_settings(beta: float, loss_type: str, label_smoothing: float) -> None:
    """Raise ValueError for settings the losses are not defined for."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) (the assumed share of flipped "
                         f"labels), got {label_smoothing!r}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to the sigmoid loss only (conservative DPO), "
                         f"not to {loss_type!r}")


def _log_sigmoid(x: mx.array) -> mx.array:
    return -mx.logaddexp(mx.zeros_like(x), -x)


@dataclass
class PairLosses:
    """Per-pair values (each of shape (B,)): the loss and the implicit rewards (detached)."""

    losses: mx.array
    chosen_rewards: mx.array
    rejected_rewards: mx.array


def dpo_loss(policy_chosen: mx.array, policy_rejected: mx.array, ref_chosen: mx.array,
             ref_rejected: mx.array, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_lengths: mx.array | None = None,
             rejected_lengths: mx.array | None = None) -> PairLosses:
    """Per-pair DPO / IPO / hinge losses from summed reply log-probs (all of shape (B,)).

    `chosen_lengths` / `rejected_lengths` (scored tokens per reply) are needed for "ipo" only.
    """
    check_loss_settings(beta, loss_type, label_smoothing)
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the ipo loss needs the replies' token counts (chosen_lengths and "
                             "rejected_lengths)")
        h = (chosen_ratio / mx.maximum(chosen_lengths, 1.0)
             - rejected_ratio / mx.maximum(rejected_lengths, 1.0))
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        h = chosen_ratio - rejected_ratio
        if loss_type == "sigmoid":
            losses = -_log_sigmoid(beta * h)
            if label_smoothing:
                losses = ((1.0 - label_smoothing) * losses
                          - label_smoothing * _log_sigmoid(-beta * h))
        else:  # hinge
            losses = mx.maximum(1.0 - beta * h, 0.0)
    return PairLosses(losses, mx.stop_gradient(beta * chosen_ratio),
                      mx.stop_gradient(beta * rejected_ratio))


def metric_sums(pair: PairLosses, policy_chosen: mx.array,
                policy_rejected: mx.array) -> mx.array:
    """(len(METRICS),) float32: each metric summed over the pairs of a batch; dividing the
    sums of all micro-batches by their pair count gives TRL's per-pair means."""
    chosen, rejected = pair.chosen_rewards, pair.rejected_rewards
    columns = [pair.losses, chosen, rejected, chosen - rejected,
               (chosen > rejected).astype(mx.float32), policy_chosen, policy_rejected]
    return mx.stop_gradient(mx.stack([c.astype(mx.float32).sum() for c in columns]))


def metrics_dict(sums: mx.array | np.ndarray, pairs: int) -> dict[str, float]:
    """{metric name: mean over `pairs`} from accumulated `metric_sums`."""
    values = (sums / max(pairs, 1)).tolist()
    return dict(zip(METRICS, values, strict=True))
