"""One-line error messages for the command line: what went wrong, in the CLI's words."""

from __future__ import annotations

import click


def error_line(error: BaseException) -> str:
    """`error` as one line: OSErrors without their "[Errno N]" prefix, and the fix named with
    the CLI's flags (--force) rather than Python's arguments (force=True) where the error
    knows both (a `cli_message()` method)."""
    if hasattr(error, "cli_message"):  # errors that word their fix for the CLI
        return error.cli_message()
    if isinstance(error, OSError) and error.strerror and len(error.args) > 1:
        where = error.filename
        return error.strerror if not where or str(where) in error.strerror else (
            f"{error.strerror}: {where}")
    return str(error)


def click_error(error: BaseException) -> click.ClickException:
    """The ClickException (exit status 1, "Error: ..." on stderr) reporting `error`."""
    return click.ClickException(error_line(error))
