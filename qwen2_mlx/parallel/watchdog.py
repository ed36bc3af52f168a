"""Ending a run whose peer stopped answering.

When a rank dies, MLX does not reliably tell the others. With mlx 0.32.4's ring backend a
lone pending collective fails at once ("[ring] connection to a peer was lost", measured
here within 30 ms), but when a step has a chain of collectives in flight, as a model's
forward pass has, the backend's socket thread gives up without releasing the waiters and
the survivors wait forever (MLX issue #3862, fixed upstream by PR #4060; JACCL has no peer
detection at all, #4278). A rank that hangs, is suspended or sits behind a cut cable closes
nothing either. The wait is inside MLX, where Python cannot interrupt it.

`RankWatchdog` bounds it: sharded models call `note_progress()` once per forward pass (when
a step is built, i.e. after the previous step's collectives returned), and while the
watchdog is armed a thread ends the process with one message when no step has been built
for `timeout` seconds. (mlx.launch itself terminates the other ranks when one exits with an
error, so under the launcher a dead rank ends the job within about a second either way.)
"""

from __future__ import annotations

import os
import sys
import threading
import time

_last_progress = time.monotonic()


def note_progress() -> None:
    """Record that this process built a new step (called by the sharded layers)."""
    global _last_progress
    _last_progress = time.monotonic()


class RankWatchdog:
    """While inside `with RankWatchdog(timeout):`, exit the process (status 1, one message on
    stderr) when no forward step was built for `timeout` seconds; None or 0 disables it.

    Use it around generation, not around idle time (waiting for a user types nothing).
    """

    def __init__(self, timeout: float | None, message: str | None = None):
        self.timeout = timeout
        self.message = message or (
            f"error: no answer from the other ranks for {timeout:g} s (a rank exited, hangs "
            "or its network is down); exiting"
        ) if timeout else ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RankWatchdog:
        if self.timeout:
            note_progress()
            self._thread = threading.Thread(target=self._watch, daemon=True,
                                            name="qwen2-mlx-rank-watchdog")
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        poll = min(1.0, self.timeout / 4)
        while not self._stop.wait(poll):
            if time.monotonic() - _last_progress > self.timeout:
                # The main thread is blocked inside MLX: only ending the process frees it.
                # (sys.stderr: under the CLI only rank 0 writes to the terminal.)
                sys.stderr.write(self.message + "\n")
                sys.stderr.flush()
                os._exit(1)
