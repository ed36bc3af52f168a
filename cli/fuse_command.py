"""`qwen2-mlx fuse`: merge LoRA adapters into the base model and save it."""

from __future__ import annotations

import click

from qwen2_mlx.cli.errors import click_error

DEFAULT_MODEL = "Qwen/Qwen2-0.5B-Instruct"


@click.command("fuse")
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
              help="The base model the adapters were trained on (directory or repo id).")
@click.option("--adapter-path", default="adapters", show_default=True,
              help="Adapter directory (adapters.safetensors + adapter_config.json) or file.")
@click.option("--save-path", default="fused_model", show_default=True,
              help="Output model directory.")
@click.option("--dequantize", is_flag=True,
              help="Write float weights for a quantized base instead of re-quantizing the "
                   "merged weights (no second rounding).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Cast the base weights to this dtype before merging (default: as stored).")
@click.option("--force", is_flag=True,
              help="Replace --save-path if it is an existing model directory (never the base "
                   "model, never a directory of other files).")
def fuse_command(model, adapter_path, save_path, dequantize, dtype, force) -> None:
    """Merge trained LoRA adapters into the base weights and write a standalone model.

    The result loads with `qwen2_mlx.load` and `qwen2-mlx generate` like any model. A
    quantized base is re-quantized after merging unless --dequantize is given.

    \b
    Examples:
      qwen2-mlx fuse --model Qwen/Qwen2-0.5B-Instruct --adapter-path adapters
      qwen2-mlx fuse -m ./qwen2-7b-4bit --adapter-path adapters --save-path ./fused --dequantize
      qwen2-mlx generate --model fused_model --prompt "Hello"
    """
    from qwen2_mlx.convert import fuse_model

    try:
        out = fuse_model(model, adapter_path, save_path, dequantize=dequantize, dtype=dtype,
                         force=force)
    except (OSError, ValueError, NotImplementedError) as e:
        raise click_error(e) from e
    click.echo(f"Saved the fused model to {out}")
