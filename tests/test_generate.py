"""The generation loop: streaming text, stop conditions, logprobs, limits and errors."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from qwen2_mlx import generate, load, load_cache, save_cache, stream_generate
from qwen2_mlx.generate import generate_step
from qwen2_mlx.sampling import SamplingParams


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load(tiny_checkpoint)


def greedy_reference(model, ids: list[int], n: int) -> list[int]:
    """Greedy tokens by full forward passes, no cache: an independent path."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(np.array(model(mx.array([seq])))[0, -1].argmax()))
    return seq[len(ids):]


def test_stream_text_is_the_decoded_tokens(loaded):
    model, tokenizer = loaded
    responses = list(stream_generate(model, tokenizer, "the quick brown fox", max_tokens=24))
    tokens = [r.token for r in responses]
    ids = tokenizer.encode("the quick brown fox")
    assert tokens == greedy_reference(model, ids, len(tokens))[: len(tokens)]
    text = "".join(r.text for r in responses)
    emitted = [t for t in tokens if t not in tokenizer.eos_token_ids]
    assert text == tokenizer.decode(emitted)
    # Stopped by EOS exactly when the reference emits one within 24 tokens, else by length.
    reference = greedy_reference(model, ids, 24)
    eos_at = next((i for i, t in enumerate(reference) if t in tokenizer.eos_token_ids), None)
    if eos_at is None:
        assert len(tokens) == 24 and responses[-1].finish_reason == "length"
    else:
        assert len(tokens) == eos_at + 1 and responses[-1].finish_reason == "stop"
    assert all(r.finish_reason is None for r in responses[:-1])
    assert responses[-1].generation_tokens == len(tokens)
    assert responses[-1].prompt_tokens == len(ids)


def test_logprobs_are_log_softmax_of_the_logits(loaded):
    model, tokenizer = loaded
    ids = tokenizer.encode("hello")
    first = next(iter(stream_generate(model, tokenizer, ids, max_tokens=1)))
    logits = np.array(model(mx.array([ids])))[0, -1].astype(np.float64)
    logsumexp = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
    assert first.logprob == pytest.approx(logits[first.token] - logsumexp, abs=1e-4)


def test_prompt_forms_agree(loaded):
    model, tokenizer = loaded
    messages = [{"role": "user", "content": "hi there"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    out_messages = generate(model, tokenizer, messages, max_tokens=6)
    assert out_messages == generate(model, tokenizer, ids, max_tokens=6)
    assert out_messages == generate(model, tokenizer, text, max_tokens=6)


def test_max_tokens_finishes_with_length(loaded):
    model, tokenizer = loaded
    ids = tokenizer.encode("abc")
    eos = set(tokenizer.eos_token_ids)
    tokens = greedy_reference(model, ids, 5)
    assert not eos & set(tokens)
    responses = list(stream_generate(model, tokenizer, ids, max_tokens=5))
    assert len(responses) == 5 and responses[-1].finish_reason == "length"


def test_eos_stops_and_is_not_printed(loaded, monkeypatch):
    model, tokenizer = loaded
    ids = tokenizer.encode("abc")
    tokens = greedy_reference(model, ids, 6)
    monkeypatch.setattr(tokenizer, "eos_token_ids", [tokens[3]])
    responses = list(stream_generate(model, tokenizer, ids, max_tokens=20))
    assert [r.token for r in responses] == tokens[: tokens.index(tokens[3]) + 1]
    assert responses[-1].finish_reason == "stop"
    emitted = tokens[: tokens.index(tokens[3])]
    assert "".join(r.text for r in responses) == tokenizer.decode(emitted)


def test_stop_string_truncates_even_across_tokens(loaded):
    model, tokenizer = loaded
    tokens = [r.token for r in stream_generate(model, tokenizer, "once upon", max_tokens=30)]
    pieces = [tokenizer.decode([t]) for t in tokens]
    full = "".join(pieces)
    assert full == generate(model, tokenizer, "once upon", max_tokens=30)
    # A stop string made of the end of one token's text and the start of the next, so it
    # really spans two tokens (and occurs nowhere earlier).
    for i in range(3, len(pieces) - 1):
        start = sum(map(len, pieces[:i + 1])) - 2
        stop = full[start:start + 4]
        if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2 and full.index(stop) == start:
            break
    else:
        pytest.fail("no token boundary to put a stop string across")
    assert not any(stop in piece for piece in pieces)
    out = list(stream_generate(model, tokenizer, "once upon", max_tokens=30, stop=[stop]))
    text = "".join(r.text for r in out)
    assert text == full[:start]
    assert out[-1].finish_reason == "stop"
    assert len(out) == i + 2  # it completes with token i + 1, not before


def test_sampling_is_reproducible_with_seed(loaded):
    model, tokenizer = loaded
    kwargs = dict(max_tokens=12, temperature=1.0, top_p=0.95, seed=123)
    a = [r.token for r in stream_generate(model, tokenizer, "x", **kwargs)]
    b = [r.token for r in stream_generate(model, tokenizer, "x", **kwargs)]
    c = [r.token for r in stream_generate(model, tokenizer, "x", **{**kwargs, "seed": 7})]
    assert a == b and a != c


def test_prompt_longer_than_context(checkpoint_factory):
    model, tokenizer = load(checkpoint_factory(max_position_embeddings=32))
    with pytest.raises(ValueError, match="40 tokens but the model's context is 32"):
        next(stream_generate(model, tokenizer, list(range(40))))
    # A prompt that fits stops at the context end instead of running past it: 30 + 2 = 32.
    responses = list(stream_generate(model, tokenizer, list(range(30)), max_tokens=50))
    assert len(responses) == 2 and responses[-1].finish_reason == "length"
    assert [r.finish_reason for r in responses[:-1]] == [None]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(prefill_step_size=0), "prefill_step_size"),
        (dict(stop=[""]), "stop strings"),
    ],
)
def test_invalid_generation_arguments(loaded, kwargs, message):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match=message):
        list(stream_generate(model, tokenizer, "hi", **kwargs))


def test_bad_prompt_type(loaded):
    model, tokenizer = loaded
    with pytest.raises(TypeError, match="prompt must be"):
        list(stream_generate(model, tokenizer, [1.5, 2.5]))


def test_saved_cache_resumes_generation(loaded, tmp_path):
    """A prompt cache saved to disk and loaded back continues exactly."""
    model, tokenizer = loaded
    ids = tokenizer.encode("a long shared prefix for many questions")
    cache = model.make_cache()
    model(mx.array([ids[:-1]]), cache=cache)
    save_cache(tmp_path / "prefix.safetensors", cache, {"model": "tiny"})
    restored, meta = load_cache(tmp_path / "prefix.safetensors")
    assert meta["model"] == "tiny" and restored[0].offset == len(ids) - 1
    resumed = [r.token for r in stream_generate(model, tokenizer, ids[-1:], max_tokens=8,
                                                cache=restored)]
    fresh = [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=8)]
    assert resumed == fresh


def test_cache_trim_rewinds(loaded):
    model, tokenizer = loaded
    ids = mx.array([tokenizer.encode("rewind this cache please")])
    cache = model.make_cache()
    model(ids, cache=cache)
    for c in cache:
        assert c.trim(2) == 2
    again = np.array(model(ids[:, -2:], cache=cache))
    full = np.array(model(ids))
    np.testing.assert_allclose(again[:, -1], full[:, -1], atol=1e-4)


# --- the cache after generation: prompt + every yielded token, whatever the finish ---------


def assert_cache_holds(model, cache, ids: list[int], kv_bits: int | None = None) -> None:
    """Every layer holds exactly `ids` (offsets, recorded ids, and the keys/values: the next
    token's logits equal those of a fresh cache of the same kind prefilled with `ids`)."""
    assert [c.offset for c in cache] == [len(ids)] * len(cache)
    assert cache.tokens == ids
    probe = 7
    got = np.array(model(mx.array([[probe]]), cache=cache))[0, -1]
    fresh = model.make_cache(kv_bits=kv_bits)
    model(mx.array([ids]), cache=fresh)
    want = np.array(model(mx.array([[probe]]), cache=fresh))[0, -1]
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_cache_holds_prompt_and_tokens_after_max_tokens(checkpoint_factory, kv_bits):
    # head_dim 32: the 8-bit cache quantizes in groups of 32 along it.
    model, tokenizer = load(checkpoint_factory(hidden_size=128, num_heads=4, num_kv_heads=2))
    ids = tokenizer.encode("abc")
    cache = model.make_cache(kv_bits=kv_bits)
    out = list(stream_generate(model, tokenizer, ids, max_tokens=5, cache=cache))
    assert out[-1].finish_reason == "length"
    assert_cache_holds(model, cache, ids + [r.token for r in out], kv_bits)


def test_cache_holds_prompt_and_tokens_after_eos(loaded, monkeypatch):
    model, tokenizer = loaded
    ids = tokenizer.encode("abc")
    tokens = greedy_reference(model, ids, 6)
    monkeypatch.setattr(tokenizer, "eos_token_ids", [tokens[3]])
    cache = model.make_cache()
    out = list(stream_generate(model, tokenizer, ids, max_tokens=20, cache=cache))
    assert out[-1].finish_reason == "stop" and out[-1].token == tokens[3]
    assert_cache_holds(model, cache, ids + tokens[:4])  # the EOS token included


def test_cache_holds_prompt_and_tokens_after_a_stop_string(loaded):
    model, tokenizer = loaded
    full = [r.token for r in stream_generate(model, tokenizer, "once upon", max_tokens=30)]
    stop = tokenizer.decode(full)[5:9]
    cache = model.make_cache()
    out = list(stream_generate(model, tokenizer, "once upon", max_tokens=30, stop=[stop],
                               cache=cache))
    assert out[-1].finish_reason == "stop" and len(out) < 30
    assert_cache_holds(model, cache, tokenizer.encode("once upon") + [r.token for r in out])


@pytest.mark.parametrize("stop_after", [1, 4])
def test_cache_holds_prompt_and_tokens_when_the_consumer_stops(loaded, stop_after):
    model, tokenizer = loaded
    ids = tokenizer.encode("abc")
    for how in ("break", "close"):
        cache = model.make_cache()
        stream = stream_generate(model, tokenizer, ids, max_tokens=10, cache=cache)
        taken = [next(stream).token for _ in range(stop_after)]
        if how == "close":
            stream.close()
        assert_cache_holds(model, cache, ids + taken)  # suspended or closed: the same
        stream.close()


def test_generate_step_close_after_one_token(loaded):
    model, tokenizer = loaded
    ids = tokenizer.encode("abc")
    cache = model.make_cache()
    steps = generate_step(mx.array(ids), model, sampling=SamplingParams(), cache=cache,
                          max_tokens=1)
    token, _ = next(steps)
    steps.close()
    assert_cache_holds(model, cache, ids + [token])


def test_cache_is_settled_after_an_exception_mid_decode(loaded, monkeypatch):
    """A step that fails after the layers were written: the partial step is trimmed."""
    model, tokenizer = loaded
    ids = tokenizer.encode("abc")
    real_forward = model.forward
    calls = []

    def failing_forward(*args, **kwargs):
        calls.append(1)
        out = real_forward(*args, **kwargs)
        if len(calls) == 4:  # the prompt step, then decode steps
            raise RuntimeError("planted failure")
        return out

    monkeypatch.setattr(model, "forward", failing_forward)
    cache = model.make_cache()
    seen = []
    with pytest.raises(RuntimeError, match="planted failure"):
        for r in stream_generate(model, tokenizer, ids, max_tokens=10, cache=cache):
            seen.append(r.token)
    monkeypatch.undo()
    assert seen
    assert_cache_holds(model, cache, ids + seen)


def test_an_exception_in_prefill_leaves_the_cache_as_it_was(loaded, monkeypatch):
    model, tokenizer = loaded
    cache = model.make_cache()
    model(mx.array([[5, 6]]), cache=cache)
    real_forward = model.forward

    def failing_forward(*args, **kwargs):
        real_forward(*args, **kwargs)
        raise RuntimeError("planted failure")

    monkeypatch.setattr(model, "forward", failing_forward)
    with pytest.raises(RuntimeError):
        list(stream_generate(model, tokenizer, tokenizer.encode("a longer prompt"),
                             max_tokens=3, cache=cache, prefill_step_size=2))
    monkeypatch.undo()
    assert_cache_holds(model, cache, [5, 6])


def test_repetition_penalty_continues_across_a_cache(loaded):
    """A prompt split between a prefilled cache and the call sees the same penalty as the
    whole prompt in one call (the cache carries its token ids)."""
    model, tokenizer = loaded
    ids = tokenizer.encode("the quick brown fox jumps over the lazy dog again and again")
    kwargs = dict(max_tokens=12, repetition_penalty=3.0, repetition_context_size=64)
    whole = [r.token for r in stream_generate(model, tokenizer, ids, **kwargs)]
    cache = model.make_cache()
    model(mx.array([ids[:-3]]), cache=cache)
    assert cache.tokens == ids[:-3]
    split = [r.token for r in stream_generate(model, tokenizer, ids[-3:], cache=cache,
                                              **kwargs)]
    assert split == whole
    # The control: the penalty must matter here, or the comparison proves nothing.
    blind = [r.token for r in stream_generate(model, tokenizer, ids[-3:], **kwargs)]
    assert blind[: len(whole)] != whole


def test_plain_list_cache_warns_that_the_penalty_sees_only_new_tokens(loaded):
    model, tokenizer = loaded
    ids = tokenizer.encode("the quick brown fox")
    layers = list(model.make_cache())
    model(mx.array([ids[:-2]]), cache=layers)
    with pytest.warns(RuntimeWarning, match="repetition penalty sees only the tokens"):
        list(stream_generate(model, tokenizer, ids[-2:], cache=layers, max_tokens=2,
                             repetition_penalty=1.5))
    assert layers[0].offset == len(ids) + 2  # the same layer caches were continued
