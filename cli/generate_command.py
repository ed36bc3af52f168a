"""`qwen2-mlx generate`: stream an answer from a Qwen2 model."""

from __future__ import annotations

import contextlib
import sys

import click

from qwen2_mlx.parallel.launch import rank_0_reports_errors

DEFAULT_MODEL = "Qwen/Qwen2-0.5B-Instruct"


@click.command("generate")
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
              help="Local model directory or Hugging Face repo id.")
@click.option("--prompt", "-p", default="Hello", show_default=True,
              help="The prompt; '-' reads it from stdin.")
@click.option("--system", "-s", default=None, help="System prompt (chat mode only).")
@click.option("--chat/--no-chat", default=True, show_default=True,
              help="Format the prompt with the Qwen2 chat template.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=1),
              help="Most tokens to generate.")
@click.option("--temp", type=float, default=None,
              help="Sampling temperature; 0 is greedy. Default: generation_config.json's "
                   "value when it samples, else 0.")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling mass (0, 1].")
@click.option("--top-k", type=int, default=None, help="Keep the k most likely tokens (0: off).")
@click.option("--min-p", type=float, default=None, help="Min probability relative to the top.")
@click.option("--repetition-penalty", type=float, default=None,
              help="Penalty > 1 discourages repeating recent tokens.")
@click.option("--repetition-context-size", type=int, default=64, show_default=True,
              help="How many recent tokens the repetition penalty looks at.")
@click.option("--seed", type=int, default=None, help="Random seed for sampling.")
@click.option("--stop", multiple=True, help="A string that ends generation (repeatable).")
@click.option("--adapter-path", default=None, type=click.Path(),
              help="A LoRA adapter directory (from `qwen2-mlx lora`) to apply, unfused.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Cast weights to this dtype (default: as stored).")
@click.option("--prefill-step-size", default=512, show_default=True, type=click.IntRange(min=1),
              help="Prompt tokens per prefill step.")
@click.option("--dca", is_flag=True,
              help="Dual Chunk Attention for prompts past the training length.")
@click.option("--chunk-size", type=click.IntRange(min=2), default=None,
              help="DCA chunk size (default: the training length).")
@click.option("--local-size", type=click.IntRange(min=1), default=None,
              help="DCA local window (default: chunk size / 16).")
@click.option("--yarn-factor", type=float, default=None,
              help="Static YaRN RoPE scaling by this factor (e.g. 4 for 32K -> 128K).")
@click.option("--kv-bits", type=click.Choice(["8", "4"]), default=None,
              help="Store the KV cache quantized (8 bits halves its memory).")
@click.option("--parallel", type=click.Choice(["tensor", "pipeline"]), default=None,
              help="Run as one rank of an mlx.launch job holding part of the model: split "
                   "every layer (tensor) or a range of layers (pipeline) across the ranks.")
@click.option("--rank-timeout", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="With --parallel: stop when the other ranks have not answered for this "
                   "many seconds (0: wait forever).")
@click.option("--verbose", "-v", is_flag=True,
              help="Print prompt and generation speed and peak memory (to stderr).")
@rank_0_reports_errors
def generate_command(model, prompt, system, chat, max_tokens, temp, top_p, top_k, min_p,
                     repetition_penalty, repetition_context_size, seed, stop, adapter_path, dtype,
                     prefill_step_size, dca, chunk_size, local_size, yarn_factor, kv_bits,
                     parallel, rank_timeout, verbose) -> None:
    """Generate text from a prompt, streamed to stdout.

    \b
    Examples:
      qwen2-mlx generate --prompt "Why is the sky blue?"
      qwen2-mlx generate -m Qwen/Qwen2-1.5B-Instruct -p "Hi" --temp 0.7 --top-p 0.8
      echo "Summarise: ..." | qwen2-mlx generate -m ./qwen2-0.5b --prompt - --verbose
      qwen2-mlx generate -m ./base-model --no-chat -p "Once upon a time" --max-tokens 64
      qwen2-mlx generate -m Qwen/Qwen2-7B-Instruct --dca --kv-bits 8 --prompt - < book.txt
      qwen2-mlx generate -m Qwen/Qwen2-7B-Instruct --yarn-factor 4 --prompt - < long.txt
      mlx.launch --hosts 10.0.0.1,10.0.0.2 --backend ring -- \\
        "$(which qwen2-mlx)" generate -m Qwen/Qwen2-72B-Instruct --parallel pipeline -p "Hi"
    """
    from qwen2_mlx.generate import format_stats, stream_generate
    from qwen2_mlx.loader import load

    group = None
    try:
        if parallel:
            from qwen2_mlx.parallel import init_group
            from qwen2_mlx.parallel.launch import shared_prompt

            group = init_group(parallel)
            prompt = shared_prompt(group, prompt)  # rank 0 reads it, every rank gets it
        elif prompt == "-":
            prompt = sys.stdin.read()
        mlx_model, tokenizer = load(model, dtype=dtype, adapter_path=adapter_path, dca=dca,
                                    chunk_size=chunk_size, local_size=local_size,
                                    yarn_factor=yarn_factor, parallel=parallel, group=group)
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from e

    if chat:
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": prompt})
        prompt = messages
    elif system is not None:
        raise click.UsageError("--system needs --chat")

    sampling = sampling_options(tokenizer.generation_defaults, temp, top_p, top_k, min_p,
                                repetition_penalty)
    last = None
    try:
        with rank_watchdog(parallel, rank_timeout):
            for last in stream_generate(
                mlx_model, tokenizer, prompt, max_tokens=max_tokens, seed=seed,
                stop=list(stop), prefill_step_size=prefill_step_size,
                repetition_context_size=repetition_context_size,
                kv_bits=int(kv_bits) if kv_bits else None, **sampling,
            ):
                click.echo(last.text, nl=False)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    except RuntimeError as e:
        from qwen2_mlx.parallel.launch import rank_failure_message

        message = rank_failure_message(e) if parallel else None
        if message is None:
            raise
        raise click.ClickException(message) from e
    click.echo()
    if verbose and last is not None:
        click.echo(format_stats(last), err=True)


def rank_watchdog(parallel: str | None, timeout: float):
    """With --parallel, end the process when the other ranks stop answering (watchdog.py)."""
    if not parallel:
        return contextlib.nullcontext()
    from qwen2_mlx.parallel import RankWatchdog

    return RankWatchdog(timeout or None)


def sampling_options(defaults: dict, temp, top_p, top_k, min_p, repetition_penalty) -> dict:
    """Explicit flags win; otherwise follow generation_config.json as transformers does."""
    sampled = bool(defaults.get("do_sample", False))
    chosen = {
        "temperature": temp if temp is not None else (
            defaults.get("temperature", 1.0) if sampled else 0.0),
        "top_p": top_p if top_p is not None else (defaults.get("top_p", 1.0) if sampled else 1.0),
        "top_k": top_k if top_k is not None else (defaults.get("top_k", 0) if sampled else 0),
        "min_p": min_p if min_p is not None else 0.0,
        "repetition_penalty": repetition_penalty if repetition_penalty is not None else
        defaults.get("repetition_penalty", 1.0),
    }
    return {k: v for k, v in chosen.items() if v is not None}
