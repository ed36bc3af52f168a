"""Find a model (local directory or Hugging Face repo), read its config and weights, build it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from qwen2_mlx.model import Model, ModelConfig

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


def resolve_model_path(path_or_repo: str | os.PathLike, revision: str | None = None) -> Path:
    """Return a local directory for `path_or_repo`, downloading from the Hub when needed.

    Downloads go through huggingface_hub, so HF_HOME, HF_TOKEN, HF_ENDPOINT and the existing
    cache are honoured, and only the files a model needs are fetched.
    """
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo)
    looks_like_repo = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise ModelNotFoundError(f"model directory {name!r} does not exist")
    return _download(name, revision)


def _download(repo_id: str, revision: str | None) -> Path:
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
        path = snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILE_PATTERNS)
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
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e


def weight_files(model_path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when it is sharded."""
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
    files = sorted(model_path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_path}")
    return files


def load_weights(model_path: Path) -> dict[str, mx.array]:
    """All tensors of a checkpoint, by Hugging Face name (loaded lazily by MLX)."""
    weights: dict[str, mx.array] = {}
    for file in weight_files(model_path):
        try:
            weights.update(mx.load(str(file)))
        except Exception as e:  # MLX raises RuntimeError/ValueError for a damaged file
            raise ValueError(f"cannot read weights from {file}: the file is truncated or corrupt "
                             f"({e})") from e
    return weights


def check_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Raise an error naming every missing, unexpected or wrongly shaped tensor."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(weights[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(weights))
        if weights[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append("missing tensors: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(unexpected))
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong))
    if problems:
        raise ValueError("checkpoint does not match the model config: " + " | ".join(problems))


def _as_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype | None:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    names = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {', '.join(names)}, got {dtype!r}")
    return names[dtype]


def load_model(model_path: Path, dtype: str | mx.Dtype | None = None) -> Model:
    """Build the model from a local directory and load its weights.

    Floating tensors keep their on-disk dtype unless `dtype` is given.
    """
    config = ModelConfig.from_dict(load_config(model_path))
    model = Model(config)
    weights = model.sanitize(load_weights(model_path))
    target = _as_dtype(dtype)
    if target is not None:
        weights = {
            k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }
    check_weights(model, weights)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model


def load(
    path_or_repo: str | os.PathLike,
    *,
    dtype: str | mx.Dtype | None = None,
    adapter_path: str | os.PathLike | None = None,
    revision: str | None = None,
):
    """Load a Qwen2 model and its tokenizer.

    Args:
        path_or_repo: a local model directory or a Hugging Face repo id
            (e.g. ``"Qwen/Qwen2-0.5B-Instruct"``), downloaded into the HF cache when needed.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` to cast floating weights;
            ``None`` keeps the checkpoint's dtype.
        adapter_path: a LoRA adapter directory to apply on top of the weights.
        revision: a Hub branch, tag or commit.

    Returns:
        ``(model, tokenizer)``.
    """
    from qwen2_mlx.tokenizer import Qwen2Tokenizer

    model_path = resolve_model_path(path_or_repo, revision=revision)
    model = load_model(model_path, dtype=dtype)
    if adapter_path is not None:
        raise NotImplementedError(
            "LoRA adapters are not supported yet (tracked by the LoRA fine-tuning issue)"
        )
    tokenizer = Qwen2Tokenizer.from_pretrained(model_path)
    return model, tokenizer
