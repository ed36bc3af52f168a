"""The process group, and agreeing on things across its ranks with `mx.distributed`.

Every rank runs the same program. Where one rank may fail alone (its copy of a file is
missing, its shard is corrupt) the others would otherwise wait in the next collective for a
peer that has left. `all_or_none` runs a block on every rank and then exchanges the outcome
(one `all_gather`), so a failure anywhere becomes the same `ParallelError` everywhere, with
the failing rank's message.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
import numpy as np

from qwen2_mlx.parallel.plan import ParallelError, check_mode

Group = mx.distributed.Group

LAUNCH_HINT = ('start one process per rank with mlx.launch, e.g. `mlx.launch -n 2 --backend ring '
               '--python "$(which python)" script.py` (or --hosts mac1,mac2)')

def init_group(parallel: str, group: Group | None = None) -> Group:
    """`group`, or the global group from `mx.distributed.init()`; a ParallelError when this
    process is alone (a parallel mode needs at least two)."""
    check_mode(parallel)
    if group is None:
        group = mx.distributed.init()
    if group.size() < 2:
        raise ParallelError(
            f"parallel={parallel!r} needs 2 or more processes but this one runs alone: "
            + LAUNCH_HINT
        )
    return group


def exchange(group: Group, payload: bytes) -> list[bytes]:
    """Every rank's `payload`, in rank order (two all_gathers: lengths, then padded bytes)."""
    lengths = mx.distributed.all_gather(mx.array([len(payload)], dtype=mx.int32), group=group)
    lengths = lengths.tolist()
    width = max(lengths)
    if width == 0:
        return [b""] * len(lengths)
    row = np.zeros((1, width), dtype=np.uint8)
    row[0, : len(payload)] = np.frombuffer(payload, dtype=np.uint8)
    rows = np.array(mx.distributed.all_gather(mx.array(row), group=group))
    return [rows[r, :n].tobytes() for r, n in enumerate(lengths)]


def broadcast_text(group: Group, text: str | None) -> str:
    """Rank 0's `text` on every rank (the others pass None)."""
    payload = text.encode("utf-8") if group.rank() == 0 and text is not None else b""
    return exchange(group, payload)[0].decode("utf-8")


def broadcast_seed(group: Group, seed: int | None) -> int:
    """Rank 0's `seed` (a fresh random one when None) on every rank."""
    if group.rank() == 0 and seed is None:
        seed = random.SystemRandom().randrange(2**63)
    return int(broadcast_text(group, str(seed) if group.rank() == 0 else None))


def _describe(error: BaseException) -> str:
    if isinstance(error, ValueError | OSError | ParallelError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def agree(group: Group, error: BaseException | None) -> None:
    """Raise the same ParallelError on every rank when any rank passes an error."""
    messages = exchange(group, b"" if error is None else _describe(error).encode("utf-8"))
    failed = [(rank, m.decode("utf-8")) for rank, m in enumerate(messages) if m]
    if not failed:
        return
    texts = {m for _, m in failed}
    if len(failed) == group.size() and len(texts) == 1:
        message = texts.pop()  # every rank failed the same way: no need to name one
    else:
        rank, text = failed[0]
        others = f" (ranks {', '.join(str(r) for r, _ in failed[1:])} failed too)" \
            if len(failed) > 1 else ""
        message = f"rank {rank}: {text}{others}"
    raise ParallelError(message) from error


@contextmanager
def all_or_none(group: Group) -> Iterator[None]:
    """Run the block on every rank; if it raised anywhere, raise on every rank."""
    error = None
    try:
        yield
    except Exception as e:  # reported to every rank, then raised as ParallelError
        error = e
    agree(group, error)


def check_same_checkpoint(group: Group, fingerprint: bytes) -> None:
    """Refuse to go on when the ranks' checkpoint fingerprints differ."""
    fingerprints = exchange(group, fingerprint)
    different = [r for r, f in enumerate(fingerprints) if f != fingerprints[0]]
    if different:
        raise ParallelError(
            f"the ranks loaded different checkpoints: rank {different[0]}'s model files "
            f"(fingerprint {fingerprints[different[0]].hex()[:12]}) differ from rank 0's "
            f"({fingerprints[0].hex()[:12]}); give every rank the same model, adapter and "
            "load options"
        )
