"""The streaming split of generated text into answer, reasoning and tool calls."""

from __future__ import annotations

import random

import pytest

from qwen2_mlx.output_parser import OutputParser, ParsedDelta
from qwen2_mlx.tools import TOOL_CALL_FORMATS

QWEN = TOOL_CALL_FORMATS["qwen"]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

# (text, parser options, expected answer, expected reasoning, expected call names, malformed)
CASES = [
    ("Plain answer.", {}, "Plain answer.", "", [], False),
    ("<think>\nHmm.\n</think>\n\nAnswer.", {}, "\n\nAnswer.", "\nHmm.\n", [], False),
    ("  <think>x</think>y", {}, "y", "x", [], False),
    ("Still thinking.\n</think>\n\n42", {"in_reasoning": True}, "\n\n42", "Still thinking.\n",
     [], False),
    ("Never closed", {"in_reasoning": True}, "", "Never closed", [], False),
    ("Answer <think>literal</think> tags", {}, "Answer <think>literal</think> tags", "", [],
     False),
    ("<think>a</think>b<think>c</think>", {}, "b<think>c</think>", "a", [], False),
    (CALL, {"tool_format": QWEN}, "", "", ["get_weather"], False),
    (f"Checking.\n{CALL}\n{CALL}\n", {"tool_format": QWEN}, "Checking.\n", "",
     ["get_weather", "get_weather"], False),
    (f"{CALL}\nDone.", {"tool_format": QWEN}, "\nDone.", "", ["get_weather"], False),
    (f"<think>plan</think>\n\n{CALL}", {"tool_format": QWEN}, "\n\n", "plan", ["get_weather"],
     False),
    ("<tool_call>\n{broken}\n</tool_call>", {"tool_format": QWEN},
     "<tool_call>\n{broken}\n</tool_call>", "", [], True),
    (CALL, {}, CALL, "", [], False),  # without tools, markup is text
    ("<thin", {}, "<thin", "", [], False),  # a partial marker at the very end is text
    ("Ends with <tool_ca", {"tool_format": QWEN}, "Ends with <tool_ca", "", [], False),
    ("Thinking </thi", {"in_reasoning": True}, "", "Thinking </thi", [], False),
]


def _run(text, options, chunks):
    parser = OutputParser(**options)
    delta = ParsedDelta()
    for piece in chunks:
        delta = delta + parser.feed(piece)
    delta = delta + parser.finish()
    return parser, delta


@pytest.mark.parametrize("text,options,answer,reasoning,names,malformed", CASES)
def test_split_whole(text, options, answer, reasoning, names, malformed):
    parser, delta = _run(text, options, [text])
    assert (delta.text, delta.reasoning) == (answer, reasoning)
    assert (parser.text, parser.reasoning) == (answer, reasoning)
    assert [c.name for c in parser.tool_calls] == names and parser.malformed == malformed


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("text,options,answer,reasoning,names,malformed", CASES)
def test_any_chunking_splits_alike(seed, text, options, answer, reasoning, names, malformed):
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    if seed == 0:
        chunks = list(text)  # one character at a time
    parser, delta = _run(text, options, chunks)
    assert (delta.text, delta.reasoning) == (answer, reasoning)
    assert [c.name for c in parser.tool_calls] == names and parser.malformed == malformed


def test_markup_is_held_back_until_it_cannot_be_markup():
    parser = OutputParser(QWEN, in_reasoning=True)
    assert parser.feed("Let me think </th") == ParsedDelta("", "Let me think ")
    assert parser.feed("ink>\n\nSure <tool") == ParsedDelta("\n\nSure ", "")
    assert parser.feed("box>") == ParsedDelta("<toolbox>", "")  # not a call after all
    assert parser.feed(CALL[:20]) == ParsedDelta()
    assert parser.feed(CALL[20:] + "\n") == ParsedDelta()  # whitespace after a call is held
    assert parser.feed("ok") == ParsedDelta("\nok", "")
    assert [c.arguments for c in parser.tool_calls] == [{"city": "Paris"}]


def test_start_waits_only_while_the_output_could_open_think():
    parser = OutputParser()
    assert parser.feed("\n<th") == ParsedDelta()
    assert parser.feed("e") == ParsedDelta("\n<the", "")
