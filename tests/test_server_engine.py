"""The server's engine in-process (no HTTP): continuous batching gives every sequence the
tokens it gets alone, prefill is interleaved with decoding, cancellation frees a row at the
next step, the prefix cache is reused and never changes what is generated, and a failing step
fails its jobs without stopping the engine."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from qwen2_mlx.batch_cache import state_positions
from qwen2_mlx.generate import generate
from qwen2_mlx.loader import load, load_model
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


# --- speculative decoding of a lone sequence (--draft-model) ------------------------------------


def noisy_copy(model, noise: float, seed: int):
    """A draft that often disagrees: `model` with relative Gaussian noise on every weight."""
    import mlx.core as mx
    from mlx.utils import tree_map

    from qwen2_mlx.model import Model

    copy = Model(model.config)
    mx.random.seed(seed)
    copy.update(tree_map(lambda p: p + noise * p.std() * mx.random.normal(p.shape),
                         model.parameters()))
    mx.eval(copy.parameters())
    return copy


@pytest.fixture(scope="module")
def draft_loader(checkpoint):
    def load_draft():
        model, tokenizer = load(checkpoint)
        return noisy_copy(model, 0.05, seed=3), tokenizer
    return load_draft


def make_draft_engine(checkpoint, draft_loader, **settings) -> Engine:
    settings = {"prefill_step_size": 8, "prompt_cache_bytes": 0, "num_draft_tokens": 4,
                **settings}
    engine = Engine(lambda: load(checkpoint), EngineSettings(**settings),
                    load_draft=draft_loader)
    engine.start()
    return engine


@pytest.fixture(scope="module")
def drafting(checkpoint, draft_loader):
    engine = make_draft_engine(checkpoint, draft_loader)
    yield engine
    engine.stop()


def token_ids(out, choice=0) -> list[int]:
    return [lp.token for lp in out.logprobs[choice]]


def test_draft_model_greedy_equals_plain_and_generate(drafting, engine, reference):
    """Alone, a request decodes in speculative rounds with a draft that often disagrees, and
    gets exactly the tokens (and log-probabilities) it gets without the draft, which are
    `generate`'s."""
    model, tokenizer = reference
    ps = prompts((3, 17, 30), seed=11)
    limits = [24, 17, 30]
    before = drafting.metrics.speculative_drafted_tokens
    spec = [wait(submit(drafting, p, max_tokens=m, logprobs=2)[1])[0] for p, m in zip(
        ps, limits, strict=True)]
    plain = [wait(submit(engine, p, max_tokens=m, logprobs=2)[1])[0] for p, m in zip(
        ps, limits, strict=True)]
    for a, b, p, m in zip(spec, plain, ps, limits, strict=True):
        assert token_ids(a) == token_ids(b) and len(token_ids(a)) == m
        assert a.text == b.text == [generate(model, tokenizer, p, max_tokens=m)]
        np.testing.assert_allclose([lp.logprob for lp in a.logprobs[0]],
                                   [lp.logprob for lp in b.logprobs[0]], atol=2e-3)
        assert [[t for t, _ in lp.top] for lp in a.logprobs[0]] == \
            [[t for t, _ in lp.top] for lp in b.logprobs[0]]
        assert a.done.completion_tokens == m
    m = drafting.metrics
    drafted = m.speculative_drafted_tokens - before
    # Both paths ran: drafts accepted (several tokens per round) and rejected.
    assert 0 < m.speculative_accepted_tokens < drafted
    # Alone, only a last token (one left before max_tokens: nothing to draft) is a plain step.
    assert m.decode_steps - m.speculative_rounds <= len(ps)


def test_draft_model_with_penalties_and_logit_bias_equals_plain(checkpoint, drafting, engine):
    """Repetition, presence and frequency penalties and logit_bias are applied to every
    drafted row with that row's own history, so greedy decoding stays exact (with the noisy
    draft, and with a perfect one, whose long rounds use every drafted row)."""
    perfect = make_draft_engine(checkpoint, lambda: load(checkpoint))
    try:
        for p in prompts((12, 4, 20), seed=12):
            # Two strongly biased tokens repeat until the penalties (which count every
            # earlier occurrence, drafted rows' included) outweigh their bias.
            kwargs = dict(max_tokens=30, logprobs=0, presence_penalty=0.5,
                          frequency_penalty=1.0, logit_bias={p[0]: 9.0, p[1]: 6.0})
            out = []
            for eng in (drafting, perfect, engine):
                sampling = SamplingParams(temperature=0.0, repetition_penalty=1.2)
                collector = Collector()
                eng.submit(Job([p], 1, ChoiceSettings(sampling, **kwargs), collector))
                out.append(wait(collector)[0])
            assert token_ids(out[0]) == token_ids(out[1]) == token_ids(out[2])
        assert perfect.metrics.speculative_accepted_tokens > 40
    finally:
        perfect.stop()


def test_max_tokens_and_stop_strings_inside_a_round(drafting, engine):
    """A round never emits past max_tokens, and a stop string ending inside a round ends the
    answer there (the round's remaining tokens are never sent)."""
    p = prompts((9,), seed=13)[0]
    full = wait(submit(engine, p, max_tokens=30, logprobs=0)[1])[0]
    for limit in range(1, 8):
        out = wait(submit(drafting, p, max_tokens=limit, logprobs=0)[1])[0]
        assert token_ids(out) == token_ids(full)[:limit] and out.finish == ["length"]
        assert out.done.completion_tokens == limit
    # Stop strings cut at several places of the answer.
    for start in (5, 9, 14):
        stop = full.text[0][start:start + 3]
        plain = wait(submit(engine, p, max_tokens=30, stops=(stop,), logprobs=0)[1])[0]
        spec = wait(submit(drafting, p, max_tokens=30, stops=(stop,), logprobs=0)[1])[0]
        assert plain.finish == ["stop"] and stop not in plain.text[0]
        assert spec.text == plain.text and spec.finish == plain.finish
        assert token_ids(spec) == token_ids(plain)
        assert spec.done.completion_tokens == plain.done.completion_tokens


def test_a_joining_request_switches_to_batched_decoding_and_both_stay_exact(drafting, engine):
    """A runs alone in speculative rounds; B joins (A's cache enters the batch holding exactly
    prompt + generated[:-1]); once B is done A is alone again and drafts again (its draft
    cache catching up). Both get exactly the tokens they get alone without a draft."""
    a_prompt, b_prompt = prompts((6, 20), seed=14)
    want_a = token_ids(wait(submit(engine, a_prompt, max_tokens=80, logprobs=0)[1])[0])
    want_b = token_ids(wait(submit(engine, b_prompt, max_tokens=10, logprobs=0)[1])[0])
    metrics = drafting.metrics
    rows, steps, rounds = metrics.decode_rows, metrics.decode_steps, metrics.speculative_rounds
    sampling = SamplingParams(temperature=0.0)
    a, b, seen = Collector(), Collector(), {}

    def a_events(event):  # on the engine thread: B arrives once A has 8 tokens
        a(event)
        if len(a.logprobs[0]) >= 8 and "rounds" not in seen:
            seen["rounds"] = metrics.speculative_rounds
            drafting.submit(Job([b_prompt], 1, ChoiceSettings(sampling, max_tokens=10,
                                                              logprobs=0), b_events))

    def b_events(event):
        if not isinstance(event, ChoiceEvent):
            seen["a_tokens"] = len(a.logprobs[0])
            seen["rounds_at_b_done"] = metrics.speculative_rounds
        b(event)

    drafting.submit(Job([a_prompt], 1, ChoiceSettings(sampling, max_tokens=80, logprobs=0),
                        a_events))
    wait(a, b)
    assert token_ids(a) == want_a and token_ids(b) == want_b
    assert metrics.decode_rows - rows > metrics.decode_steps - steps  # a batch did form
    assert seen["rounds"] > rounds  # A drafted before B came
    assert seen["a_tokens"] < 80  # A was still running when B finished ...
    assert metrics.speculative_rounds > seen["rounds_at_b_done"]  # ... and drafted again


def test_prefix_cache_gets_prompt_and_answer_after_a_round_cut_by_a_stop(
        checkpoint, engine, reference):
    """A stop string completed inside a round (a perfect draft: every round yields 5 tokens)
    ends the answer there; the cache is trimmed of the round's unused tokens, so the prefix
    cache stores exactly prompt + answer, and the next turn, reusing it, is unchanged."""
    _, tokenizer = reference
    cached = Engine(lambda: load(checkpoint), EngineSettings(
        prefill_step_size=8, prompt_cache_bytes=1 << 24), load_draft=lambda: load(checkpoint))
    cached.start()
    try:
        p, more = prompts((10, 7), seed=15)
        ids = token_ids(wait(submit(engine, p, max_tokens=30, logprobs=0)[1])[0])
        cuts = []
        for j in range(2, 25):
            if j % 5 == 0:  # rounds give tokens 1-5, 6-10, ...: a cut ends none of them
                continue
            before, upto = tokenizer.decode(ids[:j]), tokenizer.decode(ids[:j + 1])
            stop = upto[len(before):]
            if not stop.strip() or "\ufffd" in stop or upto.find(stop) != len(before):
                continue  # not a clean stop string first completed by token j
            out = wait(submit(cached, p, max_tokens=30, stops=(stop,), logprobs=0)[1])[0]
            assert out.finish == ["stop"] and token_ids(out) == ids[:j + 1]
            assert out.text[0] == before and out.done.completion_tokens == j + 1
            entry = cached.prefix_cache.lookup(p + ids[:j + 1], limit=1000).entry
            assert list(entry.tokens) == p + ids[:j]
            assert state_positions(entry.state) == len(p) + j
            cuts.append(j)
            if len(cuts) == 3:
                break
        assert len(cuts) == 3
        # Drafted tokens after a cut are never sent, so not counted as accepted.
        m = cached.metrics
        assert 0 < m.speculative_accepted_tokens < m.speculative_drafted_tokens
        answer = ids[:cuts[-1] + 1]  # the longest entry (it replaced the shorter ones)
        turn = p + answer + more
        again = wait(submit(cached, turn, max_tokens=12, logprobs=0)[1])[0]
        assert again.done.cached_tokens == len(p) + len(answer) - 1
        assert token_ids(again) == token_ids(wait(submit(engine, turn, max_tokens=12,
                                                           logprobs=0)[1])[0])
    finally:
        cached.stop()


def test_other_processors_decode_plainly_and_a_bad_draft_fails_at_start(
        checkpoint, checkpoint_factory, drafting):
    """A request with a processor the engine cannot apply to drafted rows (here a test's
    stateful one) decodes one token per step; a draft with too few vocabulary rows is
    refused when the engine starts, naming the draft model."""
    calls = []

    def counting():
        def process(tokens, logits):
            calls.append(tokens.size)
            return logits
        return [process]

    rounds = drafting.metrics.speculative_rounds
    out = wait(submit(drafting, prompts((5,))[0], max_tokens=6, make_processors=counting)[1])[0]
    assert out.finish == ["length"] and drafting.metrics.speculative_rounds == rounds
    assert calls == list(range(5, 11))  # once per token, in order

    small = checkpoint_factory(hidden_size=128, num_heads=4, num_kv_heads=2, vocab_size=100,
                               tokenizer=False)
    engine = Engine(lambda: load(checkpoint), EngineSettings(),
                    load_draft=lambda: (load_model(small), load(checkpoint)[1]))
    with pytest.raises(ValueError, match="draft model: the draft model has 100 vocabulary"):
        engine.start()


def test_response_format_masks_drafted_rows_and_survives_batching(drafting, engine, reference):
    """A response format's matcher masks the drafted rows too (GrammarTokenMask over the
    request's own matcher) and is left at the output after each round: greedy tokens equal
    plain decoding's while short requests keep joining, so A goes from speculative rounds to
    batched plain steps (the format's processor taking over the matcher) and back, 5 times."""
    structured = pytest.importorskip("qwen2_mlx.structured")
    pytest.importorskip("llguidance")
    model, tokenizer = reference
    # Which tokens may come next depends on where the output stands.
    matcher = structured.make_grammar_matcher(
        tokenizer, {"type": "regex", "pattern": "(ab |cd |efg |hij )+"},
        model.config.vocab_size)

    def fmt():
        return [structured.StructuredLogitsProcessor(matcher.fork())]

    a_prompt, b_prompt = prompts((5, 3), seed=16)
    sampling = SamplingParams(temperature=0.0)
    no_eos = {509: -100.0, 511: -100.0}  # the tiny tokenizer's EOS ids

    def run(eng, joins: int) -> tuple[Collector, list[Collector]]:
        a, bs = Collector(), []

        def a_events(event):  # on the engine thread: a short B joins every 6 tokens
            a(event)
            if len(bs) < joins and len(a.logprobs[0]) >= 6 * (len(bs) + 1):
                bs.append(Collector())
                eng.submit(Job([b_prompt], 1, ChoiceSettings(sampling, max_tokens=2), bs[-1]))
        eng.submit(Job([a_prompt], 1, ChoiceSettings(sampling, max_tokens=45, logprobs=0,
                                                     logit_bias=no_eos, make_processors=fmt),
                       a_events))
        wait(a, *bs)
        return a, bs

    rounds = drafting.metrics.speculative_rounds
    plain_a, _ = run(engine, joins=0)
    spec_a, bs = run(drafting, joins=5)
    assert token_ids(spec_a) == token_ids(plain_a) and len(token_ids(spec_a)) == 45
    assert spec_a.text[0].startswith(("ab ", "cd ", "efg ", "hij "))
    assert len(bs) == 5 and all(b.finish == ["length"] for b in bs)
    assert drafting.metrics.speculative_rounds > rounds
