"""Training data shared by every objective: JSONL files read line by line with errors naming the
file and the line, the train/valid/test split files, and batches.

`BatchSchedule` makes the sequence of batches a pure function of (seed, batch index), which is
what exact resume needs; `make_batch` pads examples and shifts them for next-token targets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import mlx.core as mx
import numpy as np

SPLITS = ("train", "valid", "test")
T = TypeVar("T")


class Examples(Protocol):
    """A tokenized dataset (fine-tuning examples, preference pairs): `examples`, each with the
    `tokens` a batch is padded to, the file it came from (`path`, or None) and `len()`."""

    examples: Sequence
    path: Path | None

    def __len__(self) -> int: ...


class DataFormatError(ValueError):
    """A malformed line of a JSONL data file; the message starts with ``file:line:``."""


class TruncationWarning(UserWarning):
    """Some examples were longer than max_seq_length and were cut."""


@dataclass
class Example:
    """One tokenized sequence and which of its tokens are training targets."""

    tokens: list[int]
    mask: list[bool]  # True where the token is a training target


def read_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    """("file:line", parsed record) for each non-blank line of a JSONL file; a line that is not
    UTF-8 or not JSON raises DataFormatError naming the file, the line and the column."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(f"{where}: not valid UTF-8 (byte {e.start + 1} of the "
                                      "line); save the file as UTF-8") from e
            line = line.rstrip("\r\n")
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
            yield where, record


def load_splits(data_dir: str | os.PathLike, load_file: Callable[[Path], T],
                splits: Sequence[str], expected: str) -> dict[str, T | None]:
    """{split: load_file(<data_dir>/<split>.jsonl) or None} for `splits` of
    ("train", "valid", "test"); train.jsonl is required when "train" is in `splits` (its
    absence names the data directory's `expected` contents), missing other files give None."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {str(data_dir)!r} does not exist")
    out: dict[str, T | None] = {}
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        file = data_dir / f"{split}.jsonl"
        if not file.is_file():
            if split == "train":
                raise FileNotFoundError(f"{file} not found: the data directory needs {expected}")
            out[split] = None
            continue
        out[split] = load_file(file)
    return out


@dataclass
class Batch:
    """One padded batch, shifted for next-token prediction.

    inputs/targets: (B, L) int32; mask: (B, L) float32, 1 where the target is trained;
    positions: flat indices of the trained targets in the (B*L) grid; tokens: real
    (non-padding) input tokens; trained: number of trained targets.
    """

    inputs: mx.array
    targets: mx.array
    mask: mx.array
    positions: mx.array
    tokens: int
    trained: int


def make_batch(examples: Sequence[Example], pad_id: int = 0) -> Batch:
    """Right-pad `examples` to the longest one and shift them into inputs and targets."""
    width = max(len(e.tokens) for e in examples) - 1
    tokens = np.full((len(examples), width + 1), pad_id, dtype=np.int32)
    mask = np.zeros((len(examples), width + 1), dtype=bool)
    real = 0
    for row, example in enumerate(examples):
        n = len(example.tokens)
        tokens[row, :n] = example.tokens
        mask[row, :n] = example.mask
        real += n - 1
    target_mask = mask[:, 1:]
    positions = np.flatnonzero(target_mask.reshape(-1)).astype(np.int32)
    return Batch(
        inputs=mx.array(tokens[:, :-1]),
        targets=mx.array(tokens[:, 1:]),
        mask=mx.array(target_mask.astype(np.float32)),
        positions=mx.array(positions),
        tokens=real,
        trained=int(positions.size),
    )


class BatchSchedule:
    """The sequence of training batches as a pure function of (seed, batch index).

    Examples are sorted by length and cut into batches of `batch_size` (similar lengths share
    a batch, so little padding is computed); each epoch visits the batches in an order drawn
    from ``numpy.random.default_rng([seed, epoch])``. Batch k is therefore the same whether a
    run went straight through or was stopped and resumed, which is what exact resume needs.
    """

    def __init__(self, dataset: Examples, batch_size: int, seed: int = 0, shuffle: bool = True,
                 pad_id: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(dataset) < batch_size:
            where = f" in {dataset.path}" if dataset.path else ""
            raise ValueError(f"{len(dataset)} examples{where} are fewer than batch_size "
                             f"{batch_size}; add data or lower the batch size")
        self.dataset = dataset
        self.seed = seed
        self.shuffle = shuffle
        self.pad_id = pad_id
        lengths = np.array([len(e.tokens) for e in dataset.examples])
        order = np.argsort(lengths, kind="stable")
        self.groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        self._order_epoch = -1
        self._order = np.arange(len(self.groups))

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.groups)

    def indices(self, index: int) -> np.ndarray:
        """Example indices of global batch `index` (0-based, running over epochs)."""
        epoch, within = divmod(index, len(self.groups))
        if self.shuffle and epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))
            self._order_epoch = epoch
        return self.groups[self._order[within]]

    def batch(self, index: int) -> Batch:
        return make_batch([self.dataset.examples[i] for i in self.indices(index)], self.pad_id)
