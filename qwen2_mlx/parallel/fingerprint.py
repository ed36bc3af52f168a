"""A cheap fingerprint of a checkpoint, to check that every rank loads the same model.

Hashing every weight byte of a 145 GB model would take minutes; the fingerprint covers what
differs between checkpoints at a few kilobytes of reading per file: config.json and the
tokenizer files whole, and for each safetensors file its size, its header (every tensor's
name, dtype, shape and offsets) and `SAMPLES` blocks of its data spread evenly over the file
(two fine-tunes of one model share headers but not their bytes).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from pathlib import Path

from qwen2_mlx.loader import weight_files
from qwen2_mlx.tokenizer import TOKENIZER_FILES

SAMPLES = 16
SAMPLE_BYTES = 4096
_MAX_HEADER = 100 << 20  # safetensors caps headers at 100 MB


def _hash_file(h, path: Path) -> None:
    h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")


def _hash_safetensors(h, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        raw = f.read(8)
        header_len = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
        header = f.read(min(header_len, _MAX_HEADER))
        h.update(header)
        start = 8 + len(header)
        span = max(size - start - SAMPLE_BYTES, 0)
        for k in range(SAMPLES):
            f.seek(start + span * k // max(SAMPLES - 1, 1))
            h.update(f.read(SAMPLE_BYTES))


def checkpoint_fingerprint(
    model_path: Path, adapter_path: Path | None = None, options: Iterable = ()
) -> bytes:
    """SHA-256 over the model directory's config, tokenizer and sampled weights, the adapter
    (config and sampled weights) when given, and `options` (the load options as repr)."""
    h = hashlib.sha256()
    for name in ("config.json", *TOKENIZER_FILES):
        if (model_path / name).is_file():
            _hash_file(h, model_path / name)
    for file in weight_files(model_path):
        _hash_safetensors(h, file)
    if adapter_path is not None:
        from qwen2_mlx.lora.adapters import resolve_adapter_files

        weights, config = resolve_adapter_files(adapter_path)
        _hash_file(h, config)
        _hash_safetensors(h, weights)
    h.update(repr(tuple(options)).encode())
    return h.digest()
