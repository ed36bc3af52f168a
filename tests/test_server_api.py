"""`qwen2-mlx serve` through the real `openai` client: endpoints, fields, streaming, batching,
the prefix cache, disconnects and error responses. One server (a subprocess on 127.0.0.1 and
a free port, tiny float32 model) for the module; every request has a timeout."""

from __future__ import annotations

import concurrent.futures
import json
import time

import openai
import pytest

from qwen2_mlx.generate import generate
from qwen2_mlx.loader import load

from server_process import Reply, ServerProcess, metric, request, stream_lines, wait_until

KEY = "test-key"
MODEL = "tiny"
ORIGIN = "http://app.example"
NO_EOS = {"509": -100, "511": -100}  # the tiny tokenizer's EOS ids: generate to the limit
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def server(checkpoint):
    with ServerProcess(["--model", str(checkpoint), "--model-id", MODEL, "--api-key", KEY,
                        "--cors-origin", ORIGIN, "--max-body-bytes", "64KiB",
                        "--prefill-step-size", "16", "--keepalive", "0.1",
                        "--prompt-cache-bytes", "64MB"]) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return server.client(KEY)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return load(checkpoint)


def http(server, method: str, path: str, key: str | None = KEY, **kwargs) -> Reply:
    headers = kwargs.pop("headers", {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return request(server.url, method, path, headers=headers, **kwargs)


def chat(client, content: str, **kwargs):
    """A greedy one-message chat that runs to max_tokens (EOS suppressed)."""
    kwargs = {"max_tokens": 12, "logit_bias": NO_EOS, **GREEDY, **kwargs}
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **kwargs)


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http(server, "GET", "/health", key=None).json() == {"status": "ok"}
    text = http(server, "GET", "/metrics").text
    assert "# TYPE qwen2_mlx_time_to_first_token_seconds histogram" in text
    assert metric(text, "active_sequences") == 0


def test_chat_matches_generate_with_the_models_defaults(client, reference):
    """Greedy output equals `generate` on the same messages; sampling fields the request
    leaves out come from generation_config.json (repetition_penalty 1.05 here)."""
    model, tokenizer = reference
    messages = [{"role": "user", "content": "Tell me a story"}]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                              temperature=0)
    expected = generate(model, tokenizer, messages, max_tokens=20, temperature=0.0,
                        repetition_penalty=1.05)
    choice = response.choices[0]
    assert choice.message.content == expected
    assert choice.message.role == "assistant" and choice.finish_reason == expected.finish_reason
    prompt = tokenizer.apply_chat_template(messages)
    assert response.usage.prompt_tokens == len(prompt)
    assert response.usage.completion_tokens == 20
    assert response.model == MODEL and response.object == "chat.completion"


def test_chat_stream_equals_non_stream_and_reports_usage(client):
    whole = chat(client, "Stream this", max_tokens=16)
    stream = chat(client, "Stream this", max_tokens=16, stream=True,
                  stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completions_text_ids_echo_and_stream(client, reference):
    _, tokenizer = reference
    a = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10,
                                  **GREEDY)
    ids = tokenizer.encode("Once upon a time")
    b = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, **GREEDY)
    assert a.choices[0].text == b.choices[0].text and a.object == "text_completion"
    echoed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10,
                                       echo=True, **GREEDY)
    assert echoed.choices[0].text == "Once upon a time" + a.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=10, stream=True, **GREEDY))
    assert streamed == a.choices[0].text
    default = client.completions.create(model=MODEL, prompt="Once", logit_bias=NO_EOS, **GREEDY)
    assert default.usage.completion_tokens == 16  # OpenAI's default for completions


def test_n_and_seed(client):
    kwargs = {"n": 2, "temperature": 1.0, "seed": 1234, "max_tokens": 12}
    first = chat(client, "Pick a word", **kwargs)
    again = chat(client, "Pick a word", **kwargs)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert texts == [c.message.content for c in again.choices]
    assert texts[0] != texts[1]
    other = chat(client, "Pick a word", **{**kwargs, "seed": 99})
    assert [c.message.content for c in other.choices] != texts


def test_stop_string_ends_the_text_before_it(client):
    full = chat(client, "Say something long", max_tokens=30)
    text = full.choices[0].message.content
    stop = text[10:13]
    assert stop and stop.strip()
    cut = chat(client, "Say something long", max_tokens=30, stop=[stop, "\0"])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_logprobs(client):
    response = chat(client, "Probabilities", max_tokens=6, logprobs=True, top_logprobs=3)
    entries = response.choices[0].logprobs.content
    assert len(entries) == 6
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.logprob <= 0
    text = b"".join(bytes(e.bytes) for e in entries).decode("utf-8", errors="replace")
    assert text == response.choices[0].message.content
    completion = client.completions.create(model=MODEL, prompt="Probabilities", max_tokens=4,
                                           logprobs=2, **GREEDY)
    lp = completion.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(len(t) == 2 for t in lp.top_logprobs)


def test_eight_concurrent_greedy_requests_equal_each_alone(server, client, reference):
    """Continuous batching under load: every request's tokens equal its tokens served alone
    (and `generate`'s), prompts and lengths all different."""
    model, tokenizer = reference
    prompts = [f"Request number {i} " + "word " * (3 * i) for i in range(8)]
    limits = [12, 7, 15, 9, 20, 5, 11, 14]

    def ask(i):
        return chat(client, prompts[i], max_tokens=limits[i],
                    extra_body={"repetition_penalty": 1.0}).choices[0].message.content

    alone = [ask(i) for i in range(8)]
    before = http(server, "GET", "/metrics").text
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert together == alone
    after = http(server, "GET", "/metrics").text
    steps, rows = (metric(after, m) - metric(before, m)
                   for m in ("decode_steps_total", "decode_rows_total"))
    assert rows > 2 * steps  # they were decoded together (mean batch size above 2)
    bias = {509: -100.0, 511: -100.0}
    for i in (0, 5):  # the single-sequence reference, for two of them
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompts[i]}])
        expected = _generate_with_bias(model, tokenizer, ids, limits[i], bias)
        assert alone[i] == expected


def _generate_with_bias(model, tokenizer, ids, max_tokens, bias):
    import mlx.core as mx

    from qwen2_mlx.generate import generate_step
    from qwen2_mlx.sampling import SamplingParams

    class Biased:  # the model with logit_bias applied to its logits
        config = model.config

        def __init__(self):
            self.column = mx.zeros((model.config.vocab_size,))
            for t, b in bias.items():
                self.column[t] = b

        def make_cache(self, **kw):
            return model.make_cache(**kw)

        def __call__(self, x, cache=None):
            return model(x, cache=cache) + self.column

        forward = __call__

    tokens = [t for t, _ in generate_step(ids, Biased(), sampling=SamplingParams(),
                                           max_tokens=max_tokens)]
    return tokenizer.decode(tokens)


def test_prefix_cache_second_turn_and_shared_system_prompt(server, client):
    system = {"role": "system", "content": "You are a careful assistant. " * 8}
    turn1 = [system, {"role": "user", "content": "First question"}]
    first = client.chat.completions.create(model=MODEL, messages=turn1, max_tokens=8,
                                           **GREEDY)
    turn2 = turn1 + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=8,
                                            **GREEDY)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens  # only the new turn was prefilled
    assert cached < second.usage.prompt_tokens
    other = client.chat.completions.create(
        model=MODEL, messages=[system, {"role": "user", "content": "Unrelated"}], max_tokens=4,
        **GREEDY)
    shared = other.usage.prompt_tokens_details.cached_tokens
    assert shared >= 60  # the system prompt's turn (about 70 tokens) came from the cache
    text = http(server, "GET", "/metrics").text
    assert metric(text, "prompt_cache_bytes") > 0
    assert metric(text, "prompt_cache_cached_tokens_total") >= cached + shared


def test_disconnect_mid_stream_frees_the_sequence(server, client):
    """Five times (a race that loses a cancellation shows on some rounds only)."""
    before = metric(http(server, "GET", "/metrics").text, "cancelled_sequences_total")
    for _ in range(5):
        stream = chat(client, "Go on forever", max_tokens=3000, stream=True)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        assert metric(http(server, "GET", "/metrics").text, "active_sequences") == 1
        stream.close()
        closed = time.monotonic()
        assert wait_until(lambda: metric(http(server, "GET", "/metrics").text,
                                         "active_sequences") == 0, timeout=1.0)
        assert time.monotonic() - closed < 1.0
    text = http(server, "GET", "/metrics").text
    assert metric(text, "cancelled_sequences_total") == before + 5


def test_non_streaming_disconnect_cancels_too(server):
    before = metric(http(server, "GET", "/metrics").text, "cancelled_sequences_total")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3000,
            "logit_bias": NO_EOS, **GREEDY}
    with pytest.raises(TimeoutError):  # the client gives up and closes the connection
        http(server, "POST", "/v1/chat/completions", body=body, timeout=0.5)
    assert wait_until(lambda: metric(http(server, "GET", "/metrics").text,
                                     "cancelled_sequences_total") == before + 1, timeout=1.5)
    assert metric(http(server, "GET", "/metrics").text, "active_sequences") == 0


def test_keepalive_comments_during_a_long_prefill(server):
    body = {"model": MODEL, "prompt": [i % 500 for i in range(1500)], "max_tokens": 1,
            "stream": True}
    lines = stream_lines(server.url, "/v1/completions", body, {"Authorization": f"Bearer {KEY}"})
    assert next(lines).startswith("text/event-stream")
    lines = [line for line in lines if line]
    assert lines[0] == ": keep-alive"  # sent before the first token
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_errors_have_openai_shapes(server, client):
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong-key").models.list()
    assert http(server, "GET", "/v1/models", key=None).status_code == 401
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "x", temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "x", extra_body={"top_k": "many"})
    assert e.value.body["param"] == "top_k" and "integer" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[5] * 4100, max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[1, 512], max_tokens=1)
    assert "512" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": 5}])
    assert e.value.body["param"] == "messages"
    malformed = http(server, "POST", "/v1/chat/completions", body=b"{not json")
    assert malformed.status_code == 400
    assert set(malformed.json()["error"]) == {"message", "type", "param", "code"}
    too_big = http(server, "POST", "/v1/completions", body=b"x" * (65 * 1024))
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    chunked = http(server, "POST", "/v1/completions", body=iter([b"x" * 40_000] * 2))
    assert chunked.status_code == 413  # no Content-Length: counted while it arrives
    assert http(server, "GET", "/v1/nothing").status_code == 404


def test_cors_only_for_listed_origins(server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = http(server, "OPTIONS", "/v1/chat/completions", key=None, headers=preflight)
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    other = http(server, "OPTIONS", "/v1/chat/completions", key=None,
                 headers={**preflight, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    plain = http(server, "GET", "/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in plain.headers


def test_a_flood_of_bad_requests_does_not_stall_generation(server, client):
    stream = chat(client, "Keep going", max_tokens=60, stream=True)
    tic = time.monotonic()
    statuses = [http(server, "POST", "/v1/chat/completions", body=b"[").status_code
                for _ in range(40)]
    assert set(statuses) == {400}
    assert time.monotonic() - tic < 4  # answered at once, not behind the generation
    finish = [c.choices[0].finish_reason for c in stream if c.choices]
    assert finish[-1] == "length"


def test_response_format_json_schema_is_enforced_per_request(client):
    """A random model writes valid JSON of the schema when asked, while a request without a
    format, decoded in the same batch, stays free text."""
    pytest.importorskip("qwen2_mlx.structured")
    pytest.importorskip("llguidance")
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
              "properties": {"city": {"type": "string", "maxLength": 6},
                             "days": {"type": "integer", "minimum": 1, "maximum": 9}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": schema}}

    def ask(i):
        kwargs = {"response_format": fmt} if i % 2 == 0 else {}
        return chat(client, f"Plan trip {i}", max_tokens=60, logit_bias=None,
                    **kwargs).choices[0]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        choices = list(pool.map(ask, range(4)))
    for i, choice in enumerate(choices):
        if i % 2 == 0:
            value = json.loads(choice.message.content)
            assert set(value) == {"city", "days"} and 1 <= value["days"] <= 9
            assert choice.finish_reason == "stop"
        else:
            with pytest.raises(json.JSONDecodeError):
                json.loads(choice.message.content)
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "x", response_format={"type": "json_schema", "json_schema": {"schema": 5}})
    assert e.value.body["param"] == "response_format"
