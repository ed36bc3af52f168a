"""`qwen2-mlx lora`: fine-tune LoRA / DoRA / QLoRA adapters on JSONL data."""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import click

from qwen2_mlx.cli.errors import click_error

DEFAULT_MODEL = "Qwen/Qwen2-0.5B-Instruct"
T = TypeVar("T")


def _bar(step: int, total: int, width: int = 20) -> str:
    filled = width * step // max(total, 1)
    return "[" + "=" * filled + " " * (width - filled) + "]"


class ProgressPrinter:
    """Prints the training events: a live bar on a terminal, a line per report."""

    def __init__(self, live: bool):
        self.live = live

    def step_line(self, p) -> str:
        return (f"Step {p.step}/{p.iters} {_bar(p.step, p.iters)} train loss "
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


# Shared with `qwen2-mlx dpo`, whose adapter and training options are this command's own.


def training_settings(o: dict):
    """(LoRAConfig, TrainingConfig) from the command's options."""
    from qwen2_mlx.lora import LoRAConfig, TrainingConfig

    lora = LoRAConfig(rank=o["rank"], alpha=o["alpha"], dropout=o["dropout"],
                      targets=o["targets"], num_layers=o["num_layers"], dora=o["dora"])
    data_format = {name: o[name] for name in ("mask_prompt", "chat") if name in o}  # lora only
    config = TrainingConfig(
        iters=o["iters"], batch_size=o["batch_size"], learning_rate=o["learning_rate"],
        optimizer=o["optimizer"], weight_decay=o["weight_decay"], lr_schedule=o["lr_schedule"],
        warmup_steps=o["warmup_steps"], grad_accumulation_steps=o["grad_accumulation_steps"],
        max_grad_norm=o["max_grad_norm"] or None, grad_checkpoint=o["grad_checkpoint"],
        max_seq_length=o["max_seq_length"], steps_per_report=o["steps_per_report"],
        steps_per_eval=o["steps_per_eval"], val_batches=o["val_batches"],
        save_every=o["save_every"], seed=o["seed"], **data_format,
    )
    return lora, config


def load_base_model(o: dict):
    """(model, tokenizer) of --model in --dtype, quantized in memory with --q-bits (QLoRA)."""
    from qwen2_mlx.loader import load
    from qwen2_mlx.lora.quantize import quantize_base

    model, tokenizer = load(o["model"], dtype=o["dtype"])
    if o["q_bits"] is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quantize_base(model, bits=int(o["q_bits"]), group_size=int(o["q_group_size"]))
        for warning in caught:
            click.echo(f"Warning: {warning.message}", err=True)
    return model, tokenizer


def base_metadata(o: dict) -> dict:
    """What adapter_config.json records of the base model."""
    q_bits = o["q_bits"]
    return {"base_model": str(o["model"]),
            "base_quantization": ({"bits": int(q_bits), "group_size": int(o["q_group_size"])}
                                  if q_bits else None)}


def echo_truncation_warnings(load_data: Callable[[], T]) -> T:
    """Run `load_data`, printing its TruncationWarnings (every one) to stderr."""
    from qwen2_mlx.lora import TruncationWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncationWarning)
        data = load_data()
    for warning in caught:
        click.echo(f"Warning: {warning.message}", err=True)
    return data


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Report the errors of bad settings, data or files as one-line ClickExceptions."""
    from qwen2_mlx.lora import TrainingDivergedError

    try:
        yield
    except (TrainingDivergedError, OSError, ValueError, NotImplementedError) as e:
        raise click_error(e) from e


def check_adapter_dir(o: dict) -> None:
    """Check --adapter-path before the model and data load: a bad path, or a directory
    holding an earlier run (without --resume-adapter-file or --overwrite), fails now (the
    trainer creates it, and clears it with --overwrite, once the data is read)."""
    from qwen2_mlx.lora.adapters import prepare_adapter_dir

    prepare_adapter_dir(o["adapter_path"], resuming=o["resume_adapter_file"] is not None,
                        overwrite=o["overwrite"], create=False)


@click.command("lora")
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
              help="Base model: local directory or Hugging Face repo id (float or quantized).")
@click.option("--data", required=True, type=click.Path(file_okay=False),
              help="Directory with train.jsonl (and valid.jsonl, test.jsonl).")
@click.option("--iters", default=1000, show_default=True, type=click.IntRange(min=0),
              help="Optimizer steps to train for (0: no training).")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", "--learning-rate", "learning_rate", default=1e-4, show_default=True,
              type=float, help="Peak learning rate.")
@click.option("--rank", default=8, show_default=True, type=click.IntRange(min=1),
              help="LoRA rank.")
@click.option("--alpha", default=16.0, show_default=True, type=float,
              help="LoRA alpha; the update is scaled by alpha / rank.")
@click.option("--dropout", default=0.0, show_default=True, type=float, help="LoRA dropout.")
@click.option("--targets", default="all-linear", show_default=True,
              help="Comma-separated modules to adapt: q_proj,k_proj,v_proj,o_proj,gate_proj,"
                   "up_proj,down_proj, or the groups attention, mlp, all-linear.")
@click.option("--num-layers", type=click.IntRange(min=1), default=None,
              help="Adapt only the last N decoder layers (default: all).")
@click.option("--dora", is_flag=True, help="Weight-decomposed LoRA (DoRA).")
@click.option("--optimizer", type=click.Choice(["adamw", "adam", "sgd"]), default="adamw",
              show_default=True)
@click.option("--weight-decay", default=0.01, show_default=True, type=float)
@click.option("--lr-schedule", type=click.Choice(["cosine", "constant"]), default="cosine",
              show_default=True)
@click.option("--warmup", "warmup_steps", default=0, show_default=True,
              type=click.IntRange(min=0), help="Linear warmup steps.")
@click.option("--grad-accumulation-steps", default=1, show_default=True,
              type=click.IntRange(min=1))
@click.option("--max-grad-norm", default=1.0, show_default=True, type=float,
              help="Clip the gradient norm to this value (0: no clipping).")
@click.option("--grad-checkpoint", is_flag=True,
              help="Recompute activations in the backward pass to save memory.")
@click.option("--max-seq-length", default=2048, show_default=True, type=click.IntRange(min=2),
              help="Longer examples are truncated (with a warning and a count).")
@click.option("--mask-prompt/--no-mask-prompt", default=True, show_default=True,
              help="Train only on assistant replies / completions.")
@click.option("--chat/--no-chat", default=True, show_default=True,
              help="Render prompt/completion data with the chat template.")
@click.option("--steps-per-report", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--steps-per-eval", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--val-batches", default=25, show_default=True, type=int,
              help="Validation batches per evaluation (-1: all).")
@click.option("--save-every", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--adapter-path", default="adapters", show_default=True,
              help="Directory for adapters.safetensors, adapter_config.json and checkpoints.")
@click.option("--resume-adapter-file", default=None,
              help="Continue from this adapters file (with its optimizer state and step).")
@click.option("--overwrite", is_flag=True,
              help="Replace the adapters of an earlier run in --adapter-path (without it, an "
                   "--adapter-path that already holds files is refused).")
@click.option("--test", "run_test", is_flag=True,
              help="Report loss and perplexity on test.jsonl after training.")
@click.option("--test-batches", default=-1, show_default=True, type=int,
              help="Test batches to evaluate (-1: all).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Cast the base weights to this dtype (default: as stored).")
@click.option("--q-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default=None,
              help="Quantize the base model in memory to this many bits (QLoRA).")
@click.option("--q-group-size", default=64, show_default=True,
              type=click.Choice(["32", "64", "128"]), help="Group size for --q-bits.")
@click.option("--seed", default=0, show_default=True, type=int)
def lora_command(**options) -> None:
    """Fine-tune LoRA adapters on chat, prompt/completion or text JSONL files.

    Each line of DATA/train.jsonl is {"messages": [...]}, {"prompt": ..., "completion": ...}
    or {"text": ...}. Adapters are written to --adapter-path every --save-every steps and at
    the end; use them with `qwen2-mlx generate --adapter-path` or merge them with
    `qwen2-mlx fuse`.

    \b
    Examples:
      qwen2-mlx lora --model Qwen/Qwen2-0.5B-Instruct --data examples/lora/data --iters 600
      qwen2-mlx lora -m ./qwen2-1.5b --data ./my_data --rank 16 --alpha 32 --targets attention
      qwen2-mlx lora -m ./qwen2-7b --data ./my_data --q-bits 4 --grad-checkpoint   # QLoRA
      qwen2-mlx lora -m ./q05b --data ./data --resume-adapter-file adapters/adapters.safetensors
      qwen2-mlx lora -m ./qwen2-0.5b --data ./my_data --iters 0 --test --adapter-path adapters
    """
    from qwen2_mlx.lora import evaluate, load_adapter, load_datasets, train
    from qwen2_mlx.lora.adapters import resolve_adapter_files

    o = options
    with one_line_errors():
        lora, config = training_settings(o)
        if o["iters"] == 0 and not o["run_test"]:
            click.echo("Nothing to do: --iters 0 trains nothing; add --test to evaluate the "
                       f"adapters in {o['adapter_path']} (or the base model) on test.jsonl.")
            return
        if o["iters"] > 0:
            check_adapter_dir(o)
        model, tokenizer = load_base_model(o)
        splits = ("train", "valid", "test") if o["run_test"] else ("train", "valid")
        datasets = echo_truncation_warnings(lambda: load_datasets(
            o["data"], tokenizer, splits=splits, max_seq_length=o["max_seq_length"],
            mask_prompt=o["mask_prompt"], chat=o["chat"]))
        if o["iters"] > 0:
            if datasets.get("valid") is None:
                click.echo(f"No valid.jsonl in {o['data']}: training without validation loss.")
            train(model, tokenizer, datasets, adapter_path=o["adapter_path"],
                  lora=None if o["resume_adapter_file"] else lora, config=config,
                  resume_adapter_file=o["resume_adapter_file"], overwrite=o["overwrite"],
                  callback=ProgressPrinter(live=sys.stdout.isatty()), metadata=base_metadata(o))
        elif o["run_test"]:
            try:
                resolve_adapter_files(o["adapter_path"])
                load_adapter(model, o["adapter_path"])
                click.echo(f"Evaluating with the adapters in {o['adapter_path']}")
            except FileNotFoundError:
                click.echo(f"No adapters in {o['adapter_path']}: evaluating the base model")
        if o["run_test"]:
            if datasets.get("test") is None:
                raise click.ClickException(f"--test needs {o['data']}/test.jsonl")
            loss = evaluate(model, datasets["test"], o["batch_size"], o["test_batches"])
            click.echo(f"Test loss {loss:.4f}, test ppl {math.exp(min(loss, 50)):.3f}")
