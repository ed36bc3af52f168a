"""`qwen2-mlx generate --json / --json-schema FILE / --regex PATTERN`."""

from __future__ import annotations

import json
import re
import sys

import jsonschema
import pytest
from click.testing import CliRunner

from qwen2_mlx import generate, load
from qwen2_mlx.cli.main import cli

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 5},
                   "age": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture
def runner():
    return CliRunner()


def run(runner, checkpoint, *args, **kwargs):
    return runner.invoke(cli, ["generate", "-m", str(checkpoint), "-p", "hi", "--temp", "1.0",
                               "--top-p", "1", "--top-k", "0", "--repetition-penalty", "1.0",
                               "--seed", "4", *args], **kwargs)


def test_json_schema_file_gives_valid_json_equal_to_the_api(runner, tiny_checkpoint, tmp_path):
    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(SCHEMA))
    result = run(runner, tiny_checkpoint, "--json-schema", str(schema_file), "--max-tokens", "60")
    assert result.exit_code == 0, result.output
    jsonschema.validate(json.loads(result.stdout), SCHEMA)
    model, tokenizer = load(tiny_checkpoint)
    expected = generate(model, tokenizer, [{"role": "user", "content": "hi"}], max_tokens=60,
                        temperature=1.0, seed=4,
                        response_format={"type": "json_schema",
                                         "json_schema": {"name": "person", "schema": SCHEMA}})
    assert result.stdout == expected + "\n" and result.stderr == ""
    # OpenAI's {"name", "schema", "strict"} wrapper works the same.
    schema_file.write_text(json.dumps({"name": "person", "schema": SCHEMA, "strict": True}))
    wrapped = run(runner, tiny_checkpoint, "--json-schema", str(schema_file), "--max-tokens", "60")
    assert wrapped.exit_code == 0 and wrapped.stdout == result.stdout


def test_regex_flag_output_fully_matches(runner, tiny_checkpoint):
    pattern = "[a-z]{2,5}-[0-9]{3}"
    result = run(runner, tiny_checkpoint, "--regex", pattern)
    assert result.exit_code == 0, result.output
    assert re.fullmatch(pattern, result.stdout.rstrip("\n"))


def test_json_flag_gives_a_json_object(runner, tiny_checkpoint):
    result = run(runner, tiny_checkpoint, "--json", "--max-tokens", "40")
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.stdout), dict) and result.stderr == ""


def test_warning_when_max_tokens_cuts_the_output(runner, tiny_checkpoint, tmp_path):
    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(SCHEMA))
    result = run(runner, tiny_checkpoint, "--json-schema", str(schema_file), "--max-tokens", "3")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith('{"')
    assert result.stderr.strip() == ("warning: the output is incomplete: --max-tokens ran out "
                                     "before it matched the format")


@pytest.mark.parametrize("args,message", [
    (["--json", "--regex", "a+"], "--json and --regex exclude each other"),
    (["--regex", "(a"], "unclosed group"),
    (["--json-schema", "{schema}"], "uniqueItems"),
    (["--json-schema", "{not_json}"], "is not valid JSON"),
    (["--json-schema", "{missing}"], "cannot read"),
])
def test_bad_format_flags_are_one_line_errors(runner, tiny_checkpoint, tmp_path, args, message):
    (tmp_path / "schema.json").write_text(json.dumps({"type": "array", "uniqueItems": True}))
    (tmp_path / "bad.json").write_text("{not json")
    paths = {"schema": tmp_path / "schema.json", "not_json": tmp_path / "bad.json",
             "missing": tmp_path / "missing.json"}
    result = run(runner, tiny_checkpoint, *[a.format(**paths) for a in args])
    assert result.exit_code in (1, 2)
    assert message in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len([line for line in lines if line.startswith(("Error", "Usage", "Try"))]) <= 3
    assert "Traceback" not in result.output


def test_missing_extra_names_it(runner, tiny_checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    result = run(runner, tiny_checkpoint, "--json")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert 'pip install "qwen2-mlx[structured]"' in result.stderr
