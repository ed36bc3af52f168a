"""A model's files: where they are (a local directory, or a Hugging Face repo downloaded into
its cache), its config.json, and which safetensors files hold its weights.

The loader and the converter both read checkpoints through here (one rule for the weight files:
the index when there is one, else every *.safetensors), so neither imports the other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# What a model directory needs; nothing else (e.g. *.bin or *.gguf) is downloaded.
MODEL_FILE_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer*",
    "vocab.json",
    "merges.txt",
]


class ModelNotFoundError(FileNotFoundError):
    """A model id that is neither a local directory nor a reachable Hugging Face repo."""


def resolve_model_path(
    path_or_repo: str | os.PathLike,
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """Return a local directory for `path_or_repo`, downloading from the Hub when needed.

    Downloads go through huggingface_hub, so HF_HOME, HF_TOKEN, HF_ENDPOINT and the existing
    cache are honoured, and only the files a model needs are fetched (`allow_patterns`,
    default MODEL_FILE_PATTERNS).
    """
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(
            f"{path} is a file, not a model: give the directory that holds config.json, "
            "*.safetensors and tokenizer.json (or a Hugging Face repo id)")
    name = str(path_or_repo)
    looks_like_repo = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise ModelNotFoundError(f"model directory {name!r} does not exist")
    return _download(name, revision, allow_patterns or MODEL_FILE_PATTERNS)


def _download(repo_id: str, revision: str | None, allow_patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hint = "pass --model a local directory that holds config.json, *.safetensors and tokenizer.json"
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns)
        return Path(path)
    except GatedRepoError as e:
        raise ModelNotFoundError(
            f"{repo_id} is gated: accept its licence on the Hub and set HF_TOKEN ({hint})"
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(
            f"{repo_id} is neither a local directory nor a repository on the Hub (a private "
            f"repository needs HF_TOKEN; {hint})"
        ) from e
    except RevisionNotFoundError as e:
        raise ModelNotFoundError(f"revision {revision!r} of {repo_id} does not exist") from e
    except LocalEntryNotFoundError as e:
        raise ModelNotFoundError(
            f"cannot download {repo_id}: the Hub is unreachable and it is not in the local cache "
            f"({hint})"
        ) from e
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(f"cannot download {repo_id}: {e} ({hint})") from e


def load_config(model_path: Path) -> dict[str, Any]:
    """Read config.json as a dict, with a clear error when missing or malformed."""
    file = model_path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a model directory needs config.json")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got a JSON {type(config).__name__}")
    return config


def weight_files(model_path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those its index lists when it has one, else
    every *.safetensors file in the directory. The one rule the loader and the converter
    share."""
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is malformed: {e}") from e
        files = [model_path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{index.name} lists shards that are missing from {model_path}: "
                + ", ".join(missing)
            )
        return files
    files = sorted(p for p in model_path.glob("*.safetensors") if not p.name.startswith("."))
    if not files:
        other = sorted(p.name for p in model_path.iterdir() if p.suffix in (".bin", ".pth", ".pt"))
        hint = (
            f" (it has PyTorch weights {', '.join(other)}: save them as safetensors first, "
            "e.g. with transformers' save_pretrained(safe_serialization=True))"
            if other else "")
        raise FileNotFoundError(f"no *.safetensors weights in {model_path}{hint}")
    return files
