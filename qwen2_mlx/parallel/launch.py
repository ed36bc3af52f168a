"""What a command needs to run as one rank of an `mlx.launch` job: only rank 0 talks to the
terminal, rank 0 reads the prompt and sends it to the others, and a lost peer becomes one
clear line instead of MLX's exception.
"""

from __future__ import annotations

import functools
import os
import select
import sys
import time

# Only the standard library at import time: the CLI imports this module for every command.

# How long rank 0 waits for more of a `--prompt -` after the last bytes arrived. mlx.launch
# forwards its stdin to every rank but never closes it, so no rank ever sees end-of-file;
# a pause ends the prompt instead (a pipe from a file or `echo` delivers it at once).
STDIN_PAUSE_SECONDS = 2.0

# How long a rank other than 0 waits before it exits with an error: mlx.launch ends every
# rank once one exits with an error, which could cut rank 0 off before it prints the message
# (the same on every rank, since errors are agreed on, see group.py).
SECONDARY_EXIT_DELAY = 1.0

# Messages with which MLX's distributed backends fail a collective when a peer is gone.
_PEER_LOST = ("connection to a peer was lost", "[ring]", "[jaccl]", "[mpi]")


# Environment variables that carry a process's rank under mlx.launch (ring, JACCL) and MPI.
RANK_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def launched_rank() -> int | None:
    """This process's rank as the launcher set it in the environment (None when not launched),
    known before any group exists."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None and value.isdigit():
            return int(value)
    return None


def quiet_secondary_ranks() -> None:
    """Under a launcher, send everything but rank 0's output to /dev/null (only rank 0 talks
    to the terminal; all ranks run the same command and would print the same text). An
    unexpected exception still shows its traceback on every rank."""
    rank = launched_rank()
    if rank is None or rank == 0:
        return
    real_stderr = sys.stderr
    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    sys.stdout = sys.stderr = devnull

    def show_traceback(kind, value, traceback):
        sys.stderr = real_stderr
        sys.__excepthook__(kind, value, traceback)

    sys.excepthook = show_traceback


def rank_0_reports_errors(command):
    """Decorate a command so that on ranks other than 0 an error exit waits
    `SECONDARY_EXIT_DELAY` seconds, leaving rank 0 the time to print it."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Exception:
            if launched_rank() not in (None, 0):
                time.sleep(SECONDARY_EXIT_DELAY)
            raise

    return run


def read_stdin_until_pause(pause: float = STDIN_PAUSE_SECONDS) -> str:
    """All of stdin up to end-of-file, or up to a `pause`-second silence after some input
    arrived (the only end mlx.launch's forwarded stdin ever has)."""
    fd = sys.stdin.fileno()
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([fd], [], [], pause if chunks else None)
        if not ready:
            break
        data = os.read(fd, 1 << 16)
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode("utf-8")


def shared_prompt(group, prompt: str) -> str:
    """The prompt on every rank: `prompt` itself, or for "-" rank 0's stdin, read once there
    and broadcast."""
    from qwen2_mlx.parallel.group import broadcast_text

    if prompt != "-":
        return broadcast_text(group, prompt)
    return broadcast_text(group, read_stdin_until_pause() if group.rank() == 0 else None)


def rank_failure_message(error: BaseException) -> str | None:
    """One line for an MLX collective that failed because another rank went away, else None."""
    text = str(error)
    if not any(marker in text for marker in _PEER_LOST):
        return None
    return (f"lost the connection to another rank ({text}): it exited, was killed or its "
            "machine went away; stopping")
