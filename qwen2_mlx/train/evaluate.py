"""The evaluation routine every objective uses: sums of a per-batch score over the first
length-sorted batches of a dataset, with dropout off."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from qwen2_mlx.train.data import BatchSchedule, Examples

# score(example indices of one batch) -> (the batch's summed values, its number of terms)
Score = Callable[[Sequence[int]], tuple[mx.array, int]]


def evaluate_batches(model: nn.Module, dataset: Examples, score: Score, *, batch_size: int = 4,
                     max_batches: int = -1, pad_id: int = 0) -> tuple[np.ndarray, int]:
    """(sum of `score`'s values, sum of its term counts) over the first `max_batches`
    length-sorted batches of `dataset` (-1: all), in eval mode (the model's mode is restored
    after). Values are added in float64 on the host, batch by batch."""
    was_training = model.training
    model.eval()
    try:
        plan = BatchSchedule(dataset, min(batch_size, len(dataset)), shuffle=False,
                             pad_id=pad_id)
        n = len(plan) if max_batches < 0 else min(max_batches, len(plan))
        total, count = np.float64(0.0), 0
        for i in range(n):
            value, terms = score(plan.indices(i))
            mx.eval(value)
            total = total + np.array(value, dtype=np.float64)
            count += terms
    finally:
        model.train(was_training)
    return total, count
