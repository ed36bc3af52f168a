"""A test server whose model writes scripted answers: `qwen2-mlx serve`'s machinery (engine,
app, runner) with a logits processor, passed through the server's `processor_factories`
hook, that pins the output to a script chosen from the request. A random tiny model then
"calls" a tool, answers from a tool result, or reasons, through the real tokenizer, chat
template, parser and HTTP layer.

    python scripted_server.py --model DIR --host 127.0.0.1 --port 0
"""

from __future__ import annotations

import argparse
import json
import sys

import mlx.core as mx

CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TOOL_CALL = "<tool_call>\n" + json.dumps(CALL) + "\n</tool_call>"
ANSWER = "It is sunny in Paris."
REASONED = "<think>Two and two make four.</think>The answer is 4."


class Pin:
    """Logits processor: the i-th generated token is script[i] (then EOS)."""

    def __init__(self, script: list[int]) -> None:
        self.script, self.prompt_length = script, None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.prompt_length is None:
            self.prompt_length = tokens.size
        step = min(tokens.size - self.prompt_length, len(self.script) - 1)
        pinned = mx.arange(logits.shape[-1]) == self.script[step]
        return mx.where(pinned, 0.0, -mx.inf).reshape(logits.shape)


def script_for(request: dict) -> str | None:
    """What the model "writes" for a request (None: whatever it writes)."""
    messages = request.get("messages") or []
    last = messages[-1] if messages else {}
    if last.get("role") == "tool":
        return ANSWER
    choice = request.get("tool_choice")
    if request.get("tools") and isinstance(choice, dict):  # the call's opening is forced
        return json.dumps(CALL["arguments"]) + "}\n</tool_call>"
    if request.get("tools") and choice == "required":
        return TOOL_CALL[len('<tool_call>\n{"name": "'):]
    if request.get("tools"):
        return TOOL_CALL
    if last.get("content") == "reason":
        return REASONED
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    from qwen2_mlx.loader import load
    from qwen2_mlx.server.app import ServerConfig
    from qwen2_mlx.server.engine import Engine, EngineSettings
    from qwen2_mlx.server.runner import bind_socket, serve
    from qwen2_mlx.tokenizer import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer.from_pretrained(args.model)
    im_end = tokenizer.token_to_id("<|im_end|>")

    def scripted(request: dict) -> Pin | None:
        text = script_for(request)
        return None if text is None else Pin(tokenizer.encode(text) + [im_end])

    engine = Engine(lambda: load(args.model), EngineSettings())
    engine.start()
    sock = bind_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    print(f"Serving 'scripted' at http://{host}:{port}/v1", file=sys.stderr, flush=True)
    serve(engine, ServerConfig(model_id="scripted", processor_factories=(scripted,)), sock,
          shutdown_timeout=2)


if __name__ == "__main__":
    main()
