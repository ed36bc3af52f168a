"""The settings of a training run and what it reports: `TrainingConfig`, `TrainingProgress`
(the events a callback receives) and `TrainingResult`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant")


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
