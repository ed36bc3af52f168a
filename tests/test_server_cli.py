"""`qwen2-mlx serve` on the command line: help, the missing-extra message, one-line errors and
the warning for a non-loopback address without an API key (in-process, nothing served)."""

from __future__ import annotations

import importlib.util

from click.testing import CliRunner

from qwen2_mlx.cli.main import cli
from qwen2_mlx.server.runner import is_loopback


def run(*args, **env):
    return CliRunner().invoke(cli, ["serve", *args], env=env or None)


def test_help_shows_examples_and_the_defaults_that_keep_it_safe():
    result = run("--help")
    assert result.exit_code == 0
    assert "Examples:" in result.output and "curl http://127.0.0.1:8080" in result.output
    assert "127.0.0.1" in result.output and "QWEN2_MLX_API_KEY" in result.output
    assert "serve" in CliRunner().invoke(cli, ["--help"]).output


def test_without_the_extra_it_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvicorn" else real(name, *a))
    result = run("--model", "whatever")
    assert result.exit_code == 1
    assert 'pip install "qwen2-mlx[server]"' in result.output
    assert "uvicorn" in result.output and "Traceback" not in result.output


def test_bad_sizes_and_unloadable_models_are_one_line_errors(tmp_path):
    result = run("--prompt-cache-bytes", "lots")
    assert result.exit_code == 2 and "is not a size such as" in result.output
    result = run("--model", str(tmp_path), "--port", "0")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: ")


def test_non_loopback_without_a_key_warns():
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: binding fails after the warning.
    result = run("--host", "192.0.2.1", "--port", "0")
    assert "without an API key" in result.output
    assert result.exit_code == 1 and "Traceback" not in result.output
    quiet = run("--host", "192.0.2.1", "--port", "0", QWEN2_MLX_API_KEY="k")
    assert "without an API key" not in quiet.output


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    assert not is_loopback("example.com")
