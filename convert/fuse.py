"""`fuse_model`: a base model plus a LoRA adapter, merged and written as a model directory.

The merge is `qwen2_mlx.lora.fuse_adapters`; the directory is written like `convert` writes
one (shards, index, atomic rename, the umask's permissions), and a quantized result records its
layout in config.json the way mlx-lm does (``"quantization": {"group_size", "bits", "mode"}``,
per-module entries where a layer differs and ``false`` for float layers), which
`qwen2_mlx.load` reads back.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import mlx.nn as nn
from mlx.utils import tree_flatten

from qwen2_mlx.convert.save import (
    ShardedWriter,
    atomic_output_dir,
    check_not_source,
    check_output_free,
)
from qwen2_mlx.loader import load, load_config, resolve_model_path
from qwen2_mlx.lora.adapters import load_adapter
from qwen2_mlx.lora.fuse import QUANTIZED_TYPES, fuse_adapters
from qwen2_mlx.moe import SwitchLinear


def quantization_config(model: nn.Module) -> dict | None:
    """mlx-lm's config.json "quantization" entry for `model`, or None for a float model."""
    settings = {name: (m.group_size, m.bits, m.mode) for name, m in model.named_modules()
                if isinstance(m, QUANTIZED_TYPES)}
    if not settings:
        return None
    (group_size, bits, mode), _ = Counter(settings.values()).most_common(1)[0]
    config: dict = {"group_size": group_size, "bits": bits, "mode": mode}
    for name, (g, b, md) in settings.items():
        if (g, b, md) != (group_size, bits, mode):
            config[name] = {"group_size": g, "bits": b, "mode": md}
    for name, m in model.named_modules():
        if name and isinstance(m, nn.Linear | nn.Embedding | SwitchLinear):
            config[name] = False
    return config


def save_model(model: nn.Module, save_path: str | os.PathLike, config: dict,
               tokenizer=None, *, force: bool = False) -> Path:
    """Write `model` as a model directory: weights by Hugging Face name in shards of at most
    5 GB with an index, config.json (with the model's quantization entry) and the tokenizer
    files. The directory appears only once complete; an existing one is replaced only with
    `force`."""
    out = Path(save_path)
    quantization = quantization_config(model)
    config = {k: v for k, v in config.items()
              if k not in ("quantization", "quantization_config")}
    if quantization is not None:
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    bits = {name: m.bits for name, m in model.named_modules() if isinstance(m, QUANTIZED_TYPES)}
    weights = tree_flatten(model.parameters())
    with atomic_output_dir(out, force=force) as tmp:
        writer = ShardedWriter(tmp, order=[name for name, _ in weights])
        for name, array in weights:
            writer.add(name, array, bits.get(name.rsplit(".", 1)[0]))
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def fuse_model(model_path: str | os.PathLike, adapter_path: str | os.PathLike,
               save_path: str | os.PathLike, *, dequantize: bool = False,
               dtype: str | None = None, force: bool = False) -> Path:
    """Load `model_path`, add the adapter at `adapter_path`, merge it and write the result to
    `save_path`, a model directory that `qwen2_mlx.load` and `qwen2-mlx generate` read.

    The output dtype is the base's (or `dtype`). Quantized bases loaded on the CPU backend
    compute in float32, so their de-quantized output is float32 there.
    """
    source = resolve_model_path(model_path)
    check_not_source(save_path, source, "the base model")
    check_output_free(Path(save_path), force)  # before the work, not after it
    model, tokenizer = load(source, dtype=dtype)
    load_adapter(model, adapter_path)
    fuse_adapters(model, dequantize=dequantize)
    return save_model(model, save_path, load_config(source), tokenizer, force=force)
