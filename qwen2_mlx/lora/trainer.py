"""The LoRA training loop: `train(model, tokenizer, data, ...)`.

Loss: next-token cross-entropy summed over the trained target tokens of a batch and divided
by their number (the token-level mean of transformers and mlx-lm). With gradient accumulation
the sums and counts of all micro-batches are added before dividing, so k micro-batches of b
examples give exactly the gradient of one batch of k*b examples.

Every step: forward/backward, a finiteness check of the loss and gradient norm (a NaN/inf
stops training before the update, so no broken adapter is ever written), clipping, and an
optimizer update. Checkpoints hold the adapters and the optimizer state (with its step); the
batch order and the dropout masks are pure functions of (seed, step), so a resumed run
continues exactly as an uninterrupted one. That loop, `run_training`, also trains DPO
(qwen2_mlx.dpo): an `Objective` gives it the batches, the loss and what its events report.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_reduce, tree_unflatten

from qwen2_mlx.lora.adapters import (
    ADAPTER_FILE,
    load_adapter_weights,
    load_training_state,
    prepare_adapter_dir,
    read_adapter_config,
    resolve_adapter_files,
    save_adapter,
    save_training_state,
    state_file_for,
)
from qwen2_mlx.lora.data import Batch, BatchSchedule, Dataset, load_datasets
from qwen2_mlx.lora.grad_checkpoint import disable_grad_checkpoint, enable_grad_checkpoint
from qwen2_mlx.lora.layers import (
    LoRAConfig,
    apply_lora,
    lora_config_of,
    lora_layers,
    trainable_parameter_count,
)

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant")


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient became NaN or infinite."""


@dataclass
class TrainingConfig:
    """Settings of a training run (defaults suit a 0.5B-7B model on a Mac).

    `iters` counts optimizer updates; each consumes `grad_accumulation_steps` batches.
    `val_batches` of -1 evaluates the whole validation set. `max_grad_norm` None disables
    clipping. The learning rate rises linearly over `warmup_steps` updates, then follows
    `lr_schedule` ("cosine": half a cosine from `learning_rate` down to `min_learning_rate`
    at `iters`; "constant").
    """

    iters: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    momentum: float = 0.0
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    min_learning_rate: float = 0.0
    grad_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    grad_checkpoint: bool = False
    max_seq_length: int = 2048
    mask_prompt: bool = True
    chat: bool = True
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25
    save_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("batch_size", "grad_accumulation_steps", "steps_per_report",
                    "steps_per_eval", "save_every", "max_seq_length")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.iters < 0:
            raise ValueError(f"iters must be >= 0, got {self.iters}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, "
                             f"got {self.optimizer!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, "
                             f"got {self.lr_schedule!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (or None), got {self.max_grad_norm}")
        if self.val_batches == 0 or self.val_batches < -1:
            raise ValueError(f"val_batches must be >= 1 or -1 (all), got {self.val_batches}")


@dataclass
class TrainingProgress:
    """What the progress callback receives.

    event: "start" (before the first step), "step" (after every update; `report` is True
    every `steps_per_report` steps and at the last one, with `train_loss` and
    `tokens_per_second` averaged since the previous report), "validation", "checkpoint"
    (`checkpoint` is the file written) or "done".
    """

    event: str
    step: int
    iters: int
    train_loss: float | None = None
    val_loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    trained_tokens: int = 0
    peak_memory_gb: float = 0.0
    elapsed_s: float = 0.0
    report: bool = False
    checkpoint: Path | None = None
    trainable_parameters: int = 0
    total_parameters: int = 0


@dataclass
class TrainingResult:
    step: int
    train_losses: list[float] = field(default_factory=list)  # one per step of this run
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    adapter_file: Path | None = None
    stopped_early: bool = False
    tokens_per_second: float = 0.0
    peak_memory_gb: float = 0.0


Callback = Callable[[TrainingProgress], "bool | None"]


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


def trained_logits(model: nn.Module, inputs: mx.array, positions: mx.array) -> mx.array:
    """Logits (N, vocab) at the flat `positions` of the (B, L) grid only.

    The output head runs on the trained positions alone, so masked prompt tokens cost no
    (B, L, vocab) logits tensor; the result equals ``model(inputs)`` gathered there.
    """
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(model, "config"):
        logits = model(inputs)
        return logits.reshape(-1, logits.shape[-1])[positions]
    hidden = inner(inputs)
    hidden = hidden.reshape(-1, hidden.shape[-1])[positions]
    if model.config.tie_word_embeddings:
        return inner.embed_tokens.as_linear(hidden)
    return model.lm_head(hidden)


def batch_loss_sum(model: nn.Module, batch: Batch) -> mx.array:
    """Sum over the batch's trained targets of -log p(target), in float32."""
    logits = trained_logits(model, batch.inputs, batch.positions).astype(mx.float32)
    targets = batch.targets.reshape(-1)[batch.positions]
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return (mx.logsumexp(logits, axis=-1) - picked).sum()


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 4,
             max_batches: int = -1) -> float:
    """Token-level mean loss over `dataset` (first `max_batches` length-sorted batches; -1: all),
    with dropout off."""
    was_training = model.training
    model.eval()
    try:
        plan = BatchSchedule(dataset, min(batch_size, len(dataset)), shuffle=False)
        n = len(plan) if max_batches < 0 else min(max_batches, len(plan))
        total, count = 0.0, 0
        for i in range(n):
            batch = plan.batch(i)
            loss = batch_loss_sum(model, batch)
            mx.eval(loss)
            total += loss.item()
            count += batch.trained
    finally:
        model.train(was_training)
    return total / max(count, 1)


# ------------------------------------------------------------------------------------------
# Pieces of the training loop, public so that other trainers (qwen2_mlx.dpo) share them.


def micro_seed(seed: int, index: int) -> int:
    """The MLX seed for micro-batch `index` of a run seeded with `seed` (dropout masks are a
    function of (seed, index), so a resumed run draws the masks a straight run would)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


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


def restore_optimizer(optimizer: optim.Optimizer, model: nn.Module, flat: dict) -> None:
    optimizer.init(model.trainable_parameters())
    expected = dict(tree_flatten(optimizer.state))
    if set(flat) != set(expected):
        raise ValueError("the training state does not match the adapters being trained "
                         "(different targets, rank or optimizer); resume with the same settings")
    optimizer.state = tree_unflatten(list(flat.items()))


def prepare_adapters(model: nn.Module, lora: LoRAConfig | None, seed: int,
                     resume_adapter_file: str | os.PathLike | None = None,
                     ) -> tuple[LoRAConfig, Path | None]:
    """Give `model` LoRA layers to train: keep the ones it has, or add them from `lora` (read
    from the checkpoint's adapter_config.json when resuming without one). Returns the
    adapters' config and the adapter file to resume from (None for a fresh run)."""
    resume_file = None
    if resume_adapter_file is not None:
        resume_file, resume_config_file = resolve_adapter_files(resume_adapter_file)
        if lora is None:
            lora, _ = read_adapter_config(resume_config_file)
    if lora_layers(model):
        lora = lora or lora_config_of(model)
    else:
        lora = lora or LoRAConfig()
        mx.random.seed(seed)
        apply_lora(model, lora)
    return lora, resume_file


def resume_checkpoint(model: nn.Module, optimizer: optim.Optimizer, resume_file: Path) -> int:
    """Load the adapter weights of `resume_file` and its optimizer state; returns its step."""
    saved_step = load_adapter_weights(model, resume_file)
    state_file = state_file_for(resume_file)
    if not state_file.is_file():
        # stacklevel: resume_checkpoint < start_training < train / train_dpo < the caller.
        warnings.warn(f"{state_file} not found: resuming from the adapter weights with a "
                      "fresh optimizer at step 0", stacklevel=4)
        return 0
    flat, step = load_training_state(state_file)
    if saved_step is not None and saved_step != step:
        raise ValueError(f"{resume_file} is from step {saved_step} but {state_file} "
                         f"from step {step}: the checkpoint pair is torn")
    restore_optimizer(optimizer, model, flat)
    return step


def save_checkpoint(model: nn.Module, optimizer: optim.Optimizer, adapter_path: Path,
                    lora: LoRAConfig, step: int, *, numbered: bool,
                    extra: dict | None = None) -> Path:
    """Write adapters.safetensors + training_state.safetensors (and the numbered pair
    ``0000100_*`` when `numbered`) with adapter_config.json; returns adapters.safetensors."""
    names = [f"{step:07d}_{ADAPTER_FILE}"] if numbered else []
    for name in names + [ADAPTER_FILE]:
        adapter_file = adapter_path / name
        save_training_state(state_file_for(adapter_file), optimizer.state, step)
        save_adapter(model, adapter_path, lora, file_name=name, step=step, extra=extra)
    return adapter_path / ADAPTER_FILE


@dataclass
class TrainingStart:
    """Where a run begins: the optimizer (restored from the checkpoint when resuming), the step
    it is at, and the model's parameter counts (for the "start" event)."""

    optimizer: optim.Optimizer
    step: int
    resumed: bool
    trainable_parameters: int
    total_parameters: int


def start_training(model: nn.Module, config: TrainingConfig,
                   resume_file: Path | None) -> TrainingStart:
    """Check that `model` has adapters to train, build the optimizer and, when `resume_file`
    is given, restore the adapters, the optimizer state and the step from it."""
    trainable, total = trainable_parameter_count(model)
    if trainable == 0:
        raise ValueError("the model has no trainable adapter parameters")
    optimizer = build_optimizer(config)
    step = 0 if resume_file is None else resume_checkpoint(model, optimizer, resume_file)
    if step > config.iters:
        raise ValueError(f"the checkpoint is at step {step}, past iters={config.iters}")
    return TrainingStart(optimizer, step, resume_file is not None, trainable, total)


# ------------------------------------------------------------------------------------------
# The training loop, shared by LoRA fine-tuning (`train`) and DPO (`qwen2_mlx.dpo.train_dpo`):
# an Objective supplies the batches, the loss and what its events report.


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


# ------------------------------------------------------------------------------------------
# LoRA fine-tuning: next-token cross-entropy.


class CrossEntropyObjective(Objective):
    """The token-level mean cross-entropy of `batch_loss_sum` on a `Dataset`."""

    def __init__(self, model: nn.Module, train_set: Dataset, valid_set: Dataset | None,
                 config: TrainingConfig, pad_id: int = 0):
        super().__init__(model, train_set, valid_set, config, pad_id)
        self._loss_and_grad = nn.value_and_grad(model, batch_loss_sum)

    def micro_batch(self, index: int) -> Batch:
        return self.schedule.batch(index)

    def loss_and_grad(self, batch: Batch) -> MicroStep:
        loss, grads = self._loss_and_grad(self.model, batch)
        return MicroStep(loss, grads, terms=batch.trained, tokens=batch.tokens,
                         trained_tokens=batch.trained)

    def validate(self, result: TrainingResult, step: int) -> tuple[float, dict]:
        config = self.config
        return evaluate(self.model, self.valid_set, config.batch_size, config.val_batches), {}


def train(
    model: nn.Module,
    tokenizer,
    data: str | os.PathLike | dict[str, Dataset | None],
    *,
    adapter_path: str | os.PathLike = "adapters",
    lora: LoRAConfig | None = None,
    config: TrainingConfig | None = None,
    resume_adapter_file: str | os.PathLike | None = None,
    callback: Callback | None = None,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> TrainingResult:
    """Fine-tune LoRA adapters on `model` and save them under `adapter_path`.

    Args:
        model: a loaded base model (float or quantized: QLoRA), with or without LoRA layers;
            LoRA layers are added from `lora` when it has none.
        tokenizer: the model's tokenizer (renders chat data; may be None when `data` holds
            already tokenized datasets).
        data: a directory with train.jsonl (and valid.jsonl), or {"train": Dataset,
            "valid": Dataset or None} from `load_datasets`.
        adapter_path: output directory: adapters.safetensors, adapter_config.json,
            training_state.safetensors and numbered checkpoints every `save_every` steps.
        lora: what to adapt (default LoRAConfig(); read from the adapter's config on resume).
        config: training settings (default TrainingConfig()).
        resume_adapter_file: an adapters.safetensors (or numbered checkpoint) to continue
            from; its training_state file restores the optimizer and step.
        callback: called with a TrainingProgress on each event; returning False stops
            training after saving the adapters (for a Stop button).
        metadata: extra fields for adapter_config.json (e.g. the base model's name).
        overwrite: replace the adapters of an earlier run in `adapter_path`; without it (and
            without `resume_adapter_file`) a directory that already holds files is refused.

    The adapter directory is checked (and created) before anything else, so a bad path
    fails at once, not at the first save. Raises TrainingDivergedError when the loss or
    gradient turns NaN/inf; the adapters of that step are not written (earlier checkpoints
    stay). The global MLX random seed is
    reset from `config.seed` at each step (dropout masks and LoRA init are reproducible).
    """
    config = config or TrainingConfig()
    adapter_path = prepare_adapter_dir(adapter_path, resuming=resume_adapter_file is not None,
                                       overwrite=overwrite)
    if isinstance(data, dict):
        datasets = data
    else:
        datasets = load_datasets(data, tokenizer, splits=("train", "valid"),
                                 max_seq_length=config.max_seq_length,
                                 mask_prompt=config.mask_prompt, chat=config.chat)
    train_set, valid_set = datasets["train"], datasets.get("valid")
    lora, resume_file = prepare_adapters(model, lora, config.seed, resume_adapter_file)
    start = start_training(model, config, resume_file)
    objective = CrossEntropyObjective(model, train_set, valid_set, config,
                                      pad_id=getattr(tokenizer, "pad_token_id", None) or 0)
    return run_training(objective, start, TrainingResult(step=start.step), config=config,
                        adapter_path=adapter_path, lora=lora,
                        extra={"training": asdict(config), **(metadata or {})},
                        callback=callback)


__all__ = [
    "CrossEntropyObjective",
    "MicroStep",
    "Objective",
    "TrainingConfig",
    "TrainingDivergedError",
    "TrainingProgress",
    "TrainingResult",
    "TrainingStart",
    "batch_loss_sum",
    "build_optimizer",
    "check_finite",
    "evaluate",
    "finish_gradients",
    "gradient_norm",
    "learning_rate_schedule",
    "micro_seed",
    "prepare_adapters",
    "restore_optimizer",
    "resume_checkpoint",
    "run_training",
    "save_checkpoint",
    "start_training",
    "train",
    "trained_logits",
]
