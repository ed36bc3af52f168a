"""Message and tool checking before rendering: OpenAI shapes accepted, bad input one clear error."""

from __future__ import annotations

import pytest

from qwen2_mlx.chat_templates import recognize_chat_template

from family_tokenizers import read_template

QWEN25 = recognize_chat_template(read_template("qwen2.5-instruct.jinja"))
DEEPSEEK = recognize_chat_template(read_template("deepseek-r1-distill-qwen.jinja"))
QWEN2 = recognize_chat_template(read_template("qwen2-instruct.jinja"))


def _call(arguments):
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": arguments}}]}


def test_json_string_arguments_render_like_the_object_for_qwen():
    # OpenAI clients send arguments as JSON text; Qwen's template renders the object (tojson),
    # so the text is parsed first (as vLLM does), not rendered as a quoted string.
    user = {"role": "user", "content": "Weather in Zürich?"}
    as_text = QWEN25.render([user, _call('{"city":"Zürich"}')], add_generation_prompt=False)
    as_dict = QWEN25.render([user, _call({"city": "Zürich"})], add_generation_prompt=False)
    assert as_text == as_dict
    assert '{"name": "get_weather", "arguments": {"city": "Zürich"}}' in as_dict


def test_deepseek_keeps_json_text_verbatim_and_dumps_dicts():
    user = {"role": "user", "content": "Weather?"}
    text = DEEPSEEK.render([user, _call('{"city":"Zürich"}')], add_generation_prompt=False)
    assert '```json\n{"city":"Zürich"}\n```' in text
    text = DEEPSEEK.render([user, _call({"city": "Zürich"})], add_generation_prompt=False)
    assert '```json\n{"city": "Zürich"}\n```' in text


def test_text_parts_are_joined_with_newlines():
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    assert QWEN25.render([{"role": "user", "content": parts}]) == QWEN25.render(
        [{"role": "user", "content": "first\nsecond"}])


def test_flat_and_untyped_tool_calls_are_accepted():
    user = {"role": "user", "content": "x"}
    flat = {"role": "assistant", "content": "", "tool_calls": [
        {"name": "get_weather", "arguments": {"city": "Oslo"}}]}
    full = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
    assert QWEN25.render([user, flat]) == QWEN25.render([user, full])


@pytest.mark.parametrize("messages,match", [
    ([], "must not be empty"),
    ("hello", "must be a list"),
    ({"role": "user", "content": "hi"}, "must be a list"),
    ([{"role": "user", "content": "ok"}, "oops"], r"messages\[1\] must be a dict"),
    ([{"content": "hi"}], r"messages\[0\] has no 'role'"),
    ([{"role": "user"}], r"messages\[0\] \(role 'user'\) has no content"),
    ([{"role": "user", "content": None}], "has no content"),
    ([{"role": "assistant", "content": None}], "has no content"),
    ([{"role": "user", "content": 3}], r"\['content'\] must be a str"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "text part"),
    ([{"role": "developer", "content": "x"}], "role 'developer'.*does not render"),
    ([{"role": "user", "content": "x", "tool_calls": [{"name": "f"}]}],
     "only assistant messages carry tool_calls"),
    ([_call("{not json")], "not valid JSON"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}],
     "no function name"),
    ([{"role": "assistant", "content": "", "tool_calls": "f"}], "must be a list"),
])
def test_invalid_messages_are_one_clear_error(messages, match):
    with pytest.raises(ValueError, match=match):
        QWEN25.render(messages)


@pytest.mark.parametrize("tools,match", [
    ({"type": "function"}, "must be a list"),
    ([len], "callables are not converted"),
    ([{"type": "function", "function": {"description": "no name"}}], "'function'"),
])
def test_invalid_tools(tools, match):
    with pytest.raises(ValueError, match=match):
        QWEN25.render([{"role": "user", "content": "x"}], tools=tools)


def test_templates_without_tools_refuse_them_instead_of_dropping_them():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    for fmt in (QWEN2, DEEPSEEK):
        with pytest.raises(ValueError, match="does not show tools"):
            fmt.render([{"role": "user", "content": "x"}], tools=tools)
    with pytest.raises(ValueError, match="cannot render assistant tool calls"):
        QWEN2.render([{"role": "user", "content": "x"}, _call({"a": 1})])
    # Qwen2's template renders any role, so a custom role is fine there.
    assert "<|im_start|>developer\nx" in QWEN2.render([{"role": "developer", "content": "x"}])
