"""Reading a checkpoint one shard at a time, renamed to the model's parameter names.

Renaming comes from the model class itself (`Model.sanitize`, the same step `load()` runs), so
each model type brings its own: the dense model drops `rotary_emb.inv_freq` and a tied
`lm_head.weight`; a mixture-of-experts model stacks per-expert tensors. Because one expert
stack may span shards, tensors that `sanitize` leaves under a name the model does not have
are carried over to the next shard and offered to `sanitize` again with it. A `sanitize` that
stacks must therefore leave incomplete groups untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from qwen2_mlx.model_files import weight_files


def read_shard(file: Path) -> dict[str, mx.array]:
    """The tensors of one safetensors file, loaded lazily (read from disk when evaluated).

    MLX checks the header against the file size, so truncation and a damaged header show
    up here; the error names the file.
    """
    try:
        return dict(mx.load(str(file)))
    except Exception as e:  # MLX raises RuntimeError/ValueError for a damaged file
        raise ValueError(
            f"cannot read weights from {file}: the file is truncated or corrupt ({e})"
        ) from e


def parameter_names(model: nn.Module) -> list[str]:
    """The model's parameter names, in its own order."""
    return [name for name, _ in tree_flatten(model.parameters())]


def stream_model_weights(
    model: nn.Module, model_path: Path, expected: set[str] | None = None
) -> Iterator[tuple[Path, dict[str, mx.array]]]:
    """Yield `(shard file, {parameter name: lazy tensor})`, shard by shard.

    `expected` defaults to the parameter names of the (float) `model`. Each is yielded exactly
    once; a tensor the model does not have, a duplicate, or a parameter no shard holds raises
    ValueError naming them.
    """
    expected = set(parameter_names(model)) if expected is None else expected
    seen: set[str] = set()
    pending: dict[str, mx.array] = {}
    for file in weight_files(model_path):
        shard = read_shard(file)
        duplicates = sorted((set(shard) & set(pending)) | (set(shard) & seen))
        if duplicates:
            raise ValueError(f"{file.name} repeats tensors of an earlier shard: "
                             + ", ".join(duplicates))
        pending.update(shard)
        del shard
        renamed = model.sanitize(pending)
        pending = {}
        ready: dict[str, mx.array] = {}
        for name, tensor in renamed.items():
            (ready if name in expected else pending)[name] = tensor
        del renamed
        repeated = sorted(set(ready) & seen)
        if repeated:
            raise ValueError(f"{file.name} repeats tensors of an earlier shard: "
                             + ", ".join(repeated))
        seen.update(ready)
        yield file, ready
    problems = []
    if pending:
        problems.append("unexpected tensors: " + ", ".join(sorted(pending)))
    missing = sorted(expected - seen)
    if missing:
        problems.append("missing tensors: " + ", ".join(missing))
    if problems:
        raise ValueError(
            f"checkpoint {model_path} does not match the model config: " + " | ".join(problems)
        )
