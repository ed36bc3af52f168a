"""Speculative-decoding options that `generate` and `chat` share, and loading the drafter."""

from __future__ import annotations

import click

from qwen2_mlx.cli.errors import error_line


def draft_flags(command):
    """--draft-model, --num-draft-tokens and --prompt-lookup."""
    options = [
        click.option("--draft-model", default=None,
                     help="Speculative decoding: a small model with the same tokenizer drafts "
                          "tokens the model checks (directory or Hub repo id; same --dtype). "
                          "The output is distributed exactly as without it."),
        click.option("--num-draft-tokens", default=4, show_default=True,
                     type=click.IntRange(min=1),
                     help="Most tokens drafted per round (adapted down when few are accepted)."),
        click.option("--prompt-lookup", default=0, show_default=True, type=click.IntRange(min=0),
                     help="Speculative decoding without a draft model: draft what followed the "
                          "last n-gram (n up to N) earlier in the prompt and output. 0: off."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load_drafter(model, tokenizer, draft_model: str | None, num_draft_tokens: int,
                 prompt_lookup: int, dtype: str | None) -> dict:
    """The speculative keyword arguments of `stream_generate` / `ChatSession` for the flags:
    the draft model loaded and checked against `model`'s tokenizer and vocabulary."""
    speculative = {"num_draft_tokens": num_draft_tokens, "prompt_lookup": prompt_lookup}
    if draft_model is None:
        return speculative
    if prompt_lookup:
        raise click.UsageError("choose one drafter: --draft-model or --prompt-lookup")
    from qwen2_mlx.loader import load
    from qwen2_mlx.speculative import check_draft_model, check_draft_tokenizer

    try:
        speculative["draft_model"], draft_tokenizer = load(draft_model, dtype=dtype)
        check_draft_tokenizer(tokenizer, draft_tokenizer)
        check_draft_model(model, speculative["draft_model"], tokenizer)
    except (OSError, ValueError) as e:
        raise click.ClickException(f"draft model: {error_line(e)}") from e
    return speculative
