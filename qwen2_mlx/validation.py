"""Checks of token ids before they reach the embedding table.

An id outside ``[0, vocab_size)`` must never reach ``mx.take``: MLX does not bounds-check a
gather, so a large id reads (or faults on) memory past the table (a segfault takes the whole
process down, an app embedding us included) and an id just past the end yields garbage
logits without an error. So every entry point that accepts ids runs them through
`check_token_ids` (Python ids in hand: no device sync) or `check_token_array` (an `mx.array`:
one min/max reduction), and raises `TokenIdError` naming the first bad id and its position.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

__all__ = ["TokenIdError", "check_token_array", "check_token_ids"]


class TokenIdError(ValueError, TypeError):
    """Token ids that are not integers in ``[0, vocab_size)``.

    A ValueError (as the API documents) that is also a TypeError, so callers catching either
    for "bad prompt" keep working. `out_of_range` tells an integer outside the vocabulary
    from input that is not integer ids at all.
    """

    def __init__(self, message: str, *, out_of_range: bool = False) -> None:
        super().__init__(message)
        self.out_of_range = out_of_range


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_token_ids(ids: object, vocab_size: int) -> list[int]:
    """Return `ids` as a list of Python ints, or raise TokenIdError naming the first bad one.

    Accepts a sequence of ints (numpy integer scalars included) or a 1-D integer numpy / MLX
    array. Rejects str, bytes and bytearray (text is not ids: encode or decode it first),
    floats, bools, nested sequences, and ids that are negative or ``>= vocab_size``.
    """
    if isinstance(ids, (str, bytes, bytearray, memoryview)):
        kind = type(ids).__name__
        hint = ("decode it to str first (e.g. data.decode('utf-8'))" if kind != "str"
                else "encode it with the tokenizer first")
        raise TokenIdError(f"token ids must be a list of ints, got {kind}: {hint}")
    if isinstance(ids, mx.array):
        if ids.dtype == mx.bool_ or not mx.issubdtype(ids.dtype, mx.integer):
            raise TokenIdError(f"token ids must be integers, got an array of dtype {ids.dtype}")
        ids = np.array(ids)
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise TokenIdError(f"token ids must be 1-D, got an array of shape {ids.shape}")
        if ids.dtype.kind not in "iu":
            raise TokenIdError(f"token ids must be integers, got an array of dtype {ids.dtype}")
        ids = ids.tolist()
    if not isinstance(ids, Sequence):
        raise TokenIdError(f"token ids must be a list of ints, got {type(ids).__name__}")
    out: list[int] = []
    for position, value in enumerate(ids):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise TokenIdError(
                f"token id at position {position} is {_describe(value)} "
                f"({type(value).__name__}), not an int"
            )
        value = int(value)
        if not 0 <= value < vocab_size:
            raise TokenIdError(
                f"token id {value} at position {position} is outside the model's vocabulary "
                f"[0, {vocab_size})", out_of_range=True
            )
        out.append(value)
    return out


def check_token_array(ids: mx.array, vocab_size: int) -> None:
    """Raise TokenIdError unless the integer array `ids` (any shape) lies in [0, vocab_size).

    Costs one min/max reduction and a sync on `ids` (use it where the ids are an input, not
    on a decode loop's freshly sampled tokens, which are in range by construction).
    """
    if not isinstance(ids, mx.array):
        raise TokenIdError(f"token ids must be an mx.array here, got {type(ids).__name__}")
    if ids.dtype == mx.bool_ or not mx.issubdtype(ids.dtype, mx.integer):
        raise TokenIdError(f"token ids must be integers, got an array of dtype {ids.dtype}")
    if ids.size == 0:
        return
    flat = ids.reshape(-1)
    low, high = mx.min(flat), mx.max(flat)
    mx.eval(low, high)
    # Unsigned arrays cannot hold negatives; compare as Python ints (no overflow).
    if int(low.item()) >= 0 and int(high.item()) < vocab_size:
        return
    values = np.array(ids).astype(np.int64)
    bad = np.argwhere((values < 0) | (values >= vocab_size))[0]
    position = int(bad[-1]) if values.ndim == 1 or values.shape[0] == 1 else tuple(map(int, bad))
    raise TokenIdError(
        f"token id {int(values[tuple(bad)])} at position {position} is outside the model's "
        f"vocabulary [0, {vocab_size})", out_of_range=True
    )
