"""Which model this is: a fingerprint that a saved conversation (its KV cache) is checked against.

A KV cache is only meaningful for the weights that wrote it. The fingerprint covers what makes
two loaded models differ: the configuration (long-context settings included), the names and
sizes of the files the weights were loaded from (config.json, the safetensors files, a LoRA
adapter's files) when the loader recorded them, and a few hundred bytes of the weights
themselves (so two models built in memory with the same shapes differ too).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np


@dataclass(frozen=True)
class ModelSource:
    """The files a model was loaded from: (name, size in bytes) of config.json and each
    weight file, and of the adapter's files when one was applied."""

    path: str
    files: tuple[tuple[str, int], ...]
    adapter_files: tuple[tuple[str, int], ...] = ()


def model_source(model_path: Path, weight_files: list[Path],
                 adapter_path: str | os.PathLike | None = None) -> ModelSource:
    """The `ModelSource` of a model loaded from `model_path` (and `adapter_path`)."""
    def sized(paths) -> tuple[tuple[str, int], ...]:
        return tuple(sorted((p.name, p.stat().st_size) for p in paths if p.is_file()))

    adapter: tuple[tuple[str, int], ...] = ()
    if adapter_path is not None:
        where = Path(adapter_path)
        adapter = sized(sorted(where.iterdir()) if where.is_dir() else [where])
    return ModelSource(str(model_path), sized([model_path / "config.json", *weight_files]),
                       adapter)


def _sample(array: mx.array) -> bytes:
    row = array[0] if array.ndim > 1 else array
    row = row[:256]
    if mx.issubdtype(row.dtype, mx.floating):
        row = row.astype(mx.float32)  # numpy has no bfloat16
    return np.array(row).tobytes()


def model_fingerprint(model) -> tuple[str, str]:
    """`(digest, description)` of a model: a SHA-256 over its config, source files and a
    sample of its weights, and a short human-readable description for error messages."""
    config = dataclasses.asdict(model.config)
    source: ModelSource | None = getattr(model, "source", None)
    inner = model.model
    while not hasattr(inner, "embed_tokens"):  # a wrapper around the model
        inner = inner.model
    weights = {"embed": inner.embed_tokens.weight, "norm": inner.norm.weight}
    data = {
        "config": config,
        "files": source.files if source else None,
        "adapter": source.adapter_files if source else None,
        "sample": {k: hashlib.sha256(_sample(v)).hexdigest() for k, v in weights.items()},
    }
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
    where = f" from {source.path}" if source else ""
    description = (f"{config.get('model_type', 'qwen2')} with {config['num_hidden_layers']} "
                   f"layers, hidden size {config['hidden_size']}{where}")
    return digest, description
