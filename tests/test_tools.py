"""qwen2_mlx.tools: reading the tool calls a model writes."""

from __future__ import annotations

import json
import re

import pytest

from qwen2_mlx.chat_templates import recognize_chat_template
from qwen2_mlx.output_parser import parse_tool_calls
from qwen2_mlx.tools import ToolCall

from family_tokenizers import read_template


def _assistant_turn(template_name, calls, content=None):
    """The assistant turn as the model's own template renders it (what the model learnt to
    write), cut out of the rendered conversation."""
    fmt = recognize_chat_template(read_template(template_name))
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": content, "tool_calls": [
                    {"type": "function", "function": {"name": n, "arguments": a}}
                    for n, a in calls]}]
    if fmt.name != "deepseek-r1-distill":
        messages[1]["content"] = content or ""
        return fmt.render(messages, add_generation_prompt=False).split(
            "<|im_start|>assistant\n")[-1].removesuffix("<|im_end|>\n")
    messages[1]["tool_calls"] = [{"type": "function", "function": {
        "name": n, "arguments": json.dumps(a)}} for n, a in calls]
    return fmt.render(messages, add_generation_prompt=False).split("<｜Assistant｜>")[-1]


CALLS = [("get_weather", {"city": "Zürich", "days": [1, 2]}), ("get_time", {})]


def test_qwen_calls_as_the_template_writes_them_parse_back():
    parsed = parse_tool_calls(_assistant_turn("qwen2.5-instruct.jinja", CALLS))
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == CALLS
    assert parsed.text == "" and not parsed.malformed


def test_text_before_calls_is_kept():
    turn = _assistant_turn("qwen2.5-instruct.jinja", CALLS[:1], content="Let me check.")
    assert turn.startswith("Let me check.\n<tool_call>")
    parsed = parse_tool_calls(turn)
    assert parsed.text == "Let me check.\n" and len(parsed.tool_calls) == 1


def test_deepseek_calls_as_the_template_writes_them_parse_back():
    turn = _assistant_turn("deepseek-r1-distill-qwen.jinja", CALLS)
    # The template closes the list (and the turn) only after non-first calls.
    turn = turn.removesuffix("<｜end▁of▁sentence｜>")
    parsed = parse_tool_calls(turn, format="deepseek")
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == CALLS
    assert parsed.text == "" and not parsed.malformed


def test_ids_and_openai_shape():
    calls = parse_tool_calls(_assistant_turn("qwen2.5-instruct.jinja", CALLS)).tool_calls
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls)
    assert len({c.id for c in calls}) == 2
    assert calls[0].to_openai() == {"id": calls[0].id, "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Zürich", "days": [1, 2]}'}}


@pytest.mark.parametrize("inner", [
    '{"name": "f", "arguments": {"x": 1}',          # unbalanced JSON
    '{"arguments": {"x": 1}}',                       # no name
    '{"name": "f", "arguments": [1, 2]}',            # arguments not an object
    '{"name": "", "arguments": {}}',
    'f(x=1)',
])
def test_malformed_call_is_text_with_a_flag(inner):
    text = f"Before.\n<tool_call>\n{inner}\n</tool_call>\nAfter."
    parsed = parse_tool_calls(text)
    assert parsed.malformed and parsed.tool_calls == [] and parsed.text == text


def test_arguments_written_as_json_text_are_accepted():
    text = '<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n</tool_call>'
    parsed = parse_tool_calls(text)
    assert parsed.tool_calls[0].arguments == {"x": 1}


def test_unclosed_last_call_is_parsed_when_complete():
    parsed = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {}}\n')
    assert [c.name for c in parsed.tool_calls] == ["f"] and not parsed.malformed
    cut = parse_tool_calls('<tool_call>\n{"name": "f", "argu')
    assert cut.tool_calls == [] and cut.malformed and cut.text == '<tool_call>\n{"name": "f", "argu'


def test_no_markup_is_plain_text():
    parsed = parse_tool_calls("Just an answer with <b>tags</b> and {json}.")
    assert parsed.text == "Just an answer with <b>tags</b> and {json}." and not parsed.tool_calls


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown tool-call format"):
        parse_tool_calls("x", format="hermes")


def test_tool_call_is_a_value():
    assert ToolCall("f", {"a": 1}, id="call_1") == ToolCall("f", {"a": 1}, id="call_1")
