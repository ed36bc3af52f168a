"""`qwen2-mlx serve --draft-model`: over HTTP a lone greedy request gets `generate`'s answer
(here the draft is the model itself, so every round is accepted whole and several tokens
arrive per step), the acceptance counters show on /metrics, and a draft that cannot be
loaded is a one-line error at start."""

from __future__ import annotations

import subprocess
import sys

from qwen2_mlx.generate import generate
from qwen2_mlx.loader import load

from server_process import ServerProcess, metric, request


def test_draft_model_over_http_matches_generate_and_reports_acceptance(tiny_checkpoint):
    model, tokenizer = load(tiny_checkpoint)
    messages = [{"role": "user", "content": "Tell me a story"}]
    expected = generate(model, tokenizer, messages, max_tokens=20, temperature=0.0,
                        repetition_penalty=1.05)  # the checkpoint's generation_config
    with ServerProcess(["--model", str(tiny_checkpoint), "--model-id", "tiny",
                        "--draft-model", str(tiny_checkpoint), "--num-draft-tokens", "3"]) as s:
        client = s.client()
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20,
                                               temperature=0)
        assert reply.choices[0].message.content == expected
        stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20,
                                                temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
        text = request(s.url, "GET", "/metrics").text
        drafted = metric(text, "speculative_drafted_tokens_total")
        assert 0 < metric(text, "speculative_accepted_tokens_total") <= drafted
        assert metric(text, "speculative_rounds_total") < 2 * 20


def test_an_unloadable_draft_is_a_one_line_error_and_a_clean_exit(tiny_checkpoint,
                                                                   checkpoint_factory):
    """(Exit status 1, never an abort: the engine thread clears its MLX streams before the
    load error reaches the caller.)"""
    small = checkpoint_factory(vocab_size=100, tokenizer=False)  # no tokenizer files
    result = subprocess.run(  # a server that starts anyway is killed by the timeout
        [sys.executable, "-m", "qwen2_mlx.cli.main", "serve", "--model", str(tiny_checkpoint),
         "--port", "0", "--draft-model", str(small)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: draft model: ")
