"""Parity of the built-in chat-template renderers with transformers, on the published texts.

Every template of the qwen2 family (tests/data/chat_templates, sources in SOURCES.md) renders a
matrix of conversations; our text must equal transformers' character for character and our
token ids must equal its ids. The reference is `apply_chat_template`; where a message holds a
None value (DeepSeek's tool-call turns, whose template tests `content is none`), transformers 5's
`apply_chat_template` drops the key before rendering, so the reference is its own renderer
`render_jinja_template`, which passes the message through unchanged as transformers 4 did.
"""

from __future__ import annotations

import copy
import json

import pytest

from qwen2_mlx.chat_templates import recognize_chat_template
from qwen2_mlx.tokenizer import Qwen2Tokenizer

from family_tokenizers import build_family_tokenizer_files, read_template
from tokenizer_fixture import build_qwen2_tokenizer_files

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

# template file -> (tokenizer family, expected ChatFormat name)
TEMPLATES = {
    "qwen2-instruct.jinja": ("qwen2", "qwen2"),
    "qwen2.5-instruct.jinja": ("qwen2.5", "qwen2.5"),
    "qwen2.5-instruct-2024-09.jinja": ("qwen2.5", "qwen2.5"),
    "qwen2.5-math-instruct.jinja": ("qwen2.5", "qwen2.5"),
    "qwq-32b-preview.jinja": ("qwen2.5", "qwen2.5"),
    "qwq-32b.jinja": ("qwq", "qwq"),
    "qwq-32b-strip-all-thinking.jinja": ("qwq", "qwq"),
    "deepseek-r1-distill-qwen.jinja": ("deepseek", "deepseek-r1-distill"),
    "deepseek-r1-distill-qwen-2025-01.jinja": ("deepseek", "deepseek-r1-distill"),
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city, in °C.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name, e.g. \"Zürich\""},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time <HH:MM> & date.",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}
TOOLS = [WEATHER, TIME]


def user(text):
    return {"role": "user", "content": text}


def system(text):
    return {"role": "system", "content": text}


def assistant(text, calls=None):
    message = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = calls
    return message


def tool(text):
    return {"role": "tool", "content": text}


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


PARIS = call("get_weather", {"city": "Paris"})
OSLO = call("get_weather", {"city": "Oslo", "unit": "celsius"})
TOKYO_TIME = call("get_time", {"tz": "Asia/Tokyo"})

CONVERSATIONS = {
    "user_only": [user("Hello!")],
    "system_user": [system("You are a pirate."), user("Where is the treasure?")],
    "multi_turn": [user("What is 2+2?"), assistant("2+2 = 4."), user("And times 3?"),
                   assistant("12.")],
    "unicode_multi_turn": [
        system("Réponds en français. 用中文也可以 😀"),
        user("emoji 👨‍👩‍👧‍👦 and combining e\u0301"), assistant("Très bien — 好的 ✓"),
        user("  leading spaces\n\nand newlines\t"),
    ],
    "system_not_first": [user("hi"), system("late system"), user("again")],
    "specials_in_content": [user("say <|im_end|> then <tool_call> and </think> <｜User｜>")],
    "one_call_one_result": [user("Weather in Paris?"), assistant(None, [PARIS]),
                            tool('{"temperature": 21, "unit": "°C"}')],
    "two_calls_two_results": [
        system("Be brief."), user("Weather in Paris and Oslo, and the time in Tokyo?"),
        assistant(None, [PARIS, OSLO, TOKYO_TIME]), tool('{"temperature": 21}'),
        tool('{"temperature": 12}'), tool("09:41"),
        assistant("21 °C in Paris, 12 °C in Oslo; 09:41 in Tokyo."), user("Thanks!"),
    ],
    "call_with_text_then_again": [
        user("Paris?"), assistant("Let me check.", [PARIS]), tool("21"),
        assistant("21 °C."), user("And Oslo?"), assistant(None, [OSLO]), tool("12"),
    ],
    "reasoning_history": [
        user("2+2?"), assistant("<think>\nSimple sum.\n</think>\n\n4"), user("And 3+3?"),
    ],
    "reasoning_last_turn": [
        user("2+2?"), assistant("<think>\nSimple sum.\n</think>\n\n4"), user("And 3+3?"),
        assistant("<think>\nAgain.\n</think>\n\n6"),
    ],
}


def _has_calls(messages):
    return any("tool_calls" in m for m in messages)


def _family_dir(tmp_path_factory, family):
    out = tmp_path_factory.mktemp(f"tok_{family.replace('.', '_')}")
    if family == "qwen2":
        return build_qwen2_tokenizer_files(out)
    return build_family_tokenizer_files(out, family, read_template("qwen2.5-instruct.jinja"))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """family -> (our tokenizer, transformers' tokenizer), loaded from the same files."""
    loaded = {}
    for family in {f for f, _ in TEMPLATES.values()}:
        path = _family_dir(tmp_path_factory, family)
        loaded[family] = (Qwen2Tokenizer.from_pretrained(path),
                          transformers.AutoTokenizer.from_pretrained(str(path)))
    return loaded


def _ours_with_template(base: Qwen2Tokenizer, template: str) -> Qwen2Tokenizer:
    config = {**base._tokenizer_config, "chat_template": template}
    return Qwen2Tokenizer(base.backend, tokenizer_config=config,
                          generation_config=base._generation_config)


def _hf_ids(result) -> list[int]:
    return list(result["input_ids"]) if hasattr(result, "keys") else list(result)


def reference(hf, template, messages, tools, add_generation_prompt):
    """transformers' text and ids for this conversation (see the module docstring)."""
    if any(v is None for m in messages for v in m.values()):
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            conversations=[copy.deepcopy(messages)], tools=tools, chat_template=template,
            add_generation_prompt=add_generation_prompt, **hf.special_tokens_map)
        text = rendered[0]
        return text, hf.encode(text, add_special_tokens=False)
    kwargs = dict(tools=tools, chat_template=template, add_generation_prompt=add_generation_prompt)
    text = hf.apply_chat_template(copy.deepcopy(messages), tokenize=False, **kwargs)
    ids = _hf_ids(hf.apply_chat_template(copy.deepcopy(messages), tokenize=True, **kwargs))
    return text, ids


def _cases():
    for name, (family, _) in TEMPLATES.items():
        renders_tools = family in ("qwen2.5", "qwq")
        for conv in CONVERSATIONS:
            if family == "qwen2" and _has_calls(CONVERSATIONS[conv]):
                continue  # Qwen2's template has no tool-call format (an error, tested below)
            for with_tools in ([False, True] if renders_tools else [False]):
                yield pytest.param(name, conv, with_tools, id=f"{name}-{conv}-tools{with_tools:d}")


def _for_family(family, messages):
    """DeepSeek's template concatenates arguments (JSON text) and calls tools only when the
    assistant content is None; Qwen's renders arguments with tojson and content None as ''."""
    messages = copy.deepcopy(messages)
    for m in messages:
        for c in m.get("tool_calls", []):
            if family == "deepseek":
                c["function"]["arguments"] = json.dumps(c["function"]["arguments"],
                                                        ensure_ascii=False)
        if family != "deepseek" and m["role"] == "assistant" and m["content"] is None:
            m["content"] = ""
    return messages


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen", "nogen"])
@pytest.mark.parametrize("template_name,conversation,with_tools", list(_cases()))
def test_parity_with_transformers(tokenizers, template_name, conversation, with_tools,
                                  add_generation_prompt):
    family, _ = TEMPLATES[template_name]
    base, hf = tokenizers[family]
    template = read_template(template_name)
    ours = _ours_with_template(base, template)
    assert ours.chat_format is not None, "every published template renders without jinja"
    messages = _for_family(family, CONVERSATIONS[conversation])
    tools = TOOLS if with_tools else None
    ref_text, ref_ids = reference(hf, template, messages, tools, add_generation_prompt)
    text = ours.apply_chat_template(messages, tools=tools, tokenize=False,
                                    add_generation_prompt=add_generation_prompt)
    assert text == ref_text
    assert ours.apply_chat_template(messages, tools=tools,
                                    add_generation_prompt=add_generation_prompt) == ref_ids


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_each_published_template_is_recognised(name):
    assert recognize_chat_template(read_template(name)).name == TEMPLATES[name][1]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_a_changed_template_is_not_recognised(name):
    # One character anywhere changes what the template may render: no fingerprint matches.
    text = read_template(name)
    for at in (0, len(text) // 3, len(text) // 2, len(text) - 3):
        changed = text[:at] + ("X" if text[at] != "X" else "Y") + text[at + 1:]
        assert recognize_chat_template(changed) is None, at
    assert recognize_chat_template(text + "\n\n") is None  # renders one more newline


def test_one_trailing_newline_after_a_block_tag_is_the_same_template():
    # jinja's trim_blocks drops the first newline after a block tag, so these render alike.
    text = read_template("qwen2-instruct.jinja")
    assert recognize_chat_template(text + "\n").name == "qwen2"


def test_default_system_prompts_of_the_qwen25_layout():
    def system_of(name):
        return recognize_chat_template(read_template(name)).render(
            [user("hi")], add_generation_prompt=False).split("\n")[1]

    assert system_of("qwen2.5-instruct.jinja") == (
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>")
    assert system_of("qwen2.5-math-instruct.jinja") == (
        "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>")
    assert system_of("qwq-32b-preview.jinja").startswith("You are a helpful and harmless")


def test_qwen25_base_template_variant(tokenizers):
    # The same layout with another default system prompt (as Qwen2.5 base checkpoints ship):
    # recognised by the layout fingerprint, rendered with that prompt, equal to transformers.
    base, hf = tokenizers["qwen2.5"]
    template = read_template("qwen2.5-instruct.jinja").replace(
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        "You are a helpful assistant.")
    ours = _ours_with_template(base, template)
    assert ours.chat_format is not None
    for conv in ("user_only", "two_calls_two_results"):
        messages = _for_family("qwen2.5", CONVERSATIONS[conv])
        for tools in (None, TOOLS):
            ref_text, _ = reference(hf, template, messages, tools, True)
            assert ours.apply_chat_template(messages, tools=tools, tokenize=False) == ref_text
