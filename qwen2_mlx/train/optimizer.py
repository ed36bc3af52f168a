"""The optimizer of a run and what each update checks: learning-rate schedule (linear warmup,
then cosine or constant), AdamW / Adam / SGD, the global gradient norm and clipping, and the
stop on a NaN/inf loss or gradient before it reaches the adapters."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map, tree_reduce

from qwen2_mlx.train.config import TrainingConfig


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient became NaN or infinite."""


def learning_rate_schedule(config: TrainingConfig) -> Callable[[mx.array], mx.array]:
    """lr for the update that follows `step` earlier updates (mlx optimizers pass the step).

    Warmup starts at lr/warmup rather than 0 so the first update is not wasted.
    """
    lr, warmup, total = config.learning_rate, config.warmup_steps, config.iters
    floor = config.min_learning_rate

    def schedule(step: mx.array) -> mx.array:
        t = step.astype(mx.float32)
        if config.lr_schedule == "constant":
            after = mx.array(lr, dtype=mx.float32)
        else:
            progress = mx.clip((t - warmup) / max(total - warmup, 1), 0.0, 1.0)
            after = floor + (lr - floor) * 0.5 * (1.0 + mx.cos(math.pi * progress))
        if warmup == 0:
            return after
        return mx.where(t < warmup, lr * (t + 1) / warmup, after)

    return schedule


def build_optimizer(config: TrainingConfig) -> optim.Optimizer:
    schedule = learning_rate_schedule(config)
    if config.optimizer == "adamw":
        return optim.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return optim.Adam(learning_rate=schedule)
    return optim.SGD(learning_rate=schedule, momentum=config.momentum,
                     weight_decay=config.weight_decay)


def gradient_norm(grads) -> mx.array:
    """Global L2 norm of a gradient tree, in float32."""
    return mx.sqrt(tree_reduce(lambda acc, g: acc + (g.astype(mx.float32) ** 2).sum(), grads,
                               mx.array(0.0)))


def finish_gradients(grads, count: int, max_grad_norm: float | None):
    """(grads / count, clipped to `max_grad_norm` when given; the norm before clipping).

    `grads` are the summed gradients of `count` loss terms (tokens, preference pairs), so the
    result is the gradient of their mean over all micro-batches.
    """
    grads = tree_map(lambda g: g / count, grads)
    if max_grad_norm is not None:
        return optim.clip_grad_norm(grads, max_grad_norm)
    return grads, gradient_norm(grads)


def check_finite(step: int, loss: float, norm: float, last_saved: int,
                 adapter_path: Path) -> None:
    """Raise TrainingDivergedError when the loss or gradient norm of `step` is NaN/inf."""
    if math.isfinite(loss) and math.isfinite(norm):
        return
    where = (f"the last checkpoint is step {last_saved} in {adapter_path}"
             if last_saved >= 0 else "no adapter was saved")
    raise TrainingDivergedError(
        f"training diverged at step {step}: loss {loss}, gradient norm {norm}; nothing was "
        f"written for this step ({where}). Lower the learning rate, or train in "
        "float32/bfloat16 instead of float16.")
