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
