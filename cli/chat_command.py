"""`qwen2-mlx chat`: an interactive terminal chat on `ChatSession` (and a scriptable one when
stdin is not a terminal: each line a message, each reply a line of stdout)."""

from __future__ import annotations

import contextlib
import functools
import json
import shlex
import signal
import sys
from collections.abc import Callable, Iterator

import click

from qwen2_mlx.cli.draft_options import draft_flags, load_drafter
from qwen2_mlx.cli.errors import click_error, error_line
from qwen2_mlx.cli.generate_command import (
    DEFAULT_MODEL,
    ReasoningDisplay,
    generation_flags,
    sampling_options,
    stdout_is_terminal,
    verbose_line,
)

HELP = """Commands:
  /help            this list
  /reset           forget the conversation (the system prompt stays)
  /undo            remove the last exchange (your message and the reply)
  /retry           generate the last reply again
  /system [TEXT]   show or set the system prompt
  /set [NAME VAL]  show or change a generation option, e.g. /set temperature 0.7
  /save FILE       save the conversation and its KV cache (/save! FILE replaces a file)
  /load FILE       continue a saved conversation
  /stats           tokens in the cache, last prefill and decode speed, peak memory
  /quit            leave (so do Ctrl-D and Ctrl-C at the prompt)
Ctrl-C during a reply stops it; the conversation keeps what was written.
End a line with \\ to continue it on the next line, or wrap several lines in \"\"\"."""

# /set names: the CLI's flag spellings and the API's names, and how to read the value.
SETTABLE: dict[str, tuple[str, Callable[[str], object]]] = {
    "temperature": ("temperature", float), "temp": ("temperature", float),
    "top_p": ("top_p", float), "top_k": ("top_k", int), "min_p": ("min_p", float),
    "repetition_penalty": ("repetition_penalty", float),
    "repetition_context_size": ("repetition_context_size", int),
    "max_tokens": ("max_tokens", int), "seed": ("seed", int),
    "stop": ("stop", lambda v: [v] if v else []),
}


@click.command("chat")
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
              help="Local model directory or Hugging Face repo id.")
@click.option("--system", "-s", default=None,
              help="System prompt (default: the one the model's chat template adds).")
@generation_flags
@click.option("--max-kv-size", type=click.IntRange(min=2), default=None,
              help="Most tokens the conversation keeps; older exchanges are dropped "
                   "(default: the model's context).")
@click.option("--kv-bits", type=click.Choice(["8", "4"]), default=None,
              help="Keep the KV cache quantized (8 bits halves its memory).")
@click.option("--hide-reasoning", is_flag=True,
              help="Do not show a reasoning model's thinking.")
@click.option("--load", "load_file", default=None, type=click.Path(dir_okay=False),
              help="Continue a conversation saved with /save.")
@draft_flags
@click.option("--verbose", "-v", is_flag=True,
              help="Print speed and memory after each reply, and the wired-memory setting "
                   "(to stderr).")
def chat_command(model, system, max_tokens, temp, top_p, top_k, min_p, repetition_penalty,
                 repetition_context_size, seed, stop, adapter_path, dtype, prefill_step_size,
                 max_kv_size, kv_bits, hide_reasoning, load_file, draft_model, num_draft_tokens,
                 prompt_lookup, verbose) -> None:
    """Chat with a model in the terminal; replies stream as they are written.

    The conversation's KV cache is kept between turns, so each turn reads only your new
    message. When stdin is not a terminal, each line is one message and each reply is
    printed to stdout (commands work there too; their notes go to stderr); the exit status
    is 1 if some line failed.

    \b
    Examples:
      qwen2-mlx chat
      qwen2-mlx chat -m Qwen/Qwen2.5-7B-Instruct --system "You are terse." --temp 0.7
      qwen2-mlx chat -m ./qwen2-7b-4bit --kv-bits 8 --max-kv-size 8192
      qwen2-mlx chat -m Qwen/Qwen2.5-1.5B-Instruct --load trip.safetensors
      printf 'Hi\\nAnd in French?\\n' | qwen2-mlx chat -m Qwen/Qwen2-0.5B-Instruct
      qwen2-mlx chat -m Qwen/Qwen2.5-7B-Instruct --draft-model Qwen/Qwen2.5-0.5B-Instruct
    Type /help in the chat for its commands.
    """
    from qwen2_mlx.chat_session import ChatSession
    from qwen2_mlx.loader import load
    from qwen2_mlx.memory import wired_limit

    try:
        mlx_model, tokenizer = load(model, dtype=dtype, adapter_path=adapter_path)
    except (OSError, ValueError) as e:
        raise click_error(e) from e
    options = dict(sampling_options(tokenizer.generation_defaults, temp, top_p, top_k, min_p,
                                    repetition_penalty),
                   max_tokens=max_tokens, seed=seed, stop=list(stop),
                   repetition_context_size=repetition_context_size,
                   prefill_step_size=prefill_step_size)
    speculative = load_drafter(mlx_model, tokenizer, draft_model, num_draft_tokens,
                               prompt_lookup, dtype)
    if draft_model is not None or prompt_lookup:
        options.update(speculative)
    try:
        if load_file:
            if kv_bits:
                raise click.UsageError("--kv-bits applies to a new conversation; a saved one "
                                       "keeps its cache's format")
            # The file's settings, but flags given on this command line win.
            chat = ChatSession.load(load_file, mlx_model, tokenizer,
                                    **{k: v for k, v in options.items() if _given(k)})
            if system is not None:
                chat.system = system
            if max_kv_size is not None:
                chat.max_kv_size = max_kv_size
        else:
            chat = ChatSession(mlx_model, tokenizer, system=system, max_kv_size=max_kv_size,
                               kv_bits=int(kv_bits) if kv_bits else None, **options)
    except (OSError, ValueError) as e:
        raise click_error(e) from e
    interactive = sys.stdin.isatty()
    repl = ChatREPL(chat, interactive=interactive, verbose=verbose,
                    display=ReasoningDisplay(hidden=hide_reasoning,
                                             terminal=stdout_is_terminal()))
    with wired_limit(mlx_model, log=verbose_line if verbose else None):
        failed = repl.run(read_messages(interactive))
    if failed:
        sys.exit(1)


# Generation options and the flags that set them.
_FLAGS = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "max_tokens": "max_tokens",
          "seed": "seed", "stop": "stop", "repetition_context_size": "repetition_context_size",
          "prefill_step_size": "prefill_step_size", "draft_model": "draft_model",
          "num_draft_tokens": "num_draft_tokens", "prompt_lookup": "prompt_lookup"}


def _given(option: str) -> bool:
    """Whether the flag behind a generation option was given on the command line."""
    source = click.get_current_context().get_parameter_source(_FLAGS[option])
    return source == click.core.ParameterSource.COMMANDLINE


def read_messages(interactive: bool, read_line: Callable[[str], str] | None = None
                  ) -> Iterator[str]:
    """The user's inputs: one per line, or several lines joined by a trailing backslash or
    between \"\"\" marks. Ends at end of input (Ctrl-D); Ctrl-C at the prompt ends it too."""
    if read_line is None:
        if interactive:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
            read_line = input
        else:
            read_line = _read_stdin_line
    prompt, more = (">>> ", "... ") if interactive else ("", "")
    while True:
        try:
            line = read_line(prompt)
            if line.lstrip().startswith('"""'):
                body, lines = line.lstrip()[3:], []
                while not body.rstrip().endswith('"""'):
                    lines.append(body)
                    body = read_line(more)
                lines.append(body.rstrip()[:-3])
                yield "\n".join(lines).strip("\n")
                continue
            while line.endswith("\\"):
                line = line[:-1] + "\n" + read_line(more)
            yield line
        except (EOFError, KeyboardInterrupt):
            if interactive:
                click.echo()
            return


def _read_stdin_line(prompt: str) -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


class ChatREPL:
    """Runs the chat loop: messages go to the session, /commands are handled here."""

    def __init__(self, chat, *, interactive: bool, verbose: bool, display: ReasoningDisplay):
        self.chat, self.interactive, self.verbose, self.display = (chat, interactive, verbose,
                                                                   display)
        self.last = None  # the last reply's final response
        self.failed = False

    def note(self, text: str) -> None:
        """A message from the chat itself: stdout at a terminal, stderr when scripted."""
        click.echo(text, err=not self.interactive)

    def run(self, messages: Iterator[str]) -> bool:
        """Handle every input; returns whether some scripted input failed (then the command
        exits with status 1; at a terminal the error was shown and the chat went on)."""
        if self.interactive:
            self.note("Chatting. /help lists the commands; Ctrl-D or /quit leaves.")
        for text in messages:
            if not text.strip():
                continue
            if text.startswith("/"):
                if self.command(text) == "quit":
                    break
                continue
            self.reply(functools.partial(self.chat.stream, text))
        return self.failed and not self.interactive

    def reply(self, start: Callable[[], Iterator]) -> None:
        """Stream one reply; Ctrl-C (SIGINT) cancels it instead of ending the program."""
        previous = signal.signal(signal.SIGINT, lambda *_: self.chat.cancel())
        last = None
        try:
            for last in start():
                if last.truncated_messages and last.generation_tokens <= 1:
                    self.note(f"[dropped {last.truncated_messages} earlier messages to fit "
                              "the context]")
                click.echo(self.display(last.reasoning, last.text), nl=False)
                sys.stdout.flush()
        except (ValueError, OSError) as e:
            self.error(e)
            return
        finally:
            signal.signal(signal.SIGINT, previous)
        click.echo(self.display.close())
        if last is None:
            return
        self.last = last
        for call in last.tool_calls:
            click.echo(json.dumps(call.to_openai(), ensure_ascii=False))
        if last.finish_reason == "cancelled":
            self.note("[stopped]")
        if self.verbose:
            from qwen2_mlx.generate import format_stats

            click.echo(format_stats(last), err=True)

    def error(self, error: BaseException) -> None:
        click.echo(f"Error: {error_line(error)}", err=True)
        self.failed = True

    def command(self, line: str) -> str | None:
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        handler = self.COMMANDS.get(name)
        if handler is None:
            self.error(ValueError(f"unknown command {name}; /help lists them"))
            return None
        try:
            return handler(self, arg)
        except (ValueError, OSError) as e:
            self.error(e)
            return None

    # ---------------------------------------------------------------------------- commands
    def _help(self, arg: str) -> None:
        self.note(HELP)

    def _quit(self, arg: str) -> str:
        return "quit"

    def _reset(self, arg: str) -> None:
        self.chat.reset()
        self.note("[the conversation was reset]")

    def _undo(self, arg: str) -> None:
        removed = self.chat.undo()
        self.note(f"[removed {len(removed)} messages: {_preview(removed[0]['content'])}]")

    def _retry(self, arg: str) -> None:
        self.reply(self.chat.stream_regenerate)

    def _system(self, arg: str) -> None:
        if not arg:
            current = self.chat.system
            self.note(current if current is not None else "(the chat template's default)")
            return
        self.chat.system = arg
        self.note("[system prompt set]")

    def _set(self, arg: str) -> None:
        if not arg:
            shown = {k: v for k, v in self.chat.defaults.items() if k != "prefill_step_size"}
            self.note(", ".join(f"{k}={v!r}" for k, v in sorted(shown.items())))
            return
        name, _, value = arg.partition(" ")
        key = name.replace("-", "_")
        if key not in SETTABLE:
            raise ValueError(f"/set knows {', '.join(sorted(SETTABLE))}, not {name!r}")
        option, parse = SETTABLE[key]
        try:
            parsed = parse(value.strip())
        except ValueError:
            kind = "an integer" if parse is int else "a number"
            raise ValueError(f"/set {name} needs {kind}, got {value!r}") from None
        _check_setting(option, parsed, self.chat.defaults)
        self.chat.defaults[option] = parsed
        self.note(f"[{option} = {parsed!r}]")

    def _save(self, arg: str, overwrite: bool = False) -> None:
        path = _one_path(arg, "/save")
        try:
            self.chat.save(path, overwrite=overwrite)
        except FileExistsError:
            raise ValueError(f"{path} exists; /save! {path} replaces it") from None
        self.note(f"[saved {len(self.chat.messages)} messages to {path}]")

    def _save_over(self, arg: str) -> None:
        self._save(arg, overwrite=True)

    def _load(self, arg: str) -> None:
        from qwen2_mlx.chat_session import ChatSession

        path = _one_path(arg, "/load")
        self.chat = ChatSession.load(path, self.chat.model, self.chat.tokenizer)
        self.note(f"[loaded {len(self.chat.messages)} messages, "
                  f"{self.chat.cached_tokens} tokens cached]")

    def _stats(self, arg: str) -> None:
        chat, s = self.chat, self.chat.stats
        lines = [f"messages: {len(chat.messages)}, tokens in cache: {chat.cached_tokens} "
                 f"(budget {chat.context_budget})"]
        if self.last is not None:
            last = self.last
            lines.append(f"last reply: prefill {last.prompt_tokens} tokens at "
                         f"{last.prompt_tps:.1f} tokens/s ({last.cached_prompt_tokens} from the "
                         f"cache), decode {last.generation_tokens} tokens at "
                         f"{last.generation_tps:.1f} tokens/s")
        lines.append(f"turns: {s.turns}, replies re-synced: {s.resynced_replies} "
                     f"({s.resynced_tokens} tokens), messages dropped: {s.truncated_messages}")
        lines.append(f"peak memory: {s.peak_memory:.3f} GB")
        self.note("\n".join(lines))

    COMMANDS: dict[str, Callable] = {
        "/help": _help, "/quit": _quit, "/exit": _quit, "/reset": _reset, "/undo": _undo,
        "/retry": _retry, "/system": _system, "/set": _set, "/save": _save,
        "/save!": _save_over, "/load": _load, "/stats": _stats,
    }


def _check_setting(option: str, value, defaults: dict) -> None:
    """Raise ValueError unless `value` is a valid `option` (checked as generation checks it)."""
    from qwen2_mlx.sampling import SamplingParams

    if option == "max_tokens":
        if value < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {value}")
        return
    if option == "stop":
        return
    fields = {f: defaults[f] for f in SamplingParams.__dataclass_fields__ if f in defaults}
    SamplingParams(**{**fields, option: value})


def _one_path(arg: str, command: str) -> str:
    parts = shlex.split(arg) if arg else []
    if len(parts) != 1:
        raise ValueError(f"{command} takes one file name")
    return parts[0]


def _preview(text: str | None, width: int = 40) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[:width - 3] + "..."
