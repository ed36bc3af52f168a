"""`qwen2-mlx serve` at its limits: a full queue (429 with Retry-After), the prefix cache's byte
budget, an 8-bit KV cache with batching and the prefix cache, and SIGTERM during generation.
Servers are subprocesses on 127.0.0.1 with tiny float32 models; every request is bounded."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import mlx.core as mx
import openai
import pytest

from qwen2_mlx.loader import load_model

from server_process import ServerProcess, metric, request, wait_until

NO_EOS = {"509": -100, "511": -100}
BUDGET_TOKENS = 150  # the prefix cache holds about this many positions


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    # head_dim 32, so the KV cache can be stored 8-bit (groups of 32).
    return checkpoint_factory(hidden_size=128, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def bytes_per_token(checkpoint) -> int:
    model = load_model(checkpoint)
    cache = model.make_cache(kv_bits=8)
    model(mx.array([list(range(10))]), cache=cache)
    return sum(layer.nbytes for layer in cache) // 10


@pytest.fixture(scope="module")
def server(checkpoint, bytes_per_token):
    with ServerProcess(["--model", str(checkpoint), "--model-id", "tiny", "--kv-bits", "8",
                        "--max-batch-size", "2", "--max-queue", "1",
                        "--prompt-cache-bytes", str(BUDGET_TOKENS * bytes_per_token)]) as server:
        yield server


def ask(client, content: str, **kwargs):
    kwargs = {"max_tokens": 8, "temperature": 0.0, "logit_bias": NO_EOS, **kwargs}
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], **kwargs)


def metrics(server) -> str:
    return request(server.url, "GET", "/metrics").text


def test_full_queue_gets_429_with_retry_after(server):
    client = server.client()
    streams = [ask(client, f"Long one {i}", max_tokens=5000, stream=True) for i in range(2)]
    for stream in streams:
        next(iter(stream))  # both are decoding: the batch (2) is full
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(ask, client, "Waiting", max_tokens=2)
        assert wait_until(lambda: metric(metrics(server), "queued_requests") == 1, 5)
        with pytest.raises(openai.RateLimitError) as e:
            ask(client, "One too many")
        assert int(e.value.response.headers["retry-after"]) >= 1
        assert e.value.body["code"] == "rate_limit_exceeded"
        for stream in streams:
            stream.close()
        assert waiting.result(timeout=30).choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "Too many choices", n=3)
    assert e.value.body["param"] == "n"


def test_8bit_kv_batched_equals_alone(server):
    client = server.client()
    prompts = ["Eight bits " + "x " * 5, "Quantized cache " + "y " * 12]
    alone = [ask(client, p, max_tokens=10).choices[0].message.content for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda p: ask(client, p, max_tokens=10).choices[0]
                                 .message.content, prompts))
    assert together == alone


def test_byte_budget_evicts_the_least_recently_used(server, bytes_per_token):
    client = server.client()
    turn_a = "Conversation A " + "alpha " * 4  # 78 prompt tokens: entries of ~85 positions
    first = ask(client, turn_a)
    text = metrics(server)
    assert metric(text, "prompt_cache_entries") >= 1
    evicted = metric(text, "prompt_cache_evictions")
    ask(client, "Conversation B " + "beta " * 4)  # together with A: more than the budget
    text = metrics(server)
    assert metric(text, "prompt_cache_evictions") > evicted
    assert metric(text, "prompt_cache_bytes") <= BUDGET_TOKENS * bytes_per_token
    second = client.chat.completions.create(
        model="tiny", max_tokens=4, temperature=0.0,
        messages=[{"role": "user", "content": turn_a},
                  {"role": "assistant", "content": first.choices[0].message.content},
                  {"role": "user", "content": "More"}])
    # A was evicted: only the opening it shares with B comes from the cache (kept, it would
    # give its whole first prompt and answer).
    assert 0 < second.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens


def test_sigterm_finishes_running_requests_refuses_waiting_ones_and_exits_0(checkpoint):
    with ServerProcess(["--model", str(checkpoint), "--model-id", "tiny", "--max-batch-size", "1",
                        "--shutdown-timeout", "2"]) as server:
        client = server.client()
        stream = ask(client, "Running", max_tokens=100_000, stream=True)
        chunks = iter(stream)
        next(chunks)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(ask, client, "Waiting")
            assert wait_until(lambda: metric(metrics(server), "queued_requests") == 1, 5)
            sent = time.monotonic()
            server.signal(signal.SIGTERM)
            with pytest.raises(openai.APIStatusError) as e:
                waiting.result(timeout=30)
            assert e.value.status_code == 503
        finish = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finish[-1] == "length"  # ended at the deadline, as a complete response
        assert server.wait(timeout=15) == 0
        assert time.monotonic() - sent < 2 + 5
        assert "stopped" in server.log
