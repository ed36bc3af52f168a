"""The `qwen2-mlx` command: a thin click layer over the Python API."""

from __future__ import annotations

import sys

import click

from qwen2_mlx.cli.chat_command import chat_command
from qwen2_mlx.cli.convert_command import convert_command
from qwen2_mlx.cli.dpo_command import dpo_command
from qwen2_mlx.cli.fuse_command import fuse_command
from qwen2_mlx.cli.generate_command import generate_command
from qwen2_mlx.cli.lora_command import lora_command
from qwen2_mlx.cli.serve_command import serve_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qwen2-mlx")
def cli() -> None:
    """Run and tune Qwen2 models on Apple Silicon with MLX.

    \b
    Examples:
      qwen2-mlx generate --prompt "Write a haiku about the sea"
      qwen2-mlx generate --model ./my-qwen2 --prompt - < question.txt
      qwen2-mlx chat --model Qwen/Qwen2.5-7B-Instruct --system "You are terse."
      qwen2-mlx convert --hf-path Qwen/Qwen2-7B-Instruct --mlx-path qwen2-7b-4bit -q
      qwen2-mlx lora --model qwen2-7b-4bit --data ./my_data --iters 200
      qwen2-mlx dpo --model Qwen/Qwen2-0.5B-Instruct --data ./prefs --beta 0.1
      qwen2-mlx serve --model Qwen/Qwen2-0.5B-Instruct --api-key secret
      qwen2-mlx COMMAND --help
    """
    from qwen2_mlx.parallel.launch import quiet_secondary_ranks

    quiet_secondary_ranks()  # under mlx.launch only rank 0 writes to the terminal


cli.add_command(generate_command)
cli.add_command(chat_command)
cli.add_command(lora_command)
cli.add_command(dpo_command)
cli.add_command(fuse_command)
cli.add_command(convert_command)
cli.add_command(serve_command)


def main() -> None:  # pragma: no cover - console entry point
    cli(prog_name="qwen2-mlx")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
