"""`qwen2-mlx generate`: stream an answer from a Qwen2 model."""

from __future__ import annotations

import contextlib
import json
import sys

import click

from qwen2_mlx.cli.draft_options import draft_flags, load_drafter
from qwen2_mlx.cli.errors import click_error
from qwen2_mlx.cli.response_format_options import incomplete_warning, response_format_options
from qwen2_mlx.parallel.launch import rank_0_reports_errors

DEFAULT_MODEL = "Qwen/Qwen2-0.5B-Instruct"


def generation_flags(command):
    """--max-tokens, the sampling flags, --stop, --adapter-path, --dtype and
    --prefill-step-size: the options `generate` and `chat` share."""
    options = [
        click.option("--max-tokens", default=256, show_default=True,
                     type=click.IntRange(min=1), help="Most tokens to generate."),
        click.option("--temp", type=float, default=None,
                     help="Sampling temperature; 0 is greedy. Default: generation_config.json's "
                          "value when it samples, else 0."),
        click.option("--top-p", type=float, default=None, help="Nucleus sampling mass (0, 1]."),
        click.option("--top-k", type=int, default=None,
                     help="Keep the k most likely tokens (0: off)."),
        click.option("--min-p", type=float, default=None,
                     help="Min probability relative to the top."),
        click.option("--repetition-penalty", type=float, default=None,
                     help="Penalty > 1 discourages repeating recent tokens."),
        click.option("--repetition-context-size", type=int, default=64, show_default=True,
                     help="How many recent tokens the repetition penalty looks at."),
        click.option("--seed", type=int, default=None, help="Random seed for sampling."),
        click.option("--stop", multiple=True,
                     help="A string that ends generation (repeatable)."),
        click.option("--adapter-path", default=None, type=click.Path(),
                     help="A LoRA adapter directory (from `qwen2-mlx lora`) to apply, unfused."),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
                     default=None, help="Cast weights to this dtype (default: as stored)."),
        click.option("--prefill-step-size", default=512, show_default=True,
                     type=click.IntRange(min=1), help="Prompt tokens per prefill step."),
    ]
    for option in reversed(options):  # click lists options in decorator order
        command = option(command)
    return command


@click.command("generate")
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
              help="Local model directory or Hugging Face repo id.")
@click.option("--prompt", "-p", default="Hello", show_default=True,
              help="The prompt; '-' reads it from stdin.")
@click.option("--system", "-s", default=None, help="System prompt (chat mode only).")
@click.option("--chat/--no-chat", default=True, show_default=True,
              help="Format the prompt with the model's chat template.")
@click.option("--tools", "tools_file", default=None, type=click.Path(dir_okay=False),
              help="A JSON file with a list of OpenAI function schemas the model may call; "
                   "its calls print as JSON lines after the answer.")
@click.option("--hide-reasoning", is_flag=True,
              help="Drop a reasoning model's thinking (<think>...</think>) from the output.")
@generation_flags
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
@draft_flags
@click.option("--parallel", type=click.Choice(["tensor", "pipeline"]), default=None,
              help="Run as one rank of an mlx.launch job holding part of the model: split "
                   "every layer (tensor) or a range of layers (pipeline) across the ranks.")
@click.option("--rank-timeout", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="With --parallel: stop when the other ranks have not answered for this "
                   "many seconds (0: wait forever).")
@click.option("--verbose", "-v", is_flag=True,
              help="Print prompt and generation speed and peak memory (to stderr).")
@response_format_options
@rank_0_reports_errors
def generate_command(model, prompt, system, chat, max_tokens, temp, top_p, top_k, min_p,
                     repetition_penalty, repetition_context_size, seed, stop, adapter_path, dtype,
                     prefill_step_size, dca, chunk_size, local_size, yarn_factor, kv_bits,
                     draft_model, num_draft_tokens, prompt_lookup, parallel, rank_timeout, verbose,
                     tools_file, hide_reasoning, response_format) -> None:
    """Generate text from a prompt, streamed to stdout.

    A reasoning model's thinking shows dimmed on a terminal, and between <think> and </think>
    when the output is piped; --hide-reasoning drops it.

    \b
    Examples:
      qwen2-mlx generate --prompt "Why is the sky blue?"
      qwen2-mlx generate -m Qwen/Qwen2-1.5B-Instruct -p "Hi" --temp 0.7 --top-p 0.8
      echo "Summarise: ..." | qwen2-mlx generate -m ./qwen2-0.5b --prompt - --verbose
      qwen2-mlx generate -m ./base-model --no-chat -p "Once upon a time" --max-tokens 64
      qwen2-mlx generate -m Qwen/Qwen2-7B-Instruct --dca --kv-bits 8 --prompt - < book.txt
      qwen2-mlx generate -m Qwen/Qwen2-7B-Instruct --yarn-factor 4 --prompt - < long.txt
      qwen2-mlx generate -m Qwen/QwQ-32B -p "Is 1001 prime?" --hide-reasoning
      qwen2-mlx generate -m Qwen/Qwen2.5-7B-Instruct -p "Weather in Oslo?" --tools tools.json
      qwen2-mlx generate -m Qwen/Qwen2-7B-Instruct --draft-model Qwen/Qwen2-0.5B-Instruct -v
      qwen2-mlx generate -m ./qwen2-7b-4bit --prompt-lookup 3 --prompt - < edit_request.txt
      qwen2-mlx generate -p "Invent a user" --json-schema user.schema.json
      qwen2-mlx generate -p "Is 7 prime? Answer in JSON" --json
      qwen2-mlx generate -p "Today's date?" --regex "[0-9]{4}-[0-9]{2}-[0-9]{2}"
      mlx.launch --hosts 10.0.0.1,10.0.0.2 --backend ring -- \\
        "$(which qwen2-mlx)" generate -m Qwen/Qwen2-72B-Instruct --parallel pipeline -p "Hi"
    """
    from qwen2_mlx.generate import format_stats, stream_generate
    from qwen2_mlx.loading import load
    from qwen2_mlx.memory import wired_limit

    if parallel and (draft_model or prompt_lookup):
        raise click.UsageError("--parallel does not combine with --draft-model or "
                               "--prompt-lookup: speculative decoding runs on one machine")
    tools = read_tools(tools_file) if tools_file else None
    group = None
    try:
        if parallel:
            from qwen2_mlx.parallel import init_group
            from qwen2_mlx.parallel.launch import shared_prompt

            group = init_group(parallel)
            prompt = shared_prompt(group, prompt)  # rank 0 reads it, every rank gets it
        else:
            prompt = _prompt_text(prompt)
        mlx_model, tokenizer = load(model, dtype=dtype, adapter_path=adapter_path, dca=dca,
                                    chunk_size=chunk_size, local_size=local_size,
                                    yarn_factor=yarn_factor, parallel=parallel, group=group)
    except (OSError, ValueError) as e:
        raise click_error(e) from e
    speculative = load_drafter(mlx_model, tokenizer, draft_model, num_draft_tokens,
                               prompt_lookup, dtype)

    if chat:
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": prompt})
        prompt = messages
    elif system is not None:
        raise click.UsageError("--system needs --chat")

    sampling = sampling_options(tokenizer.generation_defaults, temp, top_p, top_k, min_p,
                                repetition_penalty)
    last = None
    show = ReasoningDisplay(hidden=hide_reasoning, terminal=stdout_is_terminal())
    memory = contextlib.ExitStack()  # the wired limit, held while generating
    memory.enter_context(wired_limit(mlx_model, log=verbose_line if verbose else None))
    try:
        with rank_watchdog(parallel, rank_timeout):
            for last in stream_generate(
                mlx_model, tokenizer, prompt, max_tokens=max_tokens, seed=seed,
                stop=list(stop), prefill_step_size=prefill_step_size,
                repetition_context_size=repetition_context_size,
                kv_bits=int(kv_bits) if kv_bits else None, tools=tools,
                response_format=response_format, **sampling, **speculative,
            ):
                click.echo(show(last.reasoning, last.text), nl=False)
    except (ValueError, ImportError) as e:
        raise click_error(e) from e
    except RuntimeError as e:
        from qwen2_mlx.parallel.launch import rank_failure_message

        message = rank_failure_message(e) if parallel else None
        if message is None:
            raise
        raise click.ClickException(message) from e
    finally:
        memory.close()
    click.echo(show.close())
    if last is not None:
        for call in last.tool_calls:
            click.echo(json.dumps(call.to_openai(), ensure_ascii=False))
        if last.malformed_tool_call:
            click.echo("note: the model wrote a tool call that is not valid JSON; it is shown "
                       "as text", err=True)
        if last.incomplete:
            click.echo(incomplete_warning(last.finish_reason), err=True)
    if verbose and last is not None:
        click.echo(format_stats(last), err=True)
        if last.finish_reason == "length" and last.generation_tokens < max_tokens:
            click.echo(f"Generation stopped at the end of the model's context "
                       f"({mlx_model.config.context_length} tokens), before --max-tokens "
                       f"{max_tokens}", err=True)


def rank_watchdog(parallel: str | None, timeout: float):
    """With --parallel, end the process when the other ranks stop answering (watchdog.py)."""
    if not parallel:
        return contextlib.nullcontext()
    from qwen2_mlx.parallel import RankWatchdog

    return RankWatchdog(timeout or None)


def _prompt_text(prompt: str) -> str:
    """The prompt as valid text: stdin for "-"; bytes that are not UTF-8 (stdin, or argv,
    where Python keeps them as lone surrogates) become U+FFFD, with a warning."""
    if prompt == "-":
        raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else (
            sys.stdin.read().encode("utf-8", "surrogateescape"))
        where = "stdin"
    else:
        try:
            raw = prompt.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate that no byte stands for
            raw = prompt.encode("utf-8", "replace")
        where = "--prompt"
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        click.echo(f"Warning: the prompt from {where} is not valid UTF-8 (byte {e.start}); "
                   "invalid bytes were replaced with U+FFFD", err=True)
        return raw.decode("utf-8", errors="replace")


def verbose_line(line: str) -> None:
    click.echo(line, err=True)


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


class ReasoningDisplay:
    """Interleaves reasoning and answer pieces for printing: reasoning dimmed (ANSI) on a
    terminal, between <think> and </think> otherwise, or dropped when hidden."""

    DIM, RESET = "\x1b[2m", "\x1b[0m"

    def __init__(self, hidden: bool, terminal: bool) -> None:
        self.hidden, self.terminal = hidden, terminal
        self.open = False

    def __call__(self, reasoning: str, text: str) -> str:
        out = []
        if reasoning and not self.hidden:
            if not self.open:
                out.append(self.DIM if self.terminal else "<think>")
                self.open = True
            out.append(reasoning)
        if text:
            out.append(self.close())
        out.append(text)
        return "".join(out)

    def close(self) -> str:
        """The end marker if reasoning is still open (it ends the output)."""
        if not self.open:
            return ""
        self.open = False
        return self.RESET if self.terminal else "</think>"


def read_tools(path: str) -> list[dict]:
    """The function schemas in a JSON file: a list, or an object with a "tools" list."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise click.ClickException(f"cannot read --tools file {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise click.ClickException(f"--tools file {path} is not valid JSON: {e}") from e
    tools = data.get("tools") if isinstance(data, dict) else data
    if not isinstance(tools, list):
        raise click.ClickException(f"--tools file {path} must hold a list of function schemas")
    return tools


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
