"""The training loop shared by every objective: `run_training`.

A step adds the losses and gradients of `grad_accumulation_steps` micro-batches and divides
by their number of loss terms (tokens for cross-entropy, pairs for DPO), so k micro-batches of b
examples give exactly the gradient of one batch of k*b; then a finiteness check of the loss and
gradient norm (a NaN/inf stops training before the update, so no broken adapter is ever
written), clipping, and an optimizer update. An `Objective` (LoRA fine-tuning in
`qwen2_mlx.train.finetune`, DPO in `qwen2_mlx.dpo`) supplies the batches, the loss and what its
events report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from qwen2_mlx.lora.adapters import ADAPTER_FILE
from qwen2_mlx.lora.layers import LoRAConfig
from qwen2_mlx.train.checkpoint import TrainingStart, save_checkpoint
from qwen2_mlx.train.config import TrainingConfig, TrainingProgress, TrainingResult
from qwen2_mlx.train.data import BatchSchedule
from qwen2_mlx.train.grad_checkpoint import disable_grad_checkpoint, enable_grad_checkpoint
from qwen2_mlx.train.optimizer import check_finite, finish_gradients


def micro_seed(seed: int, index: int) -> int:
    """The MLX seed for micro-batch `index` of a run seeded with `seed` (dropout masks are a
    function of (seed, index), so a resumed run draws the masks a straight run would)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


@dataclass
class MicroStep:
    """One micro-batch's share of a training step."""

    loss_sum: mx.array  # the sum of the micro-batch's loss terms
    grads: dict  # the gradient of loss_sum with respect to the trainable parameters
    terms: int  # loss terms: trained target tokens (cross-entropy) or pairs (DPO)
    tokens: int  # input tokens run through the model, for tokens/s
    trained_tokens: int  # target tokens the loss scored
    metric_sums: mx.array | None = None  # the objective's own metrics, summed over the terms


class Objective:
    """What `run_training` optimises: batches of `train_set` in the order of a
    `BatchSchedule` (a pure function of (seed, batch index), so resume is exact), the loss of
    one, and the validation. Subclasses implement `micro_batch`, `loss_and_grad` and
    `validate`; the report hooks below report the plain loss and can be overridden to add the
    objective's own metrics to the events (DPO)."""

    progress_type: type[TrainingProgress] = TrainingProgress

    def __init__(self, model: nn.Module, train_set, valid_set, config: TrainingConfig,
                 pad_id: int = 0):
        self.model, self.valid_set, self.config = model, valid_set, config
        self.schedule = BatchSchedule(train_set, config.batch_size, seed=config.seed,
                                      pad_id=pad_id)

    def micro_batch(self, index: int):
        """Training batch `index` (0-based, running over micro-batches and epochs)."""
        raise NotImplementedError

    def loss_and_grad(self, batch) -> MicroStep:
        """Loss sum and gradient of `batch` under the model (dropout on)."""
        raise NotImplementedError

    def validate(self, result: TrainingResult, step: int) -> tuple[float, dict]:
        """(validation loss, further fields of the "validation" event) at `step`."""
        raise NotImplementedError

    def step_fields(self, result: TrainingResult, metric_sums, terms: int) -> dict:
        """Further fields of a "step" event, from the step's `metric_sums` over its `terms`
        loss terms (an objective with metrics also records them in `result`)."""
        return {}

    def report_fields(self) -> dict:
        """Fields of a reporting "step" event that replace the loop's averages since the
        previous report (the mean of the step losses)."""
        return {}

    def done_fields(self, result: TrainingResult) -> dict:
        """Further fields of the "done" event."""
        return {}


def run_training(objective: Objective, start: TrainingStart, result: TrainingResult, *,
                 config: TrainingConfig, adapter_path: Path, lora: LoRAConfig, extra: dict,
                 callback: Callable | None = None) -> TrainingResult:
    """Train from `start` to `config.iters` updates (or until `callback` returns False),
    filling `result`; the loop of `train` and `train_dpo`.

    A step adds the losses and gradients of `config.grad_accumulation_steps` micro-batches
    and divides them by the number of loss terms (so k micro-batches of b examples give the
    gradient of one batch of k*b), checks loss and gradient norm are finite, clips and
    updates. Validation runs every `steps_per_eval` steps and at the last one; checkpoints
    are saved every `save_every` steps and at the end (with `extra` in adapter_config.json).
    """
    model, optimizer, progress_type = objective.model, start.optimizer, objective.progress_type
    last_saved = start.step if start.resumed else -1

    def emit(progress: TrainingProgress) -> bool:
        return callback is None or callback(progress) is not False

    def save(step: int, numbered: bool) -> None:
        nonlocal last_saved
        result.adapter_file = save_checkpoint(model, optimizer, adapter_path, lora, step,
                                              numbered=numbered, extra=extra)
        last_saved = step
        emit(progress_type("checkpoint", step, config.iters, checkpoint=result.adapter_file,
                           peak_memory_gb=mx.get_peak_memory() / 1e9))

    blocks = list(getattr(model, "layers", []))
    if config.grad_checkpoint:
        enable_grad_checkpoint(blocks)
    mx.reset_peak_memory()
    model.train()
    started = time.perf_counter()
    keep_going = emit(progress_type("start", start.step, config.iters,
                                    trainable_parameters=start.trainable_parameters,
                                    total_parameters=start.total_parameters))
    # Sums since the previous report, for the averages of a reporting step event.
    window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
    all_tokens, all_time, trained_tokens = 0, 0.0, 0
    step = start.step
    try:
        while keep_going and step < config.iters:
            step += 1
            tic = time.perf_counter()
            loss_sum, metric_sums, terms, tokens, scored, grads = (
                mx.array(0.0), 0.0, 0, 0, 0, None)
            for micro in range(config.grad_accumulation_steps):
                index = (step - 1) * config.grad_accumulation_steps + micro
                batch = objective.micro_batch(index)
                mx.random.seed(micro_seed(config.seed, index))
                part = objective.loss_and_grad(batch)
                grads = part.grads if grads is None else tree_map(mx.add, grads, part.grads)
                loss_sum = loss_sum + part.loss_sum
                if part.metric_sums is not None:
                    metric_sums = metric_sums + part.metric_sums
                mx.eval(loss_sum, metric_sums, grads)
                terms += part.terms
                tokens += part.tokens
                scored += part.trained_tokens
            if terms == 0:  # cross-entropy only: a DPO batch always holds pairs
                raise ValueError(f"step {step}: the batches hold no trained token (all were "
                                 "truncated away); raise max_seq_length")
            grads, norm = finish_gradients(grads, terms, config.max_grad_norm)
            loss = loss_sum / terms
            mx.eval(loss, norm, grads)
            loss_value, norm_value = loss.item(), norm.item()
            check_finite(step, loss_value, norm_value, last_saved, adapter_path)
            optimizer.update(model, grads)
            mx.eval(model.trainable_parameters(), optimizer.state)
            elapsed = time.perf_counter() - tic
            lr = optimizer.learning_rate.item()  # the rate this update used

            result.train_losses.append(loss_value)
            trained_tokens += scored
            window_loss += loss_value
            window_steps += 1
            window_tokens += tokens
            window_time += elapsed
            all_tokens += tokens
            all_time += elapsed
            report = step % config.steps_per_report == 0 or step == config.iters
            fields = {"train_loss": loss_value, "tokens_per_second": tokens / elapsed,
                      **objective.step_fields(result, metric_sums, terms)}
            if report:
                fields.update(train_loss=window_loss / window_steps,
                              tokens_per_second=window_tokens / window_time)
                fields.update(objective.report_fields())
                window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
            keep_going = emit(progress_type(
                "step", step, config.iters, learning_rate=lr, grad_norm=norm_value,
                trained_tokens=trained_tokens, peak_memory_gb=mx.get_peak_memory() / 1e9,
                elapsed_s=time.perf_counter() - started, report=report, **fields))

            if objective.valid_set is not None and (step % config.steps_per_eval == 0
                                                    or step == config.iters):
                val_loss, val_fields = objective.validate(result, step)
                result.val_losses.append((step, val_loss))
                keep_going = emit(progress_type(
                    "validation", step, config.iters, val_loss=val_loss,
                    peak_memory_gb=mx.get_peak_memory() / 1e9,
                    elapsed_s=time.perf_counter() - started, **val_fields)) and keep_going
            if step % config.save_every == 0:
                save(step, numbered=True)
        result.stopped_early = step < config.iters
        if last_saved != step:
            save(step, numbered=False)
        elif result.adapter_file is None:
            result.adapter_file = adapter_path / ADAPTER_FILE
    finally:
        model.eval()
        if config.grad_checkpoint:
            disable_grad_checkpoint(blocks)
    result.step = step
    result.tokens_per_second = all_tokens / all_time if all_time > 0 else 0.0
    result.peak_memory_gb = mx.get_peak_memory() / 1e9
    emit(progress_type("done", step, config.iters,
                       train_loss=result.train_losses[-1] if result.train_losses else None,
                       val_loss=result.val_losses[-1][1] if result.val_losses else None,
                       tokens_per_second=result.tokens_per_second,
                       trained_tokens=trained_tokens, peak_memory_gb=result.peak_memory_gb,
                       elapsed_s=time.perf_counter() - started,
                       checkpoint=result.adapter_file, **objective.done_fields(result)))
    return result
