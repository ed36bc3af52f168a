"""Adapter files: `adapters.safetensors` + `adapter_config.json`, written atomically.

The tensors are named as in the model tree (``model.layers.3.self_attn.q_proj.lora_a``) and the
config carries mlx-lm's keys (`fine_tune_type`, `num_layers`, `lora_parameters` with rank, scale,
dropout and the adapted module keys), so adapters trained here load in mlx-lm and the other way
round. What mlx-lm does not know (alpha, the target names given, the training settings) sits
under a "qwen2_mlx" key.

Training checkpoints (`qwen2_mlx.train.checkpoint`) add `training_state.safetensors` (optimizer
state) next to the adapter file; both carry the step in their metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from qwen2_mlx.files import atomic_save_safetensors, atomic_write_json
from qwen2_mlx.lora.layers import (
    ADAPTER_PARAMETERS,
    LoRAAdapter,
    LoRAConfig,
    apply_lora,
    lora_layers,
    remove_lora,
)

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT_VERSION = 1
def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The adapter tensors of `model` by their full names (lora_a, lora_b, DoRA's m)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRAAdapter):
            for key in ADAPTER_PARAMETERS:
                if key in module:
                    out[f"{name}.{key}"] = module[key]
    return out


def adapted_keys(model: nn.Module) -> list[str]:
    """Module paths inside a block that carry adapters ("self_attn.q_proj", ...)."""
    keys: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, LoRAAdapter):
            parts = name.split(".")
            # "model.layers.<i>.<path>" (or "layers.<i>.<path>") -> "<path>"
            idx = parts.index("layers") + 2 if "layers" in parts else 0
            key = ".".join(parts[idx:])
            if key not in keys:
                keys.append(key)
    return keys


def adapter_config_dict(model: nn.Module, config: LoRAConfig,
                        extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """adapter_config.json contents, readable by qwen2-mlx and mlx-lm."""
    n_layers = len(model.layers)
    return {
        "fine_tune_type": "dora" if config.dora else "lora",
        "num_layers": config.num_layers or n_layers,
        "lora_parameters": {
            "rank": config.rank,
            "scale": config.scale,
            "dropout": config.dropout,
            "keys": adapted_keys(model),
        },
        "qwen2_mlx": {
            "format_version": FORMAT_VERSION,
            "alpha": config.alpha,
            "targets": list(config.targets),
            **(extra or {}),
        },
    }


def lora_config_from_dict(data: dict[str, Any], source: str = CONFIG_FILE) -> LoRAConfig:
    """Read a LoRAConfig from adapter_config.json contents (ours or mlx-lm's)."""
    kind = data.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise ValueError(f"{source}: fine_tune_type {kind!r} is not a LoRA adapter "
                         "(qwen2-mlx loads 'lora' and 'dora')")
    params = data.get("lora_parameters")
    if not isinstance(params, dict):
        raise ValueError(f"{source}: lora_parameters is missing or not an object")
    for key in ("rank", "scale"):
        if key not in params:
            raise ValueError(f"{source}: lora_parameters has no {key!r}")
    ours = data.get("qwen2_mlx") or {}
    rank = int(params["rank"])
    num_layers = data.get("num_layers")
    # mlx-lm writes -1 for "all layers".
    if num_layers is not None and int(num_layers) < 1:
        num_layers = None
    config = LoRAConfig(
        rank=rank,
        alpha=float(ours.get("alpha", float(params["scale"]) * rank)),
        dropout=float(params.get("dropout", 0.0)),
        targets=tuple(params.get("keys") or ("all-linear",)),
        num_layers=None if num_layers is None else int(num_layers),
        dora=kind == "dora",
    )
    # alpha / rank must reproduce the stored scale; otherwise trust the scale.
    config.scale = float(params["scale"])
    return config


def resolve_adapter_files(adapter_path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights file, config file) for an adapter directory or an adapter .safetensors file."""
    path = Path(adapter_path).expanduser()
    if path.is_dir():
        weights, config = path / ADAPTER_FILE, path / CONFIG_FILE
    elif path.is_file():
        weights, config = path, path.parent / CONFIG_FILE
    else:
        raise FileNotFoundError(f"adapter path {str(path)!r} does not exist")
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: an adapter directory needs {ADAPTER_FILE}")
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: an adapter needs {CONFIG_FILE} beside "
                                "its weights")
    return weights, config


def read_adapter_config(config_file: Path) -> tuple[LoRAConfig, dict[str, Any]]:
    try:
        data = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{config_file} must hold a JSON object")
    return lora_config_from_dict(data, str(config_file)), data


def save_adapter(model: nn.Module, adapter_dir: str | os.PathLike, config: LoRAConfig, *,
                 file_name: str = ADAPTER_FILE, step: int | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write the adapter tensors to `adapter_dir/file_name` and adapter_config.json, atomically.

    Returns the weights file written.
    """
    adapter_dir = Path(adapter_dir)
    weights = adapter_weights(model)
    if not weights:
        raise ValueError("the model has no LoRA adapters to save")
    metadata = {"format": "mlx"}
    if step is not None:
        metadata["step"] = str(step)
    out = adapter_dir / file_name
    atomic_save_safetensors(out, weights, metadata)
    atomic_write_json(adapter_dir / CONFIG_FILE, adapter_config_dict(model, config, extra))
    return out


def load_adapter_weights(model: nn.Module, weights_file: Path,
                         select: Callable[[dict], dict] | None = None) -> int | None:
    """Load adapter tensors into a model that already has LoRA layers; returns the saved step.

    Every adapter tensor of the model must be in the file with the right shape, and the file
    must hold nothing else; otherwise a ValueError names the offending tensors. `select`
    (used by `qwen2_mlx.parallel`) picks and slices the file's tensors for a model that holds
    part of the layers before that check.
    """
    try:
        weights, metadata = mx.load(str(weights_file), return_metadata=True)
    except Exception as e:  # MLX raises RuntimeError/ValueError on a damaged file
        raise ValueError(f"cannot read adapter weights {weights_file}: {e}") from e
    if select is not None:
        weights = select(weights)
    expected = adapter_weights(model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [f"{k}: file {tuple(weights[k].shape)}, model {tuple(expected[k].shape)}"
             for k in sorted(set(expected) & set(weights)) if weights[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append("missing: " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append("unexpected: " + ", ".join(unexpected[:8])
                        + (" ..." if len(unexpected) > 8 else ""))
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong[:8]))
    if problems:
        raise ValueError(f"the adapter {weights_file} does not fit this model ("
                         + " | ".join(problems) + ")")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    step = metadata.get("step")
    return int(step) if step is not None else None


def load_adapter(model: nn.Module, adapter_path: str | os.PathLike) -> nn.Module:
    """Add the LoRA adapter at `adapter_path` to `model` (not fused) and return the model.

    `adapter_path` is a directory with adapters.safetensors and adapter_config.json (written by
    `qwen2-mlx lora` or by mlx-lm), or one of its checkpoint files
    (``0000100_adapters.safetensors``). The model is left in eval mode (no dropout).
    """
    weights_file, config_file = resolve_adapter_files(adapter_path)
    config, data = read_adapter_config(config_file)
    base = (data.get("qwen2_mlx") or {}).get("base_model")
    trained_on = f"; it was trained on {base}" if base else ""
    had_adapters = bool(lora_layers(model))
    try:
        try:
            apply_lora(model, config)
        except ValueError as e:
            raise ValueError(f"the adapter {adapter_path} does not fit this model: "
                             f"{e}{trained_on}") from e
        try:
            load_adapter_weights(model, weights_file)
        except ValueError as e:
            raise ValueError(f"{e}{trained_on}") from e
    except ValueError:
        if not had_adapters:
            remove_lora(model)  # leave the model as it was
        raise
    model.eval()
    return model
