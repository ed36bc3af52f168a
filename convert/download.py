"""Locating the checkpoint to convert: a local directory in place, or a Hub repo.

Hub downloads go through huggingface_hub (`snapshot_download`): its progress bars, cache,
HF_TOKEN and HF_ENDPOINT apply, and only the files a conversion needs are fetched. Errors (no
such repo, gated repo, no network) are `qwen2_mlx.model_files.ModelNotFoundError`, which says
what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from qwen2_mlx.model_files import MODEL_FILE_PATTERNS, resolve_model_path, weight_files

# Weights, configs, tokenizer and generation files; never *.bin/*.pth/*.gguf duplicates.
CONVERT_FILE_PATTERNS = [*MODEL_FILE_PATTERNS, "*.jinja"]


def fetch_checkpoint(hf_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory holding the checkpoint `hf_path` (a directory or a Hub repo id)."""
    path = resolve_model_path(hf_path, revision=revision, allow_patterns=CONVERT_FILE_PATTERNS)
    weight_files(path)  # the loader's rule too: raises when there are no weights to convert
    return path
