"""`qwen2-mlx serve`: an OpenAI-compatible server for one model."""

from __future__ import annotations

import re
import sys
import time

import click

from qwen2_mlx.cli.errors import click_error, error_line
from qwen2_mlx.cli.generate_command import DEFAULT_MODEL

API_KEY_ENV = "QWEN2_MLX_API_KEY"

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class ByteSize(click.ParamType):
    """A size in bytes: 1000000, 512MB, 1.5GiB (0 is allowed)."""

    name = "size"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = match and _UNITS.get(match.group(2).lower())
        if not unit:
            self.fail(f"{value!r} is not a size such as 1000000, 512MB or 2GiB", param, ctx)
        return int(float(match.group(1)) * unit)


@click.command("serve")
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
              help="Local model directory or Hugging Face repo id, loaded at start.")
@click.option("--model-id", default=None,
              help="The name clients use for the model (default: --model as given); "
                   "requests naming any other model get 404.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback exposes the server to the network.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0 picks a free one and prints it).")
@click.option("--api-key", envvar=API_KEY_ENV, default=None,
              help=f"Require 'Authorization: Bearer KEY'. Prefer ${API_KEY_ENV}: a key on "
                   "the command line shows in `ps`.")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Allow browser calls from this origin (repeatable; '*' for any). "
                   "Default: no CORS headers.")
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Sequences decoded together (each of a request's n choices is one).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1),
              help="Requests that may wait to start; more get 429 with Retry-After.")
@click.option("--prefill-step-size", default=512, show_default=True, type=click.IntRange(1),
              help="Prompt tokens per prefill step (between decode steps of the others).")
@click.option("--prompt-cache-bytes", default="1GiB", show_default=True, type=ByteSize(),
              help="Memory for the prefix cache (KV of earlier requests, reused by the next "
                   "turn or a shared system prompt); 0 turns it off.")
@click.option("--kv-bits", type=click.Choice(["8", "4"]), default=None,
              help="Store KV caches quantized (8 bits halves their memory).")
@click.option("--max-tokens", type=click.IntRange(1), default=None,
              help="Tokens per answer when a request sets no max_tokens (default: chat up "
                   "to the context end, completions 16, as OpenAI).")
@click.option("--max-body-bytes", default="4MiB", show_default=True, type=ByteSize(),
              help="Larger request bodies get 413.")
@click.option("--keepalive", default=10.0, show_default=True, type=click.FloatRange(0.05),
              help="Seconds between SSE keep-alive comments while a stream waits (prefill).")
@click.option("--shutdown-timeout", default=30.0, show_default=True,
              type=click.FloatRange(0), help="On SIGTERM/Ctrl-C, seconds running requests "
                                             "may take to finish before they are ended.")
@click.option("--max-connections", default=256, show_default=True, type=click.IntRange(1),
              help="Open connections beyond this get 503.")
@click.option("--adapter-path", default=None, type=click.Path(),
              help="A LoRA adapter directory to apply (only from the command line).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Cast weights to this dtype (default: as stored).")
@click.option("--draft-model", default=None,
              help="Speculative decoding while one request decodes alone: a small model with "
                   "the same tokenizer drafts tokens the model checks (directory or Hub repo "
                   "id, loaded at start; same --dtype). Same output distribution; batches "
                   "decode as without it.")
@click.option("--num-draft-tokens", default=4, show_default=True, type=click.IntRange(1, 64),
              help="Most tokens drafted per round (adapted down when few are accepted).")
@click.option("--dca", is_flag=True, help="Dual Chunk Attention (decodes one sequence at a "
                                          "time: DCA is not batched).")
@click.option("--yarn-factor", type=float, default=None,
              help="Static YaRN RoPE scaling by this factor.")
@click.option("--log-level", type=click.Choice(["warning", "info", "debug"]),
              default="warning", show_default=True, help="uvicorn's log level (info logs "
                                                         "each request).")
def serve_command(model, model_id, host, port, api_key, cors_origins, max_batch_size, max_queue,
                  prefill_step_size, prompt_cache_bytes, kv_bits, max_tokens, max_body_bytes,
                  keepalive, shutdown_timeout, max_connections, adapter_path, dtype,
                  draft_model, num_draft_tokens, dca, yarn_factor, log_level) -> None:
    """Serve a model over the OpenAI API (chat and text completions, streaming, tools).

    Binds 127.0.0.1 by default; give --api-key (or $QWEN2_MLX_API_KEY) before any other
    --host. Requests can only use the model loaded here: nothing a request says makes the
    server read a file or download. Stop it with Ctrl-C or SIGTERM (running requests finish
    first, up to --shutdown-timeout).

    \b
    Examples:
      qwen2-mlx serve --model Qwen/Qwen2-0.5B-Instruct
      qwen2-mlx serve -m ./qwen2-7b-4bit --model-id qwen2-7b --kv-bits 8 --port 8000
      QWEN2_MLX_API_KEY=secret qwen2-mlx serve -m ./qwen2-7b --host 0.0.0.0
      qwen2-mlx serve -m ./qwen2-1.5b --cors-origin http://localhost:3000
      qwen2-mlx serve -m Qwen/Qwen2-7B-Instruct --draft-model Qwen/Qwen2-0.5B-Instruct
      curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
           -d '{"messages": [{"role": "user", "content": "Hi"}]}'
    """
    from qwen2_mlx.server import missing_server_extra

    problem = missing_server_extra()
    if problem:
        raise click.ClickException(problem)
    from qwen2_mlx.loader import load
    from qwen2_mlx.server.app import ServerConfig
    from qwen2_mlx.server.engine import Engine, EngineSettings
    from qwen2_mlx.server.runner import bind_socket, is_loopback, serve

    if not api_key and not is_loopback(host):
        click.echo(f"Warning: serving on {host} without an API key: anyone who can reach "
                   f"this address can use the model (set --api-key or ${API_KEY_ENV})",
                   err=True)
    try:
        sock = bind_socket(host, port)
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port}: {error_line(e)}") from e
    settings = EngineSettings(max_batch_size=max_batch_size, max_queue=max_queue,
                              prefill_step_size=prefill_step_size,
                              prompt_cache_bytes=prompt_cache_bytes,
                              kv_bits=int(kv_bits) if kv_bits else None,
                              num_draft_tokens=num_draft_tokens)

    def load_model():
        return load(model, dtype=dtype, adapter_path=adapter_path, dca=dca,
                    yarn_factor=yarn_factor)

    def load_draft():
        try:
            return load(draft_model, dtype=dtype)
        except (OSError, ValueError) as e:
            raise ValueError(f"draft model: {error_line(e)}") from e

    click.echo(f"Loading {model}{f' and {draft_model}' if draft_model else ''} ...", err=True)
    tic = time.perf_counter()
    engine = Engine(load_model, settings, load_draft=load_draft if draft_model else None)
    try:
        engine.start()
    except (OSError, ValueError) as e:
        sock.close()
        raise click_error(e) from e
    name = model_id or model
    config = ServerConfig(model_id=name, aliases=(model,) if model_id else (), api_key=api_key,
                          cors_origins=tuple(cors_origins), max_body_bytes=max_body_bytes,
                          keepalive_seconds=keepalive, default_max_tokens=max_tokens)
    bound_host, bound_port = sock.getsockname()[:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    click.echo(f"Loaded in {time.perf_counter() - tic:.1f} s. Serving {name!r} at "
               f"http://{url_host}:{bound_port}/v1 "
               f"({'API key required' if api_key else 'no API key'}); Ctrl-C stops.", err=True)
    sys.stderr.flush()
    serve(engine, config, sock, shutdown_timeout=shutdown_timeout,
          max_connections=max_connections, log_level=log_level)
