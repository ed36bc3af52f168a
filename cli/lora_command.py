"""`qwen2-mlx lora`: fine-tune LoRA / DoRA / QLoRA adapters on JSONL data."""

from __future__ import annotations

import math
import sys

import click

from qwen2_mlx.cli.training_options import (
    base_metadata,
    check_adapter_dir,
    echo_truncation_warnings,
    load_base_model,
    model_and_data_options,
    one_line_errors,
    training_options,
    training_settings,
)
from qwen2_mlx.train.progress import ProgressPrinter

LORA_OPTIONS = [
    click.option("--mask-prompt/--no-mask-prompt", default=True, show_default=True,
                 help="Train only on assistant replies / completions."),
    click.option("--chat/--no-chat", default=True, show_default=True,
                 help="Render prompt/completion data with the chat template."),
    click.option("--test", "run_test", is_flag=True,
                 help="Report loss and perplexity on test.jsonl after training."),
    click.option("--test-batches", default=-1, show_default=True, type=int,
                 help="Test batches to evaluate (-1: all)."),
]


@click.command("lora")
@model_and_data_options("Directory with train.jsonl (and valid.jsonl, test.jsonl).")
@training_options(learning_rate=1e-4, iters_help="Optimizer steps to train for (0: no training).",
                  extra=LORA_OPTIONS)
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
    from qwen2_mlx.lora import load_adapter
    from qwen2_mlx.lora.adapters import resolve_adapter_files
    from qwen2_mlx.train import evaluate, load_datasets, train

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
