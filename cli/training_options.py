"""What `qwen2-mlx lora` and `qwen2-mlx dpo` share: their options, declared once as decorators
both commands apply, and the steps both take with them (settings, base model, errors)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import click

from qwen2_mlx.cli.errors import click_error

DEFAULT_MODEL = "Qwen/Qwen2-0.5B-Instruct"
T = TypeVar("T")
F = TypeVar("F", bound=Callable)


def _apply(options: list, command: F) -> F:
    for option in reversed(options):  # click lists options in decorator order
        command = option(command)
    return command


def model_and_data_options(data_help: str) -> Callable[[F], F]:
    """--model and --data (listed first in --help)."""
    return lambda command: _apply([
        click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
                     help="Base model: local directory or Hugging Face repo id (float or "
                          "quantized)."),
        click.option("--data", required=True, type=click.Path(file_okay=False), help=data_help),
    ], command)


def training_options(*, learning_rate: float, iters_help: str, batch_size_help: str | None = None,
                     extra: list | None = None) -> Callable[[F], F]:
    """The adapter, optimizer, schedule, checkpoint and base-model options of a training
    command; `extra` options go after the training ones (before the base-model ones)."""
    return lambda command: _apply([
        click.option("--iters", default=1000, show_default=True, type=click.IntRange(min=0),
                     help=iters_help),
        click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1),
                     help=batch_size_help),
        click.option("--lr", "--learning-rate", "learning_rate", default=learning_rate,
                     show_default=True, type=float, help="Peak learning rate."),
        click.option("--rank", default=8, show_default=True, type=click.IntRange(min=1),
                     help="LoRA rank."),
        click.option("--alpha", default=16.0, show_default=True, type=float,
                     help="LoRA alpha; the update is scaled by alpha / rank."),
        click.option("--dropout", default=0.0, show_default=True, type=float,
                     help="LoRA dropout."),
        click.option("--targets", default="all-linear", show_default=True,
                     help="Comma-separated modules to adapt: q_proj,k_proj,v_proj,o_proj,"
                          "gate_proj,up_proj,down_proj, or the groups attention, mlp, "
                          "all-linear."),
        click.option("--num-layers", type=click.IntRange(min=1), default=None,
                     help="Adapt only the last N decoder layers (default: all)."),
        click.option("--dora", is_flag=True, help="Weight-decomposed LoRA (DoRA)."),
        click.option("--optimizer", type=click.Choice(["adamw", "adam", "sgd"]),
                     default="adamw", show_default=True),
        click.option("--weight-decay", default=0.01, show_default=True, type=float),
        click.option("--lr-schedule", type=click.Choice(["cosine", "constant"]),
                     default="cosine", show_default=True),
        click.option("--warmup", "warmup_steps", default=0, show_default=True,
                     type=click.IntRange(min=0), help="Linear warmup steps."),
        click.option("--grad-accumulation-steps", default=1, show_default=True,
                     type=click.IntRange(min=1)),
        click.option("--max-grad-norm", default=1.0, show_default=True, type=float,
                     help="Clip the gradient norm to this value (0: no clipping)."),
        click.option("--grad-checkpoint", is_flag=True,
                     help="Recompute activations in the backward pass to save memory."),
        click.option("--max-seq-length", default=2048, show_default=True,
                     type=click.IntRange(min=2),
                     help="Longer examples are truncated (with a warning and a count)."),
        click.option("--steps-per-report", default=10, show_default=True,
                     type=click.IntRange(min=1)),
        click.option("--steps-per-eval", default=200, show_default=True,
                     type=click.IntRange(min=1)),
        click.option("--val-batches", default=25, show_default=True, type=int,
                     help="Validation batches per evaluation (-1: all)."),
        click.option("--save-every", default=100, show_default=True,
                     type=click.IntRange(min=1)),
        click.option("--adapter-path", default="adapters", show_default=True,
                     help="Directory for adapters.safetensors, adapter_config.json and "
                          "checkpoints."),
        click.option("--resume-adapter-file", default=None,
                     help="Continue from this adapters file (with its optimizer state and "
                          "step)."),
        click.option("--overwrite", is_flag=True,
                     help="Replace the adapters of an earlier run in --adapter-path (without "
                          "it, an --adapter-path that already holds files is refused)."),
        *(extra or []),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
                     default=None,
                     help="Cast the base weights to this dtype (default: as stored)."),
        click.option("--q-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]),
                     default=None,
                     help="Quantize the base model in memory to this many bits (QLoRA)."),
        click.option("--q-group-size", default=64, show_default=True,
                     type=click.Choice(["32", "64", "128"]), help="Group size for --q-bits."),
        click.option("--seed", default=0, show_default=True, type=int),
    ], command)


def training_settings(o: dict):
    """(LoRAConfig, TrainingConfig) from the command's options."""
    from qwen2_mlx.lora import LoRAConfig
    from qwen2_mlx.train import TrainingConfig

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
    from qwen2_mlx.convert.quantize import quantize_base
    from qwen2_mlx.loader import load

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
    from qwen2_mlx.train import TruncationWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncationWarning)
        data = load_data()
    for warning in caught:
        click.echo(f"Warning: {warning.message}", err=True)
    return data


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Report the errors of bad settings, data or files as one-line ClickExceptions."""
    from qwen2_mlx.train import TrainingDivergedError

    try:
        yield
    except (TrainingDivergedError, OSError, ValueError, NotImplementedError) as e:
        raise click_error(e) from e


def check_adapter_dir(o: dict) -> None:
    """Check --adapter-path before the model and data load: a bad path, or a directory
    holding an earlier run (without --resume-adapter-file or --overwrite), fails now (the
    trainer creates it, and clears it with --overwrite, once the data is read)."""
    from qwen2_mlx.train.checkpoint import prepare_adapter_dir

    prepare_adapter_dir(o["adapter_path"], resuming=o["resume_adapter_file"] is not None,
                        overwrite=o["overwrite"], create=False)
