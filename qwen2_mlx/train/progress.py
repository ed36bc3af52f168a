"""Progress lines of a training run, as `qwen2-mlx lora` and `dpo` print them."""

from __future__ import annotations

import math

import click


def progress_bar(step: int, total: int, width: int = 20) -> str:
    """``[=====     ]``: `step` of `total` as a bar of `width` characters."""
    filled = width * step // max(total, 1)
    return "[" + "=" * filled + " " * (width - filled) + "]"


class ProgressPrinter:
    """Prints a run's `TrainingProgress` events (the `callback` of `train`): on a terminal
    (`live`) a bar redrawn every step, and a line per report, validation and checkpoint.
    Objectives with their own metrics override `step_line` / `validation_line`."""

    def __init__(self, live: bool):
        self.live = live

    def step_line(self, p) -> str:
        return (f"Step {p.step}/{p.iters} {progress_bar(p.step, p.iters)} train loss "
                f"{p.train_loss:.4f} | lr {p.learning_rate:.2e} | "
                f"{p.tokens_per_second:.1f} tok/s | peak {p.peak_memory_gb:.2f} GB")

    def validation_line(self, p) -> str:
        return (f"Step {p.step}: val loss {p.val_loss:.4f}, "
                f"val ppl {math.exp(min(p.val_loss, 50)):.3f}")

    def __call__(self, p) -> None:
        if p.event == "start":
            share = 100.0 * p.trainable_parameters / max(p.total_parameters, 1)
            click.echo(f"Trainable parameters: {share:.3f}% "
                       f"({p.trainable_parameters / 1e6:.3f}M / {p.total_parameters / 1e6:.1f}M)")
            if p.step:
                click.echo(f"Resuming at step {p.step} of {p.iters}")
        elif p.event == "step":
            line = self.step_line(p)
            if p.report:
                click.echo(("\r" if self.live else "") + line)
            elif self.live:
                click.echo("\r" + line, nl=False)
        elif p.event == "validation":
            click.echo(self.validation_line(p))
        elif p.event == "checkpoint":
            click.echo(f"Step {p.step}: saved adapters to {p.checkpoint}")
        elif p.event == "done":
            click.echo(f"Done at step {p.step}: {p.tokens_per_second:.1f} tok/s, "
                       f"peak memory {p.peak_memory_gb:.2f} GB, adapters in {p.checkpoint}")
