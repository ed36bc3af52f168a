"""Merge LoRA adapters into the base weights and write a standalone model directory.

Each adapted projection becomes ``W + scale * (lora_a @ lora_b).T`` (DoRA: rescaled to its
magnitude). A quantized base is de-quantized, merged and re-quantized with its own group
size, bits and mode; that second rounding is the quality loss users report after fusing
QLoRA adapters (mlx-examples #488, #425), so `dequantize=True` writes float weights instead,
which equal the adapter model up to float rounding.

A quantized output records its quantization in config.json the way mlx-lm does
(``"quantization": {"group_size", "bits", "mode"}``, with per-module entries where a layer
differs and ``false`` for float layers).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from qwen2_mlx.lora.adapters import atomic_save_safetensors, atomic_write_json, load_adapter
from qwen2_mlx.lora.layers import LoRALinear

MAX_SHARD_BYTES = 5 * 2**30


def _dequantized(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.QuantizedLinear):
        weight = mx.dequantize(module.weight, module.scales, module.get("biases"),
                               group_size=module.group_size, bits=module.bits, mode=module.mode)
        out_dims, in_dims = weight.shape
        linear = nn.Linear(in_dims, out_dims, bias="bias" in module)
        linear.weight = weight
        if "bias" in module:
            linear.bias = module.bias
        return linear
    if isinstance(module, nn.QuantizedEmbedding):
        weight = mx.dequantize(module.weight, module.scales, module.get("biases"),
                               group_size=module.group_size, bits=module.bits, mode=module.mode)
        embedding = nn.Embedding(*weight.shape)
        embedding.weight = weight
        return embedding
    return module


def fuse_adapters(model: nn.Module, *, dequantize: bool = False) -> nn.Module:
    """Replace every LoRA layer of `model` by its merged base layer, in place.

    With `dequantize`, every quantized layer of the model (adapted or not) becomes float, so
    the result is a plain float model. Returns the model (in eval mode, nothing trainable
    left behind).
    """
    fused = [(name, m.fused(dequantize)) for name, m in model.named_modules()
             if isinstance(m, LoRALinear)]
    if not fused:
        raise ValueError("the model has no LoRA adapters to fuse")
    model.update_modules(tree_unflatten(fused))
    if dequantize:
        quantized = [(name, _dequantized(m)) for name, m in model.named_modules()
                     if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding)]
        if quantized:
            model.update_modules(tree_unflatten(quantized))
    model.unfreeze()
    model.eval()
    mx.eval(model.parameters())
    return model


def quantization_config(model: nn.Module) -> dict | None:
    """mlx-lm's config.json "quantization" entry for `model`, or None for a float model."""
    quantized = {name: m for name, m in model.named_modules()
                 if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding)}
    if not quantized:
        return None
    settings = {name: (m.group_size, m.bits, m.mode) for name, m in quantized.items()}
    (group_size, bits, mode), _ = Counter(settings.values()).most_common(1)[0]
    config: dict = {"group_size": group_size, "bits": bits, "mode": mode}
    for name, (g, b, md) in settings.items():
        if (g, b, md) != (group_size, bits, mode):
            config[name] = {"group_size": g, "bits": b, "mode": md}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear | nn.Embedding) and name:
            config[name] = False
    return config


def save_model(model: nn.Module, save_path: str | os.PathLike, config: dict,
               tokenizer=None) -> Path:
    """Write `model`'s weights (Hugging Face names, sharded at 5 GiB), config.json with the
    model's quantization entry, and the tokenizer files. Returns `save_path`."""
    out = Path(save_path)
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    quantization = quantization_config(model)
    config = {k: v for k, v in config.items()
              if k not in ("quantization", "quantization_config")}
    if quantization is not None:
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    # Float output stays readable by transformers (safetensors "pt" format tag).
    metadata = {"format": "mlx" if quantization else "pt"}

    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name, array in weights.items():
        if shards[-1] and size + array.nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    for stale in out.glob("model*.safetensors"):
        stale.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    if len(shards) == 1:
        atomic_save_safetensors(out / "model.safetensors", shards[0], metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_save_safetensors(out / name, shard, metadata)
            weight_map.update({k: name for k in shard})
        total = sum(a.nbytes for a in weights.values())
        atomic_write_json(out / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": weight_map})
    atomic_write_json(out / "config.json", config)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def fuse_model(model_path: str | os.PathLike, adapter_path: str | os.PathLike,
               save_path: str | os.PathLike, *, dequantize: bool = False,
               dtype: str | None = None) -> Path:
    """Load `model_path`, add the adapter at `adapter_path`, merge it and write the result to
    `save_path`, a model directory that `qwen2_mlx.load` and `qwen2-mlx generate` read."""
    from qwen2_mlx.loader import load, load_config, resolve_model_path

    source = resolve_model_path(model_path)
    model, tokenizer = load(source, dtype=dtype)
    load_adapter(model, adapter_path)
    fuse_adapters(model, dequantize=dequantize)
    config = load_config(source)
    save_model(model, save_path, config, tokenizer)
    (Path(save_path) / "fused_adapter.json").write_text(
        json.dumps({"base_model": str(model_path), "adapter_path": str(adapter_path),
                    "dequantized": dequantize}, indent=2) + "\n")
    return Path(save_path)
