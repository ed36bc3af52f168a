"""Memory controls for generating on a Mac: the wired limit while a model runs.

On Apple Silicon the GPU reads the weights and the KV cache from unified memory. macOS may page
out (or, past its wired budget, refuse) memory the GPU needs in the middle of a command buffer;
large contexts without a raised wired limit have been reported to stall or panic the GPU driver.
MLX lets a process keep up to `mx.set_wired_limit(n)` bytes resident. `wired_limit` raises it to
what the model needs while generating (its weights plus the KV cache's bytes, capped at the
device's recommended working set, so a small Mac is not starved) and restores the old limit
after, as mlx-lm's context manager does; it warns when the model alone nearly fills the
recommended working set. On the CPU backend there is no wired memory: it does nothing and says
so.

Returning memory to the OS is the other half: MLX keeps freed buffers in a cache for reuse, so
a chat session calls `mx.clear_cache()` between turns (not inside the decode loop, where the
buffers are reused at once).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_flatten

# Warn when the weights alone take more than this share of the recommended working set.
NEAR_LIMIT = 0.9

_lock = threading.Lock()
_active: list[int] = []  # the limits asked for by the wired_limit blocks now open
_previous = 0  # the limit before the outermost open block


@dataclass(frozen=True)
class WiredLimitInfo:
    """What `wired_limit` did: `active` (a limit was set), the `limit` in bytes, the model's
    bytes, the device's recommended working set, and a one-line `message` for --verbose."""

    active: bool
    limit: int
    model_bytes: int
    recommended: int
    message: str


def model_bytes(model) -> int:
    """Bytes of the model's weights (quantized weights as stored)."""
    while not hasattr(model, "parameters"):  # a wrapper around the model
        model = model.model
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _metal() -> bool:
    return bool(getattr(mx, "metal", None) and mx.metal.is_available())


@contextmanager
def wired_limit(model=None, *, extra_bytes: int = 0,
                log: Callable[[str], None] | None = None) -> Iterator[WiredLimitInfo]:
    """Keep the model's memory wired (resident) while the block runs; restore the limit after.

    Args:
        model: the model whose weights must stay resident (None: the whole recommended
            working set, as mlx-lm does).
        extra_bytes: more bytes to keep resident, e.g. the KV cache at its largest.
        log: called with one line saying what was done (the CLI's --verbose).

    On Metal the limit is ``min(model bytes + extra_bytes, recommended working set)``; a
    RuntimeWarning says when the weights alone exceed 90% of the recommended working set (the
    model will run, but the rest of the system has little room). Blocks may nest and run on
    several threads: the largest limit asked for holds until the last block ends, then the
    limit from before the first is restored. On the CPU backend nothing is set.
    """
    weights = model_bytes(model) if model is not None else 0
    if not _metal():
        info = WiredLimitInfo(False, 0, weights, 0,
                              "Wired memory: not used on the CPU backend (no-op)")
        if log is not None:
            log(info.message)
        yield info
        return

    recommended = int(mx.device_info().get("max_recommended_working_set_size", 0))
    wanted = weights + max(int(extra_bytes), 0) if model is not None else recommended
    limit = min(wanted, recommended) if recommended else wanted
    if recommended and weights > NEAR_LIMIT * recommended:
        warnings.warn(
            f"the model takes {weights / 2**30:.1f} GiB, more than {NEAR_LIMIT:.0%} of this "
            f"Mac's recommended working set ({recommended / 2**30:.1f} GiB): generation may be "
            "slow; a smaller or more quantized model fits better", RuntimeWarning, stacklevel=3)
    info = WiredLimitInfo(True, limit, weights, recommended,
                          f"Wired memory limit: {limit / 2**30:.2f} GiB (model "
                          f"{weights / 2**30:.2f} GiB, recommended working set "
                          f"{recommended / 2**30:.2f} GiB)")
    if log is not None:
        log(info.message)
    _enter(limit)
    try:
        yield info
    finally:
        _exit(limit)


def _enter(limit: int) -> None:
    global _previous
    with _lock:
        current = max(_active, default=0)
        if not _active:
            _previous = mx.set_wired_limit(limit)
        elif limit > current:
            mx.set_wired_limit(limit)
        _active.append(limit)


def _exit(limit: int) -> None:
    with _lock:
        _active.remove(limit)
        # Work queued under the raised limit finishes before it drops (as mlx-lm does).
        mx.synchronize()
        mx.set_wired_limit(max(_active) if _active else _previous)
