"""Tool calls and reasoning through generate/stream_generate, with the real tokenizers.

A tiny random model is wrapped so that a logits processor pins its output to a script (the
test double of a model that calls a tool or thinks); the tokenizer is the real Qwen2.5 (or QwQ)
tokenizer with its published chat template, so prompts, markup tokens and detokenization are
the real ones.
"""

from __future__ import annotations

import pytest

from qwen2_mlx import generate, stream_generate

from scripted_model import scripted

GET_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture
def base(tiny_vocab_model):
    return tiny_vocab_model


@pytest.fixture
def tok(qwen25_tokenizer):
    return qwen25_tokenizer


@pytest.fixture
def qwq(qwq_tokenizer):
    return qwq_tokenizer


CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_forced_tool_call_is_parsed_and_finishes_with_tool_calls(base, tok):
    model, prompt = scripted(base, tok, ASK, CALL_TEXT, tools=[GET_WEATHER])
    responses = list(stream_generate(model, tok, ASK, tools=[GET_WEATHER], max_tokens=64))
    last = responses[-1]
    assert last.prompt_tokens == len(prompt)  # the tools were rendered into the prompt
    assert last.finish_reason == "tool_calls"
    assert [(c.name, c.arguments) for c in last.tool_calls] == [("get_weather",
                                                                  {"city": "Paris"})]
    assert "".join(r.text for r in responses) == "" == last.full_text  # markup held back
    assert all(not r.tool_calls for r in responses[:-1])
    assert not last.malformed_tool_call


def test_generate_returns_the_calls(base, tok):
    model, _ = scripted(base, tok, ASK, "Checking.\n" + CALL_TEXT, tools=[GET_WEATHER])
    result = generate(model, tok, ASK, tools=[GET_WEATHER], max_tokens=64)
    assert result == "Checking.\n" and result.finish_reason == "tool_calls"
    assert result.tool_calls[0].name == "get_weather"
    assert result.tool_calls[0].to_openai()["function"]["arguments"] == '{"city": "Paris"}'


def test_without_tools_the_markup_is_text(base, tok):
    model, _ = scripted(base, tok, ASK, CALL_TEXT)
    result = generate(model, tok, ASK, max_tokens=64)
    assert result == CALL_TEXT and result.finish_reason == "stop" and result.tool_calls == []


def test_malformed_call_is_text_with_the_flag(base, tok):
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>'
    model, _ = scripted(base, tok, ASK, bad, tools=[GET_WEATHER])
    last = list(stream_generate(model, tok, ASK, tools=[GET_WEATHER], max_tokens=64))[-1]
    assert last.finish_reason == "stop" and last.tool_calls == []
    assert last.full_text == bad and last.malformed_tool_call


def test_call_cut_by_max_tokens_is_not_lost(base, tok):
    model, _ = scripted(base, tok, ASK, CALL_TEXT, tools=[GET_WEATHER])
    responses = list(stream_generate(model, tok, ASK, tools=[GET_WEATHER], max_tokens=6))
    last = responses[-1]
    assert last.finish_reason == "length" and last.tool_calls == []
    assert "".join(r.text for r in responses) == last.full_text == tok.decode(
        [r.token for r in responses])


def test_forced_think_block_is_split_into_reasoning_and_text(base, tok):
    output = "<think>\nThe user greets me.\n</think>\n\nHello! 你好"
    model, _ = scripted(base, tok, ASK, output)
    responses = list(stream_generate(model, tok, ASK, max_tokens=64))
    reasoning = "".join(r.reasoning for r in responses)
    text = "".join(r.text for r in responses)
    assert reasoning == "\nThe user greets me.\n" == responses[-1].reasoning_text
    assert text == "\n\nHello! 你好" == responses[-1].full_text
    assert all("<" not in r.text and "<" not in r.reasoning for r in responses)
    assert responses[-1].finish_reason == "stop"
    # Reasoning streams before the answer does.
    first_text = next(i for i, r in enumerate(responses) if r.text)
    assert all(not r.reasoning for r in responses[first_text:])


def test_qwq_prompt_opens_think_so_output_starts_as_reasoning(base, qwq):
    prompt_text = qwq.apply_chat_template(ASK, tokenize=False)
    assert prompt_text.endswith("<|im_start|>assistant\n<think>\n")
    model, _ = scripted(base, qwq, ASK, "Paris is in France.\n</think>\n\nSunny.")
    result = generate(model, qwq, ASK, max_tokens=64)
    assert result == "\n\nSunny." and result.reasoning == "Paris is in France.\n"


def test_reasoning_then_tool_call(base, qwq):
    output = "I need the weather.\n</think>\n\n" + CALL_TEXT
    model, _ = scripted(base, qwq, ASK, output, tools=[GET_WEATHER])
    result = generate(model, qwq, ASK, tools=[GET_WEATHER], max_tokens=64)
    assert result.finish_reason == "tool_calls" and result.reasoning == "I need the weather.\n"
    assert result == "\n\n" and result.tool_calls[0].arguments == {"city": "Paris"}


def test_the_call_goes_back_into_the_conversation(base, tok):
    # The next turn renders the parsed call and its result with the model's own template.
    model, _ = scripted(base, tok, ASK, CALL_TEXT, tools=[GET_WEATHER])
    result = generate(model, tok, ASK, tools=[GET_WEATHER], max_tokens=64)
    call = result.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": result,
                      "tool_calls": [call.to_openai()]},
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    text = tok.apply_chat_template(history, tools=[GET_WEATHER], tokenize=False)
    assert text.endswith("<|im_start|>assistant\n" + CALL_TEXT + "<|im_end|>\n<|im_start|>user\n"
                         "<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>\n"
                         "<|im_start|>assistant\n")


def test_bad_tools_are_a_clear_error_for_any_prompt(base, tok):
    ids = tok.encode("hi")
    with pytest.raises(ValueError, match="tools must be a list"):
        generate(base, tok, ids, tools={"name": "f"}, max_tokens=2)
