"""Errors whose fix reads differently from Python and from the command line."""

from __future__ import annotations


class HintedError(ValueError):
    """A ValueError that says how to fix it in the caller's own terms: `str()` names Python
    arguments (``overwrite=True``), `cli_message()` the command's flags (``--overwrite``)."""

    def __init__(self, problem: str, api_hint: str = "", cli_hint: str = "") -> None:
        super().__init__(problem + api_hint)
        self.problem, self.cli_hint = problem, cli_hint

    def cli_message(self) -> str:
        return self.problem + self.cli_hint
