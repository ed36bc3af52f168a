"""The `qwen2-mlx` command line."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from qwen2_mlx import generate, load
from qwen2_mlx.cli.main import cli


@pytest.fixture
def runner():
    return CliRunner()


def test_help_lists_commands_with_examples(runner):
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0 and "generate" in result.output and "Examples" in result.output
    for command in cli.commands:
        sub = runner.invoke(cli, [command, "--help"])
        assert sub.exit_code == 0 and "Examples" in sub.output, command


def test_generate_streams_the_api_output(runner, tiny_checkpoint):
    result = runner.invoke(cli, ["generate", "--model", str(tiny_checkpoint), "--prompt", "hi",
                                 "--max-tokens", "8", "--temp", "0", "--repetition-penalty",
                                 "1.0", "--verbose"])
    assert result.exit_code == 0, result.output
    model, tokenizer = load(tiny_checkpoint)
    expected = generate(model, tokenizer, [{"role": "user", "content": "hi"}], max_tokens=8)
    assert result.stdout == expected + "\n"
    assert "Generation: " in result.stderr and "Peak memory:" in result.stderr


def test_prompt_from_stdin_and_no_chat(runner, tiny_checkpoint):
    args = ["generate", "-m", str(tiny_checkpoint), "--no-chat", "--max-tokens", "6",
            "--temp", "0", "--repetition-penalty", "1.0"]
    from_stdin = runner.invoke(cli, args + ["--prompt", "-"], input="once upon")
    direct = runner.invoke(cli, args + ["--prompt", "once upon"])
    assert from_stdin.exit_code == 0 and from_stdin.stdout == direct.stdout


def test_missing_model_is_one_clear_line(runner, tmp_path):
    result = runner.invoke(cli, ["generate", "--model", str(tmp_path / "nope"), "-p", "hi"])
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr


def test_default_model_offline_says_how_to_use_a_local_directory(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = runner.invoke(cli, ["generate", "--prompt", "hi"])
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line and "Qwen/Qwen2-0.5B-Instruct" in line and "--model" in line


def test_invalid_sampling_flag_is_a_clear_error(runner, tiny_checkpoint):
    result = runner.invoke(cli, ["generate", "-m", str(tiny_checkpoint), "--top-p", "2"])
    assert result.exit_code == 1 and "top_p" in result.stderr


def _scripted_cli(monkeypatch, base, tokenizer, output, tools=None):
    """Make `generate` load a model scripted to answer the default chat prompt with `output`."""
    from qwen2_mlx import loader

    from scripted_model import scripted

    def load(*args, **kwargs):  # a fresh script per run
        model, _ = scripted(base, tokenizer, [{"role": "user", "content": "hi"}], output,
                            tools=tools)
        return model, tokenizer

    monkeypatch.setattr(loader, "load", load)


THOUGHT = "<think>\nThe user says hi.\n</think>\n\nHello!"


def test_reasoning_between_think_markers_when_piped(runner, monkeypatch, tiny_vocab_model,
                                                     qwen25_tokenizer):
    _scripted_cli(monkeypatch, tiny_vocab_model, qwen25_tokenizer, THOUGHT)
    result = runner.invoke(cli, ["generate", "-p", "hi", "--max-tokens", "40"])
    assert result.exit_code == 0, result.output
    assert result.stdout == THOUGHT + "\n"


def test_reasoning_dimmed_on_a_terminal(runner, monkeypatch, tiny_vocab_model, qwen25_tokenizer):
    from qwen2_mlx.cli import generate_command

    _scripted_cli(monkeypatch, tiny_vocab_model, qwen25_tokenizer, THOUGHT)
    monkeypatch.setattr(generate_command, "stdout_is_terminal", lambda: True)
    result = runner.invoke(cli, ["generate", "-p", "hi", "--max-tokens", "40"], color=True)
    assert result.stdout == "\x1b[2m\nThe user says hi.\n\x1b[0m\n\nHello!\n"


def test_hide_reasoning(runner, monkeypatch, tiny_vocab_model, qwq_tokenizer):
    # QwQ's prompt opens <think>, so the output starts inside the reasoning.
    _scripted_cli(monkeypatch, tiny_vocab_model, qwq_tokenizer, "Hmm.\n</think>\n\nHello!")
    result = runner.invoke(cli, ["generate", "-p", "hi", "--hide-reasoning",
                                 "--max-tokens", "40"])
    assert result.stdout == "\n\nHello!\n"
    shown = runner.invoke(cli, ["generate", "-p", "hi", "--max-tokens", "40"])
    assert shown.stdout == "<think>Hmm.\n</think>\n\nHello!\n"


def test_tools_file_and_calls_as_json_lines(runner, monkeypatch, tmp_path, tiny_vocab_model,
                                            qwen25_tokenizer):
    import json

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    (tmp_path / "tools.json").write_text(json.dumps(tools))
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    _scripted_cli(monkeypatch, tiny_vocab_model, qwen25_tokenizer, call, tools=tools)
    result = runner.invoke(cli, ["generate", "-p", "hi", "--tools", str(tmp_path / "tools.json"),
                                 "--max-tokens", "40"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == ""
    printed = json.loads(lines[1])
    assert printed["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert printed["type"] == "function" and printed["id"].startswith("call_")


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    ('{"tools": 3}', "must hold a list"),
    ("[1]", "tools\\[0\\] must be a JSON schema dict"),
])
def test_bad_tools_file_is_one_clear_line(runner, tmp_path, tiny_checkpoint, content, match):
    (tmp_path / "tools.json").write_text(content)
    result = runner.invoke(cli, ["generate", "-m", str(tiny_checkpoint), "-p", "hi",
                                 "--tools", str(tmp_path / "tools.json")])
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0
    import re
    assert re.search(match, result.stderr)


@pytest.mark.parametrize("source", ["stdin", "argv"])
def test_prompt_that_is_not_utf8_is_replaced_with_a_warning(runner, tiny_checkpoint, source):
    args = ["generate", "-m", str(tiny_checkpoint), "--no-chat", "--max-tokens", "3",
            "--temp", "0", "--repetition-penalty", "1.0"]
    if source == "stdin":
        result = runner.invoke(cli, args + ["--prompt", "-"], input=b"caf\xe9 au lait")
    else:  # what Python makes of an argv byte that is not UTF-8: a lone surrogate
        result = runner.invoke(cli, args + ["--prompt", b"caf\xe9 au lait".decode(
            "utf-8", "surrogateescape")])
    assert result.exit_code == 0, result.output
    where = "stdin" if source == "stdin" else "--prompt"
    assert (f"Warning: the prompt from {where} is not valid UTF-8 (byte 3); invalid bytes "
            "were replaced with U+FFFD") in result.stderr
    replaced = runner.invoke(cli, args + ["--prompt", "caf\ufffd au lait"])
    assert result.stdout == replaced.stdout


def test_text_with_lone_surrogates_is_a_value_error_in_the_api(tiny_checkpoint):
    model, tokenizer = load(tiny_checkpoint)
    with pytest.raises(ValueError, match="not valid Unicode"):
        generate(model, tokenizer, "caf\udce9", max_tokens=2)


def test_context_errors_and_cuts_are_said(runner, checkpoint_factory):
    small = checkpoint_factory(max_position_embeddings=32)
    args = ["generate", "-m", str(small), "--no-chat", "--temp", "0", "--repetition-penalty",
            "1.0"]
    long_prompt = " ".join(["word"] * 40)
    result = runner.invoke(cli, args + ["--prompt", long_prompt])
    assert result.exit_code == 1
    assert "but the model's context is 32 tokens; shorten the prompt or extend the context " \
           "with --dca or --yarn-factor 4" in result.stderr
    assert "dca=True" not in result.stderr
    model, tokenizer = load(small)
    fits = tokenizer.decode(tokenizer.encode(long_prompt)[:29])
    result = runner.invoke(cli, args + ["--prompt", fits, "--max-tokens", "20", "--verbose"])
    assert result.exit_code == 0, result.output
    assert ("Generation stopped at the end of the model's context (32 tokens), before "
            "--max-tokens 20") in result.stderr
    quiet = runner.invoke(cli, args + ["--prompt", fits, "--max-tokens", "2", "--verbose"])
    assert "Generation stopped" not in quiet.stderr
