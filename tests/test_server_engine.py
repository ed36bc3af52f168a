"""The server's engine in-process (no HTTP): continuous batching gives every sequence the
tokens it gets alone, prefill is interleaved with decoding, cancellation frees a row at the
next step, the prefix cache is reused and never changes what is generated, and a failing step
fails its jobs without stopping the engine."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from qwen2_mlx.generate import generate
from qwen2_mlx.loader import load
from qwen2_mlx.sampling import SamplingParams
from qwen2_mlx.server.engine import Engine, EngineSettings, QueueFullError
from qwen2_mlx.server.jobs import ChoiceEvent, ChoiceSettings, Job, JobDone, JobError

TIMEOUT = 60


class Collector:
    """Gathers one job's events (called on the engine thread)."""

    def __init__(self, choices: int = 1) -> None:
        self.text = [""] * choices
        self.tokens = [0] * choices
        self.finish = [None] * choices
        self.logprobs = [[] for _ in range(choices)]
        self.done: JobDone | JobError | None = None
        self.times: list[float] = []
        self.finished = threading.Event()

    def __call__(self, event) -> None:
        if isinstance(event, ChoiceEvent):
            self.text[event.choice] += event.text
            self.tokens[event.choice] += 1
            self.logprobs[event.choice] += event.logprobs
            self.times.append(time.monotonic())
            if event.finish_reason:
                self.finish[event.choice] = event.finish_reason
        else:
            self.done = event
            self.finished.set()


def submit(engine, prompt, *, n=1, max_tokens=16, temperature=0.0, seed=None, **settings):
    out = Collector(n * (len(prompt) if isinstance(prompt[0], list) else 1))
    prompts = prompt if isinstance(prompt[0], list) else [prompt]
    sampling = SamplingParams(temperature=temperature, seed=seed)
    job = Job(prompts, n, ChoiceSettings(sampling, max_tokens=max_tokens, **settings), out)
    engine.submit(job)
    return job, out


def wait(*outs):
    for out in outs:
        assert out.finished.wait(TIMEOUT), "the engine did not finish in time"
    return outs


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 500, size=n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    return checkpoint_factory(hidden_size=128, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return load(checkpoint)


def make_engine(checkpoint, **settings) -> Engine:
    engine = Engine(lambda: load(checkpoint), EngineSettings(**settings))
    engine.start()
    return engine


@pytest.fixture(scope="module")
def engine(checkpoint):
    engine = make_engine(checkpoint, max_batch_size=8, prefill_step_size=8,
                         prompt_cache_bytes=0)
    yield engine
    engine.stop()


def test_concurrent_greedy_equals_alone_and_generate(engine, reference):
    """8 requests of different prompt and output lengths, all at once, each gets exactly
    the tokens it gets alone, which are `generate`'s (the single-sequence reference)."""
    model, tokenizer = reference
    ps = prompts((3, 17, 9, 30, 1, 12, 45, 2))
    limits = [16, 9, 20, 5, 16, 12, 7, 18]
    alone = [wait(submit(engine, p, max_tokens=m)[1])[0].text[0] for p, m in zip(
        ps, limits, strict=True)]
    together = wait(*(submit(engine, p, max_tokens=m)[1] for p, m in zip(ps, limits,
                                                                          strict=True)))
    assert [out.text[0] for out in together] == alone
    assert alone == [generate(model, tokenizer, p, max_tokens=m) for p, m in zip(
        ps, limits, strict=True)]
    assert engine.metrics.decode_rows > engine.metrics.decode_steps  # batches did form


def test_a_long_prompt_is_prefilled_between_decode_steps(engine):
    """With prefill chunks of 8 tokens, a 200-token prompt takes 25 chunks; the running
    sequence keeps producing tokens meanwhile instead of waiting for the whole prefill."""
    _, running = submit(engine, prompts((5,))[0], max_tokens=120)
    while running.tokens[0] < 3:
        time.sleep(0.005)
    _, long = submit(engine, prompts((200,), seed=1)[0], max_tokens=2)
    wait(long)
    first_token_of_long = long.times[0]
    during = [t for t in running.times if t < first_token_of_long]
    assert len(during) >= 3 + 20  # a token per prefill chunk (give or take)
    wait(running)


def test_cancel_frees_the_row_at_the_next_step(engine):
    job, out = submit(engine, prompts((4,))[0], max_tokens=10_000)
    _, other = submit(engine, prompts((6,))[0], max_tokens=40)
    while out.tokens[0] < 2:
        time.sleep(0.005)
    engine.cancel(job)
    deadline = time.monotonic() + 1.0
    while engine.counts()["active"] > 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.counts()["active"] <= 1
    tokens = out.tokens[0]
    time.sleep(0.1)
    assert out.tokens[0] <= tokens + 1 and out.done is None
    wait(other)
    assert other.finish == ["length"]


def test_n_choices_with_a_seed_are_reproducible_and_distinct(engine):
    p = prompts((7,), seed=5)[0]
    a = wait(submit(engine, p, n=3, temperature=1.0, seed=42)[1])[0]
    b = wait(submit(engine, p, n=3, temperature=1.0, seed=42)[1])[0]
    assert a.text == b.text
    assert len(set(a.text)) > 1  # each choice draws from its own seed
    # Choice i of a request has seed + i: alone with seed 43, choice 0 is the same.
    c = wait(submit(engine, p, temperature=1.0, seed=43)[1])[0]
    assert c.text[0] == a.text[1]
    assert a.done.prompt_tokens == 7 and a.done.completion_tokens == 3 * 16


def test_logprobs_are_normalised_and_rank_the_sampled_token(engine):
    out = wait(submit(engine, prompts((5,), seed=6)[0], max_tokens=4, logprobs=3)[1])[0]
    for lp in out.logprobs[0]:
        ids = [t for t, _ in lp.top]
        values = [v for _, v in lp.top]
        assert len(ids) == 3 and values == sorted(values, reverse=True)
        assert ids[0] == lp.token and values[0] == pytest.approx(lp.logprob)  # greedy
        assert all(v <= 0 for v in values)


def test_prefix_cache_reuses_a_conversation_and_changes_nothing(checkpoint, engine):
    cached = make_engine(checkpoint, prefill_step_size=8, prompt_cache_bytes=1 << 24)
    try:
        first, second = prompts((40, 30), seed=7)
        a = wait(submit(cached, first, max_tokens=10)[1])[0]
        assert a.done.cached_tokens == 0
        # The next turn: the first prompt, the answer (as ids), and more.
        answer = cached.prefix_cache.lookup(first + [0] * 20, limit=60).entry.tokens[40:]
        turn = first + list(answer) + second
        b = wait(submit(cached, turn, max_tokens=10)[1])[0]
        assert b.done.cached_tokens == len(first) + len(answer) == 49
        assert b.text == wait(submit(engine, turn, max_tokens=10)[1])[0].text  # no cache
        # A request sharing only the first 25 tokens reuses those.
        c = wait(submit(cached, first[:25] + second, max_tokens=3)[1])[0]
        assert c.done.cached_tokens == 25
    finally:
        cached.stop()


def test_8bit_kv_batches_like_alone(checkpoint):
    engine = make_engine(checkpoint, kv_bits=8, prefill_step_size=16)
    try:
        ps = prompts((3, 17, 9, 30), seed=8)
        alone = [wait(submit(engine, p)[1])[0].text[0] for p in ps]
        engine.prefix_cache.clear()
        together = wait(*(submit(engine, p)[1] for p in ps))
        assert [out.text[0] for out in together] == alone
    finally:
        engine.stop()


def test_a_failing_step_fails_its_jobs_and_the_engine_goes_on(engine):
    def broken():
        def process(tokens, logits):
            raise RuntimeError("boom")
        return [process]

    out = wait(submit(engine, prompts((5,))[0], make_processors=broken)[1])[0]
    assert isinstance(out.done, JobError) and "boom" in out.done.message
    fine = wait(submit(engine, prompts((5,))[0], max_tokens=3)[1])[0]
    assert fine.finish == ["length"]


def test_queue_limit(checkpoint):
    engine = make_engine(checkpoint, max_batch_size=1, max_queue=1, prompt_cache_bytes=0)
    try:
        running, out = submit(engine, prompts((3,))[0], max_tokens=10_000)
        while out.tokens[0] < 1:
            time.sleep(0.005)
        waiting, _ = submit(engine, prompts((3,))[0], max_tokens=2)
        with pytest.raises(QueueFullError) as e:
            submit(engine, prompts((3,))[0])
        assert e.value.retry_after >= 1
        engine.cancel(running)
        engine.cancel(waiting)
    finally:
        engine.stop()


def test_dual_chunk_attention_models_decode_one_at_a_time_like_generate(checkpoint_factory):
    """DCA is not batched: two requests run one after the other, each exactly as `generate`
    runs it (the length temperature taken from the whole prompt, prefilled in chunks)."""
    path = checkpoint_factory(max_position_embeddings=64)

    def load_dca():
        return load(path, dca=True, chunk_size=32, local_size=4)  # context 128

    model, tokenizer = load_dca()
    engine = Engine(load_dca, EngineSettings(prefill_step_size=8))
    engine.start()
    try:
        assert engine.max_choices == 1
        ps = prompts((100, 90), seed=9)
        outs = wait(*(submit(engine, p, max_tokens=8)[1] for p in ps))
        for p, out in zip(ps, outs, strict=True):
            assert out.text[0] == generate(model, tokenizer, p, max_tokens=8,
                                           prefill_step_size=8)
        assert engine.metrics.decode_rows == engine.metrics.decode_steps  # never batched
    finally:
        engine.stop()
