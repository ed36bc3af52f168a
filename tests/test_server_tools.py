"""Tool calls and reasoning through the server and the real `openai` client: a tiny model with
Qwen2.5's chat template whose output a test-only logits processor scripts (scripted_server.py),
so the template, the streaming parser and OpenAI's tool-call shapes are exercised end to end."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from family_tokenizers import read_template
from scripted_server import ANSWER, CALL
from server_process import ServerProcess

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    model = Path(shutil.copytree(tiny_checkpoint, tmp_path_factory.mktemp("qwen25") / "m"))
    config_file = model / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = read_template("qwen2.5-instruct.jinja")  # it renders tools
    config_file.write_text(json.dumps(config))
    script = Path(__file__).parent / "scripted_server.py"
    with ServerProcess(["--model", str(model)], command=[sys.executable, str(script)]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_tool_call_round_trip(client):
    first = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS,
                                           max_tokens=100)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == CALL["name"]
    assert json.loads(call.function.arguments) == CALL["arguments"]
    # The next turn carries the call and its result; the model answers from it.
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"}]
    second = client.chat.completions.create(model="scripted", messages=history, tools=TOOLS,
                                            max_tokens=100)
    assert second.choices[0].message.content == ANSWER
    assert second.choices[0].finish_reason == "stop"
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_tool_call_streams_as_openai_deltas(client):
    chunks = list(client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS,
                                                 max_tokens=100, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0
    assert calls[0].function.name == CALL["name"]
    assert json.loads(calls[0].function.arguments) == CALL["arguments"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("tool_choice", [
    {"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_forced_tool_choice(client, tool_choice):
    """A named function (or "required") is forced by opening the call in the prompt; the
    model writes the rest."""
    response = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS,
                                              tool_choice=tool_choice, max_tokens=100)
    (call,) = response.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == CALL["arguments"]
    free = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS,
                                          max_tokens=1)
    assert response.usage.prompt_tokens > free.usage.prompt_tokens  # the opening is prompt


def test_tool_choice_none_parses_no_call(client):
    response = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS,
                                              tool_choice="none", max_tokens=100)
    message = response.choices[0].message
    assert not message.tool_calls and "<tool_call>" in message.content
    assert response.choices[0].finish_reason == "stop"


def test_tool_choice_errors(client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="scripted", messages=ASK, tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="scripted", messages=ASK, tools=[{"x": 1}])
    assert e.value.body["param"] == "tools"


def test_reasoning_content_is_separate(client):
    messages = [{"role": "user", "content": "reason"}]
    response = client.chat.completions.create(model="scripted", messages=messages,
                                              max_tokens=100)
    message = response.choices[0].message
    assert message.content == "The answer is 4."
    assert message.model_extra["reasoning_content"] == "Two and two make four."
    chunks = list(client.chat.completions.create(model="scripted", messages=messages,
                                                 max_tokens=100, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == \
        "Two and two make four."
    assert "".join(d.content or "" for d in deltas) == "The answer is 4."
