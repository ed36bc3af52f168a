"""Structured output: JSON, JSON Schema and regexes enforced while decoding.

Random-weight models at temperature 1.0 want garbage; every output must still parse and validate
(checked with the `jsonschema` package and Python's `re`, independently of the grammar engine).
"""

from __future__ import annotations

import json
import re
import sys

import jsonschema
import mlx.core as mx
import numpy as np
import pytest

from qwen2_mlx import generate, load, stream_generate
from qwen2_mlx.structured import (
    StructuredLogitsProcessor,
    make_grammar_matcher,
    parse_response_format,
)

SAMPLES = 30


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema,
                                                   "strict": True}}


class BiasedModel:
    """A model with fixed offsets added to its logits: steers a random model toward some
    tokens (EOS, or JSON's closing characters) without touching the sampling path."""

    def __init__(self, model, bias: dict[int, float]) -> None:
        self.model = model
        self.config = model.config
        offsets = np.zeros(model.config.vocab_size, dtype=np.float32)
        for token, value in bias.items():
            offsets[token] = value
        self.offsets = mx.array(offsets)

    def make_cache(self, **kwargs):
        return self.model.make_cache(**kwargs)

    def __call__(self, inputs, cache=None):
        return self.model(inputs, cache=cache) + self.offsets


@pytest.fixture(scope="module")
def loaded(checkpoint_factory):
    # One layer, width 32: sampling 30 outputs per format stays quick.
    return load(checkpoint_factory(num_layers=1, hidden_size=32))


def sample_outputs(model, tokenizer, response_format, n=SAMPLES, max_tokens=160, **kwargs):
    """`n` sampled outputs (text, last response) at temperature 1.0 with seeds 0..n-1."""
    outputs = []
    for seed in range(n):
        responses = list(stream_generate(model, tokenizer, "Answer in JSON:", max_tokens=max_tokens,
                                         temperature=1.0, seed=seed,
                                         response_format=response_format, **kwargs))
        outputs.append(("".join(r.text for r in responses), responses[-1]))
    return outputs


# name -> (schema, fewest distinct outputs among SAMPLES). The floors sit near half of what
# the tiny model gives; a mask that collapsed sampling to one path would give 1.
SCHEMAS = {
    "nested_required_optional": ({
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 999},
            "owner": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 6},
                    "nick": {"type": "string", "maxLength": 4},
                    "addr": {
                        "type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 5},
                                       "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["zip"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "addr"],
                "additionalProperties": False,
            },
            "note": {"type": "string", "maxLength": 5},
        },
        "required": ["id", "owner"],
        "additionalProperties": False,
    }, 15),
    "enums": ({
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"enum": [1, 2, "XL", None, True]},
            "unit": {"const": "cm"},
        },
        "required": ["color", "size", "unit"],
        "additionalProperties": False,
    }, 3),
    "arrays_min_max_items": ({
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                     "minItems": 2, "maxItems": 4},
            "grid": {"type": "array", "minItems": 1, "maxItems": 2,
                     "items": {"type": "array", "items": {"type": "boolean"},
                               "minItems": 0, "maxItems": 3}},
        },
        "required": ["tags", "grid"],
        "additionalProperties": False,
    }, 12),
    "bounded_integers": ({
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 65},
            "delta": {"type": "integer", "minimum": -50, "maximum": -7},
            "code": {"type": "integer", "exclusiveMinimum": 100, "exclusiveMaximum": 1000},
        },
        "required": ["age", "delta", "code"],
        "additionalProperties": False,
    }, 15),
    "string_patterns": ({
        "type": "object",
        "properties": {
            "date": {"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]$"},
            "sku": {"type": "string", "pattern": "^[A-Z]{2,3}-[0-9]{3}$"},
            "word": {"type": "string", "minLength": 2, "maxLength": 4},
        },
        "required": ["date", "sku", "word"],
        "additionalProperties": False,
    }, 15),
    "any_of": ({
        "type": "object",
        "properties": {
            "value": {"anyOf": [
                {"type": "integer", "minimum": 0, "maximum": 9},
                {"type": "string", "pattern": "^[xyz]{1,3}$"},
                {"type": "object", "properties": {"ok": {"type": "boolean"}},
                 "required": ["ok"], "additionalProperties": False},
                {"type": "null"},
            ]},
        },
        "required": ["value"],
        "additionalProperties": False,
    }, 4),
    "top_level_array_of_objects": ({
        "type": "array",
        "minItems": 1,
        "maxItems": 3,
        "items": {"type": "object",
                  "properties": {"k": {"enum": ["p", "q"]}, "n": {"type": "integer",
                                                              "minimum": 0, "maximum": 3}},
                  "required": ["k"], "additionalProperties": False},
    }, 11),
}


@pytest.fixture(scope="module")
def schema_samples(loaded):
    """SAMPLES outputs per schema, drawn once for the tests that inspect them."""
    model, tokenizer = loaded
    drawn = {}

    def samples(name):
        if name not in drawn:
            drawn[name] = sample_outputs(model, tokenizer, schema_format(SCHEMAS[name][0]))
        return drawn[name]

    return samples


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_sample_validates_and_samples_differ(schema_samples, name):
    schema, fewest_distinct = SCHEMAS[name]
    outputs = schema_samples(name)
    for text, last in outputs:
        assert last.finish_reason == "stop" and not last.incomplete, text
        jsonschema.validate(json.loads(text), schema)
    # The mask must leave the sampling distribution alive, not collapse it to one path.
    assert len({text for text, _ in outputs}) >= fewest_distinct, [t for t, _ in outputs]


def test_optional_keys_are_sometimes_written_and_sometimes_not(schema_samples):
    outputs = [json.loads(text) for text, _ in schema_samples("nested_required_optional")]
    has_note = [("note" in o) for o in outputs]
    has_city = [("city" in o["owner"]["addr"]) for o in outputs]
    assert any(has_note) and not all(has_note)
    assert any(has_city) and not all(has_city)


def closing_bias(tokenizer, value: float) -> dict[int, float]:
    """Offsets for the tokens that close JSON strings, objects and arrays."""
    return {t: value for t in range(tokenizer.vocab_size)
            if set(tokenizer.token_bytes(t)) & set(b'"}]')}


def test_json_object_mode_gives_json_objects(loaded):
    model, tokenizer = loaded
    # Free JSON from a random model runs for hundreds of tokens (strings close with p ~ 1/500
    # per token); pushing the closing characters keeps samples short, and since they are
    # invalid in most places, it is also the harder test for the mask.
    biased = BiasedModel(model, closing_bias(tokenizer, 4.0))
    outputs = sample_outputs(biased, tokenizer, {"type": "json_object"}, max_tokens=300)
    for text, last in outputs:
        assert last.finish_reason == "stop" and not last.incomplete, text
        assert isinstance(json.loads(text), dict), text
    assert len({text for text, _ in outputs}) >= 8
    assert any(len(json.loads(text)) > 0 for text, _ in outputs)


@pytest.mark.parametrize("pattern", [
    r"[a-z]{3}-[0-9]{2,4}",
    r"(yes|no|maybe)( because [a-z ]{1,12})?",
    r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}",
    r"[A-Z][a-z]{1,8}( [A-Z][a-z]{1,8}){0,2}\.",
])
def test_regex_outputs_fully_match(loaded, pattern):
    model, tokenizer = loaded
    outputs = sample_outputs(model, tokenizer, {"type": "regex", "pattern": pattern})
    for text, last in outputs:
        assert last.finish_reason == "stop" and not last.incomplete
        assert re.fullmatch(pattern, text), text
    assert len({text for text, _ in outputs}) >= SAMPLES // 2


def greedy_regex_reference(model, tokenizer, ids, pattern, max_tokens):
    """Greedy constrained decoding without the grammar engine, the decode loop or a cache:
    full forward passes, and each step takes the highest-scoring token whose text keeps the
    output a prefix of some match (the `regex` package's partial matching); EOS only when the
    output fully matches."""
    import regex

    eos = set(tokenizer.eos_token_ids)
    seq, text, out = list(ids), "", []
    for _ in range(max_tokens):
        logits = np.array(model(mx.array([seq])))[0, -1]
        for token in np.argsort(-logits, kind="stable").tolist():
            if token in eos:
                if regex.fullmatch(pattern, text):
                    return out + [token]
                continue
            if token >= tokenizer.vocab_size or token in tokenizer.all_special_ids:
                continue
            try:
                piece = tokenizer.token_bytes(token).decode("utf-8")
            except UnicodeDecodeError:
                continue  # the patterns below are ASCII: no partial character can start one
            if piece and regex.fullmatch(pattern, text + piece, partial=True):
                seq.append(token)
                out.append(token)
                text += piece
                break
    return out


@pytest.mark.parametrize("pattern", [r"[a-z][a-z ]{2,15}", r"[0-9a-f]{2,8}(,[0-9a-f]{1,8}){0,3}"])
def test_greedy_constrained_tokens_match_an_independent_reference(loaded, pattern):
    model, tokenizer = loaded
    for prompt in ("the quick brown fox", "hello there", "1, 2, 3"):
        ids = tokenizer.encode(prompt)
        got = [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=20,
                                                response_format={"type": "regex",
                                                                 "pattern": pattern})]
        assert got == greedy_regex_reference(model, tokenizer, ids, pattern, 20)


@pytest.mark.parametrize("fmt,check", [
    ({"type": "regex", "pattern": "[a-z]{3,9}"}, lambda t: re.fullmatch("[a-z]{3,9}", t)),
    (schema_format(SCHEMAS["enums"][0]), lambda t: jsonschema.validate(json.loads(t),
                                                                     SCHEMAS["enums"][0]) or True),
])
def test_eos_is_forbidden_until_the_output_is_complete(loaded, fmt, check):
    model, tokenizer = loaded
    # A model that wants EOS above everything: EOS may only come once the output is complete,
    # and then it comes at once.
    eager = BiasedModel(model, {t: 30.0 for t in tokenizer.eos_token_ids})
    for seed in range(10):
        responses = list(stream_generate(eager, tokenizer, "x", max_tokens=80, temperature=1.0,
                                         seed=seed, response_format=fmt))
        text = "".join(r.text for r in responses)
        assert responses[-1].token in tokenizer.eos_token_ids and check(text)
        matcher = make_grammar_matcher(tokenizer, fmt, model.config.vocab_size)
        for r in responses[:-1]:
            assert not matcher.is_complete  # else EOS (+30) would have been taken here
            assert not any(matcher.allows(e) for e in tokenizer.eos_token_ids)
            matcher.advance(r.token)
        assert matcher.is_complete


def test_max_tokens_before_completion_is_length_and_incomplete(loaded):
    model, tokenizer = loaded
    fmt = schema_format(SCHEMAS["nested_required_optional"][0])
    responses = list(stream_generate(model, tokenizer, "x", max_tokens=5, temperature=1.0,
                                     seed=1, response_format=fmt))
    assert len(responses) == 5
    assert responses[-1].finish_reason == "length" and responses[-1].incomplete
    assert not any(r.incomplete for r in responses[:-1])
    with pytest.raises(json.JSONDecodeError):
        json.loads("".join(r.text for r in responses))
    # Cut by max_tokens but already a complete match: not incomplete.
    no_eos = BiasedModel(model, {t: -30.0 for t in tokenizer.eos_token_ids})
    responses = list(stream_generate(no_eos, tokenizer, "x", max_tokens=4, temperature=1.0,
                                     response_format={"type": "regex", "pattern": "[a-z]+"}))
    assert responses[-1].finish_reason == "length" and not responses[-1].incomplete
    # Without a format nothing is ever flagged.
    responses = list(stream_generate(model, tokenizer, "x", max_tokens=3))
    assert not any(r.incomplete for r in responses)


def test_stop_strings_cut_a_constrained_output(loaded):
    model, tokenizer = loaded
    fmt = {"type": "regex", "pattern": "[a-z]{2,4}-[0-9]{2}"}
    full = generate(model, tokenizer, "x", max_tokens=20, response_format=fmt)
    assert re.fullmatch(fmt["pattern"], full)
    responses = list(stream_generate(model, tokenizer, "x", max_tokens=20, response_format=fmt,
                                     stop=["-"]))
    assert "".join(r.text for r in responses) == full.split("-")[0]
    assert responses[-1].finish_reason == "stop" and responses[-1].incomplete
    # A stop string that cuts the text just after a complete match leaves a complete output
    # (judged on the returned text: the tokens consumed went past the cut).
    no_eos = BiasedModel(model, {t: -30.0 for t in tokenizer.eos_token_ids})
    fmt = {"type": "regex", "pattern": "[a-z]{2,4}(-[0-9]{2})?"}
    full = generate(no_eos, tokenizer, "x", max_tokens=20, response_format=fmt)
    assert re.fullmatch("[a-z]{2,4}-[0-9]{2}", full)
    responses = list(stream_generate(no_eos, tokenizer, "x", max_tokens=20, response_format=fmt,
                                     stop=["-"]))
    assert "".join(r.text for r in responses) == full.split("-")[0]
    assert responses[-1].finish_reason == "stop" and not responses[-1].incomplete


@pytest.mark.parametrize("kwargs", [dict(repetition_penalty=1.5), dict(kv_bits=8),
                                    dict(top_k=5, top_p=0.9, repetition_penalty=1.2)])
def test_formats_hold_with_penalties_filters_and_a_quantized_cache(checkpoint_factory, kwargs):
    # head_dim 32: the 8-bit KV cache quantizes in groups of 32.
    model, tokenizer = load(checkpoint_factory(hidden_size=128, num_heads=4, num_kv_heads=2))
    schema = SCHEMAS["any_of"][0]
    for text, last in sample_outputs(model, tokenizer, schema_format(schema), n=10, **kwargs):
        assert last.finish_reason == "stop"
        jsonschema.validate(json.loads(text), schema)


def test_pipelined_processor_matches_the_serial_one(loaded):
    """Queueing the forward before reading the previous token changes timing, never tokens."""
    model, tokenizer = loaded
    fmt = schema_format(SCHEMAS["string_patterns"][0])
    from qwen2_mlx.generate import generate_step
    from qwen2_mlx.sampling import SamplingParams

    runs = {}
    for overlap in (True, False):
        processor = StructuredLogitsProcessor(
            make_grammar_matcher(tokenizer, fmt, model.config.vocab_size), overlap=overlap)
        steps = generate_step(mx.array(tokenizer.encode("hi"), dtype=mx.uint32), model,
                              sampling=SamplingParams(temperature=1.0, seed=3), max_tokens=60,
                              logits_processors=[processor])
        tokens = []
        for token, _ in steps:
            tokens.append(token)
            if token in tokenizer.eos_token_ids:
                break
        runs[overlap] = tokens
        assert processor.timings.steps == len(tokens) + (0 if len(tokens) == 60 else 1)
    assert runs[True] == runs[False]
    assert runs[True][-1] in tokenizer.eos_token_ids


def test_processor_queues_the_token_read_then_the_forward_before_computing_the_mask(
        loaded, monkeypatch):
    """The overlap of mask and forward pass rests on this order: the read of token t is queued
    first (a stream runs in order, so queued after the forward pass it would wait for it), then
    the forward pass of step t+1, and only then does the CPU compute the mask.
    examples/bench_structured.py measures what the overlap saves."""
    model, tokenizer = loaded
    events = []
    real_async_eval = mx.async_eval

    def recording_async_eval(*arrays):
        # generate_step also queues the cache's state (a list) after its last token.
        events.append(("queue", [getattr(a, "dtype", type(a)) for a in arrays]))
        return real_async_eval(*arrays)

    matcher = make_grammar_matcher(tokenizer, {"type": "regex", "pattern": "[a-z]{8}"},
                                   model.config.vocab_size)
    real_mask_words = matcher.mask_words

    def recording_mask_words():
        events.append(("mask", None))
        return real_mask_words()

    monkeypatch.setattr(mx, "async_eval", recording_async_eval)
    monkeypatch.setattr(matcher, "mask_words", recording_mask_words)
    processor = StructuredLogitsProcessor(matcher)
    from qwen2_mlx.generate import generate_step
    from qwen2_mlx.sampling import SamplingParams

    tokens = [t for t, _ in generate_step(mx.array(tokenizer.encode("hi"), dtype=mx.uint32),
                                          model, sampling=SamplingParams(), max_tokens=6,
                                          logits_processors=[processor])]
    # generate_step queues (token, logprobs) together; only the processor queues an int32
    # slice of the history (the new token) or the logits alone.
    reads = [i for i, event in enumerate(events) if event == ("queue", [mx.int32])]
    assert len(tokens) == 6 and len(reads) == 5  # the first step has no token to wait for
    for i in reads:
        assert events[i + 1] == ("queue", [mx.float32])  # then the forward pass
        assert events[i + 2] == ("mask", None)  # and only then the mask


# --- the token-level API (what speculative decoding builds on) ---------------------------------


def test_matcher_advance_rollback_fork_and_draft_masks(loaded):
    model, tokenizer = loaded
    fmt = {"type": "regex", "pattern": "[a-c]{2,4}"}
    matcher = make_grammar_matcher(tokenizer, fmt, model.config.vocab_size)
    a, b, z = (tokenizer.encode(c)[0] for c in "abz")
    start = matcher.allowed().copy()
    assert start[a] and not start[z] and not any(start[e] for e in tokenizer.eos_token_ids)
    assert not start[tokenizer.vocab_size:].any()  # padding rows past the tokenizer: never
    with pytest.raises(ValueError, match="not allowed"):
        matcher.advance(z)
    matcher.advance(a)
    twin = matcher.fork()
    matcher.advance(b)
    assert matcher.is_complete and not twin.is_complete and twin.num_tokens == 1
    eos = tokenizer.eos_token_ids[0]
    matcher.advance(eos)
    assert matcher.is_finished and matcher.allowed().sum() == len(tokenizer.eos_token_ids)
    matcher.rollback(2)
    np.testing.assert_array_equal(matcher.allowed(), twin.allowed())
    matcher.rollback(1)
    np.testing.assert_array_equal(matcher.allowed(), start)

    masks, n_allowed = matcher.draft_masks([a, b, z, a])
    assert n_allowed == 2 and masks.shape == (3, model.config.vocab_size)
    assert matcher.num_tokens == 0  # state unchanged
    np.testing.assert_array_equal(masks[0], start)
    np.testing.assert_array_equal(masks[1], twin.allowed())
    assert masks[2][eos] and not masks[2][z]


def speculative_greedy(model, tokenizer, ids, fmt, max_tokens, drafter):
    """Greedy speculative decoding as the grammar API supports it: drafted tokens are checked
    against the grammar (a forbidden one ends the draft), the target's masked rows verify the
    rest, and the matcher advances only by what was accepted. Full forward passes, no cache."""
    matcher = make_grammar_matcher(tokenizer, fmt, model.config.vocab_size)
    eos = set(tokenizer.eos_token_ids)
    seq, out = list(ids), []
    while len(out) < max_tokens:
        draft = drafter(len(out))
        masks, n_ok = matcher.draft_masks(draft)
        rows = np.array(model(mx.array([seq + draft[:n_ok]])))[0, -(n_ok + 1):]
        for i in range(n_ok + 1):
            best = int(np.where(masks[i], rows[i], -np.inf).argmax())
            matcher.advance(best)
            seq.append(best)
            out.append(best)
            if best in eos or len(out) == max_tokens:
                return out
            if i == n_ok or best != draft[i]:
                break
    return out


def test_greedy_constrained_output_is_the_same_with_speculative_verification(loaded):
    model, tokenizer = loaded
    fmt = schema_format(SCHEMAS["nested_required_optional"][0])
    ids = tokenizer.encode("speculate")
    plain = [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=150,
                                              response_format=fmt)]
    assert plain[-1] in tokenizer.eos_token_ids
    rng = np.random.default_rng(0)

    def drafter(position):
        # The true continuation with random corruption: some drafts are accepted whole, some
        # end at a wrong-but-allowed token, some at a token the grammar forbids.
        draft = list(plain[position:position + 4])
        for i in range(len(draft)):
            if rng.random() < 0.25:
                draft[i] = int(rng.integers(model.config.vocab_size))
        return draft

    assert speculative_greedy(model, tokenizer, ids, fmt, 150, drafter) == plain


@pytest.fixture(scope="module")
def draft(checkpoint_factory):
    """A different random model over the same vocabulary: it drafts tokens the target often
    rejects, and tokens the format forbids."""
    model, _ = load(checkpoint_factory(num_layers=1, hidden_size=16))
    return model


@pytest.mark.parametrize("drafter", ["draft-model", "prompt-lookup"])
def test_speculative_decoding_keeps_the_constrained_greedy_output(loaded, draft, drafter):
    """stream_generate with a response_format and a drafter: drafts go through the format's
    mask (GrammarTokenMask) and the greedy output is token for token the plain one."""
    model, tokenizer = loaded
    fmt = schema_format(SCHEMAS["nested_required_optional"][0])
    # A prompt whose n-grams recur in the output, so prompt lookup drafts (and some drafts
    # are forbidden by the format at the point they are proposed).
    prompt = tokenizer.encode('{"id": 7, "name": "speculate", "tags": ["a", "b"]}')
    plain = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=150,
                                              response_format=fmt)]
    assert plain[-1] in tokenizer.eos_token_ids
    kwargs = {"draft_model": draft} if drafter == "draft-model" else {"prompt_lookup": 3}
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=150,
                                     response_format=fmt, num_draft_tokens=4, **kwargs))
    assert [r.token for r in responses] == plain
    stats = responses[-1].speculative
    assert stats.drafted > 0 and stats.target_passes < len(plain)
    assert not responses[-1].incomplete


def test_speculative_sampled_outputs_validate(loaded, draft):
    """Sampled with a draft model, every output still matches the schema."""
    model, tokenizer = loaded
    schema = SCHEMAS["nested_required_optional"][0]
    for text, last in sample_outputs(model, tokenizer, schema_format(schema), n=8,
                                     draft_model=draft):
        assert last.finish_reason == "stop" and not last.incomplete
        jsonschema.validate(json.loads(text), schema)


# --- errors ------------------------------------------------------------------------------------


def test_missing_extra_is_a_one_line_error_naming_it(loaded, monkeypatch):
    model, tokenizer = loaded
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(ImportError) as info:
        list(stream_generate(model, tokenizer, "x", response_format={"type": "json_object"}))
    message = str(info.value)
    assert "\n" not in message and 'pip install "qwen2-mlx[structured]"' in message
    # Free text needs no extra.
    assert list(stream_generate(model, tokenizer, "x", max_tokens=2,
                                response_format={"type": "text"}))


def test_unsupported_schema_keywords_are_all_listed(loaded):
    model, tokenizer = loaded
    schema = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
            "not": {"type": "string"},  # a property named like a keyword is fine
            "deep": {"type": "object", "properties": {"x": {"not": {"type": "null"}}}},
        },
        "if": {"required": ["tags"]},
        "then": {"required": ["deep"]},
        "x-guidance": {"lenient": True},  # cannot switch enforcement off
    }
    with pytest.raises(ValueError) as info:
        make_grammar_matcher(tokenizer, schema_format(schema), model.config.vocab_size)
    message = str(info.value)
    assert "\n" not in message and "cannot be enforced" in message
    for keyword in ("uniqueItems", "not", "if", "then"):
        assert keyword in message


@pytest.mark.parametrize("fmt,message", [
    ("json", "must be a dict"),
    ({"type": "xml"}, "must be one of text, json_object, json_schema, regex"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "objekt"}}}, "objekt"),
    ({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/nope"}}}, "nope"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "string",
                                                        "format": "color"}}}, "color"),
    ({"type": "regex"}, "pattern"),
    ({"type": "regex", "pattern": "(ab"}, "unclosed group"),
    ({"type": "regex", "pattern": "a(?=b)"}, "look-around"),
])
def test_bad_formats_are_one_line_errors(loaded, fmt, message):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        list(stream_generate(model, tokenizer, "x", response_format=fmt))
    assert "\n" not in str(info.value)


def test_parse_response_format_shapes():
    assert parse_response_format(None) is None
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}) == ("json_schema", {"type": "object"})
    schema = {"type": "integer"}
    assert parse_response_format(schema_format(schema)) == ("json_schema", schema)
    assert parse_response_format({"type": "regex", "pattern": "a+"}) == ("regex", "a+")


# --- the real Qwen2 vocabulary -----------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen2_vocab_model(checkpoint_factory, qwen2_tokenizer_dir):
    """A tiny random model with Qwen2's real tokenizer and its 151,936-row embedding."""
    import shutil

    path = checkpoint_factory(vocab_size=151936, hidden_size=32, tokenizer=False,
                              extra_config={"eos_token_id": 151645})
    for f in qwen2_tokenizer_dir.iterdir():
        shutil.copyfile(f, path / f.name)
    return load(path)


def test_real_qwen2_vocabulary_byte_level_tokens(qwen2_vocab_model):
    model, tokenizer = qwen2_vocab_model
    assert tokenizer.vocab_size == 151646 and model.config.vocab_size == 151936
    schema = {
        "type": "object",
        "properties": {
            "word": {"enum": ["数学", "🚀 launch", "naïve", "plain"]},
            "name": {"type": "string", "maxLength": 3},
            "mood": {"type": "string", "pattern": "^[😀-😆]{1,2}$"},
            "n": {"type": "integer", "minimum": -5, "maximum": 5},
        },
        "required": ["word", "name", "mood", "n"],
        "additionalProperties": False,
    }
    fmt = schema_format(schema)
    matcher = make_grammar_matcher(tokenizer, fmt, model.config.vocab_size)
    assert not matcher.allowed()[151646:].any()  # embedding padding rows: never
    outputs = sample_outputs(model, tokenizer, fmt, n=8, max_tokens=60)
    for text, last in outputs:
        assert last.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), schema)
    assert len({text for text, _ in outputs}) >= 6
    # Some tokens hold part of a UTF-8 character; free strings may use them (the bytes are
    # matched, not the characters).
    partial = [t for t in range(256) if tokenizer.token_bytes(t)[0] >= 0x80]
    string_matcher = make_grammar_matcher(tokenizer, schema_format({"type": "string"}),
                                          model.config.vocab_size)
    string_matcher.advance(tokenizer.encode('"')[0])
    leads = [t for t in partial if 0xC2 <= tokenizer.token_bytes(t)[0] <= 0xF4]  # UTF-8 lead bytes
    assert len(leads) == 51 and all(string_matcher.allows(t) for t in leads)
