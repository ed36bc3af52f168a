"""`qwen2-mlx convert`: a Hugging Face Qwen2 checkpoint -> an MLX model, float or quantized."""

from __future__ import annotations

import signal
import sys

import click

from qwen2_mlx.cli.errors import click_error
from qwen2_mlx.convert.quantize import RECIPE_HELP


def _exit_on_sigterm(signum, frame) -> None:  # pragma: no cover - exercised in a subprocess
    # SystemExit unwinds through convert(), which removes its temporary output.
    sys.exit(128 + signum)


@click.command("convert")
@click.option("--hf-path", "--model", "hf_path", required=True,
              help="Hugging Face repo id or local checkpoint directory.")
@click.option("--mlx-path", default="mlx_model", show_default=True,
              help="Output directory (must not exist unless --force).")
@click.option("-q", "--quantize", is_flag=True, help="Quantize the weights.")
@click.option("--q-bits", type=int, default=None,
              help="Bits per weight: 2, 3, 4, 5, 6 or 8.  [default: 4]")
@click.option("--q-group-size", type=int, default=None,
              help="Weights sharing one scale and bias: 32, 64 or 128.  [default: 64]")
@click.option("--quant-predicate", type=click.Choice(sorted(RECIPE_HELP)), default=None,
              help="Mixed-precision recipe: "
                   + "; ".join(f"{k}: {v}" for k, v in RECIPE_HELP.items()) + ".")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Dtype of the float tensors (and quantization scales). "
                   "[default: the checkpoint's]")
@click.option("--force", is_flag=True,
              help="Replace an existing --mlx-path that holds a model (config.json and "
                   "*.safetensors) or nothing, once the new model is complete.")
@click.option("--revision", default=None, help="Hub branch, tag or commit.")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Largest output file, e.g. 5GB or 500MB.")
def convert_command(hf_path, mlx_path, quantize, q_bits, q_group_size, quant_predicate, dtype,
                    force, revision, max_shard_size) -> None:
    """Convert a Qwen2 checkpoint to MLX format, optionally quantized.

    Only the safetensors, config and tokenizer files are downloaded. The output is written
    to a temporary directory and renamed into place when complete; it loads with
    qwen2-mlx and with mlx-lm.

    \b
    Examples:
      qwen2-mlx convert --hf-path Qwen/Qwen2-0.5B-Instruct --mlx-path qwen2-0.5b
      qwen2-mlx convert --hf-path Qwen/Qwen2-7B-Instruct --mlx-path qwen2-7b-4bit -q
      qwen2-mlx convert --hf-path ./Qwen2-1.5B --mlx-path q8 -q --q-bits 8 --q-group-size 32
      qwen2-mlx convert --hf-path Qwen/Qwen2-7B-Instruct --mlx-path q-mixed -q \\
          --quant-predicate mixed_4_6
      qwen2-mlx convert --hf-path ./Qwen2-0.5B --mlx-path out --dtype float16 --force
    """
    from qwen2_mlx.convert import convert

    if not quantize and (q_bits or q_group_size or quant_predicate):
        raise click.UsageError("--q-bits, --q-group-size and --quant-predicate need -q "
                               "(--quantize)")
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        convert(hf_path, mlx_path, quantize=quantize, q_group_size=q_group_size, q_bits=q_bits,
                dtype=dtype, quant_predicate=quant_predicate, force=force, revision=revision,
                max_shard_size=max_shard_size, log=lambda line: click.echo(line, err=True))
    except (OSError, ValueError) as e:
        raise click_error(e) from e
    finally:
        signal.signal(signal.SIGTERM, previous)
