"""`--json`, `--json-schema FILE` and `--regex PATTERN`: the CLI face of `response_format`."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click


def response_format_from_flags(json_mode: bool, json_schema: str | None,
                               regex: str | None) -> dict | None:
    """The `response_format` the flags ask for (None: free text). One flag at most."""
    given = [flag for flag, value in (("--json", json_mode), ("--json-schema", json_schema),
                                      ("--regex", regex)) if value]
    if len(given) > 1:
        raise click.UsageError(f"{' and '.join(given)} exclude each other: give one")
    if json_mode:
        return {"type": "json_object"}
    if regex is not None:
        return {"type": "regex", "pattern": regex}
    if json_schema is None:
        return None
    path = Path(json_schema)
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise click.BadParameter(f"cannot read {path}: {e.strerror}",
                                 param_hint="--json-schema") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"{path} is not valid JSON: {e}",
                                 param_hint="--json-schema") from e
    if not isinstance(schema, dict):
        raise click.BadParameter(f"{path} must hold a JSON object (a JSON Schema)",
                                 param_hint="--json-schema")
    # OpenAI's {"name": ..., "schema": {...}, "strict": true} wrapper is accepted as well.
    if isinstance(schema.get("schema"), dict) and "name" in schema:
        schema = schema["schema"]
    return {"type": "json_schema", "json_schema": {"name": path.stem, "schema": schema}}


def response_format_options(command):
    """Add the three flags to a click command; it receives them as `response_format`."""

    @click.option("--json", "json_mode", is_flag=True,
                  help="Answer with a JSON object. --json, --json-schema and --regex need "
                       "pip install \"qwen2-mlx[structured]\".")
    @click.option("--json-schema", "json_schema", default=None, metavar="FILE",
                  help="Answer with JSON that validates against the JSON Schema in FILE.")
    @click.option("--regex", default=None, metavar="PATTERN",
                  help="Answer with text that fully matches this regular expression "
                       "(Rust regex syntax).")
    @functools.wraps(command)
    def with_response_format(*args, json_mode, json_schema, regex, **kwargs):
        return command(*args, response_format=response_format_from_flags(
            json_mode, json_schema, regex), **kwargs)

    return with_response_format


def incomplete_warning(finish_reason: str | None) -> str:
    """The stderr line for an output that stopped before it matched the format."""
    cause = "--max-tokens ran out" if finish_reason == "length" else "a stop string came"
    return f"warning: the output is incomplete: {cause} before it matched the format"
