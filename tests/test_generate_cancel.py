"""Stopping generation from outside (`cancel=`), prefill progress, and generating on a worker
thread while another thread cancels it or reads the cache afterwards."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from qwen2_mlx import generate, load, stream_generate
from qwen2_mlx.generate import generate_step
from qwen2_mlx.sampling import SamplingParams

from scripted_model import tiny_model_built_here


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load(tiny_checkpoint)


def test_cancel_between_tokens_ends_within_one_token(loaded):
    model, tokenizer = loaded
    cache = model.make_cache()
    cancel = threading.Event()
    responses = []
    for r in stream_generate(model, tokenizer, "once upon a time", max_tokens=100,
                             cache=cache, cancel=cancel):
        responses.append(r)
        if len(responses) == 4:
            cancel.set()
    # No token after the cancel: the stream ends with a response that carries none.
    assert len(responses) == 5 and responses[-1].token is None
    assert responses[-1].finish_reason == "cancelled" and responses[-1].generation_tokens == 4
    assert all(r.finish_reason is None for r in responses[:-1])
    tokens = [r.token for r in responses[:-1]]
    # The cache holds the prompt and every token handed out.
    assert cache.tokens == tokenizer.encode("once upon a time") + tokens
    assert responses[-1].full_text == "".join(r.text for r in responses)


def test_cancelled_before_the_first_token_leaves_the_cache_as_it_was(loaded):
    model, tokenizer = loaded
    cache = model.make_cache()
    list(stream_generate(model, tokenizer, "hello", max_tokens=3, cache=cache))
    before = list(cache.tokens)
    cancel = threading.Event()
    cancel.set()
    responses = list(stream_generate(model, tokenizer, " and more", max_tokens=5, cache=cache,
                                     cancel=cancel))
    assert len(responses) == 1
    last = responses[0]
    assert last.finish_reason == "cancelled" and last.token is None and np.isnan(last.logprob)
    assert last.generation_tokens == 0 and last.text == ""
    assert cache.tokens == before


def test_prompt_progress_reports_each_prefill_step(loaded):
    model, tokenizer = loaded
    ids = list(range(10, 40))  # 30 prompt tokens, prefilled 8 at a time (the last one decodes)
    calls = []
    list(stream_generate(model, tokenizer, ids, max_tokens=2, prefill_step_size=8,
                         prompt_progress=lambda done, total: calls.append((done, total))))
    assert calls == [(8, 30), (16, 30), (24, 30), (29, 30), (30, 30)]


def test_cancel_in_the_prefill_stops_it_there(loaded):
    model, tokenizer = loaded
    cancel = threading.Event()
    calls = []

    def progress(done, total):
        calls.append(done)
        if done >= 16:
            cancel.set()

    cache = model.make_cache()
    responses = list(stream_generate(model, tokenizer, list(range(10, 90)), max_tokens=2,
                                     prefill_step_size=8, cache=cache, cancel=cancel,
                                     prompt_progress=progress))
    assert calls == [8, 16]
    assert [r.finish_reason for r in responses] == ["cancelled"]
    assert cache.offset == 0 and cache.tokens == []


def test_generate_step_honours_cancel(loaded):
    model, _ = loaded
    cancel = threading.Event()
    steps = generate_step([1, 2, 3], model, sampling=SamplingParams(), max_tokens=50,
                          cancel=cancel)
    got = []
    for token, _ in steps:
        got.append(token)
        if len(got) == 2:
            cancel.set()
    assert len(got) == 2


def test_cancel_must_be_an_event(loaded):
    model, tokenizer = loaded
    with pytest.raises(TypeError, match="cancel must be a threading.Event"):
        next(stream_generate(model, tokenizer, "hi", cancel=True))


def test_a_continued_cache_whose_prompt_opened_think_starts_in_reasoning(
        tiny_vocab_model, qwq_tokenizer):
    from scripted_model import reply_scripted

    tok = qwq_tokenizer
    model = reply_scripted(tiny_vocab_model, tok, "Hmm.\n</think>\n\nYes.")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Sure?"}])
    assert tok.decode(prompt).endswith("<think>\n")
    cache = model.make_cache()
    list(stream_generate(model, tok, prompt[:-1], cache=cache, max_tokens=1))
    cache.trim(1)
    # Only the last prompt token ("\n") is given; "<think>" is in the cache.
    result = generate(model, tok, prompt[-1:], cache=cache, max_tokens=20)
    assert (result, result.reasoning) == ("\n\nYes.", "Hmm.\n")


def test_stream_generate_on_a_worker_then_the_main_thread_continues(loaded):
    _, tokenizer = loaded
    model = tiny_model_built_here()
    cache = model.make_cache()
    out = {}

    def worker():
        try:
            out["text"] = generate(model, tokenizer, list(range(5, 45)), max_tokens=6,
                                   cache=cache, prefill_step_size=16)
        except Exception as e:
            out["error"] = e

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(60)
    assert "error" not in out, out.get("error")
    assert len(cache.tokens) == 46  # read on the main thread: nothing lazy was left behind
    more = generate(model, tokenizer, [7, 8], max_tokens=4, cache=cache)
    whole = generate(model, tokenizer, cache.tokens[:46] + [7, 8], max_tokens=4)
    assert more == whole
