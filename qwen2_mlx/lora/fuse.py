"""Merge LoRA adapters into the base weights and write a standalone model directory.

Each adapted layer becomes ``W + scale * (lora_a @ lora_b).T`` (per expert for MoE experts;
DoRA: rescaled to its magnitude). A quantized base is de-quantized, merged and re-quantized
with its own group size, bits and mode; that second rounding is the quality loss users report
after fusing QLoRA adapters (mlx-examples #488, #425), so `dequantize=True` writes float
weights instead, which equal the adapter model up to float rounding.

The directory is written like `qwen2-mlx convert` writes one (shards, index, atomic rename);
a quantized result records its layout in config.json the way mlx-lm does
(``"quantization": {"group_size", "bits", "mode"}``, per-module entries where a layer
differs and ``false`` for float layers), which `qwen2_mlx.load` reads back.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from qwen2_mlx.lora.adapters import load_adapter
from qwen2_mlx.lora.layers import LoRAAdapter
from qwen2_mlx.moe import QuantizedSwitchLinear, SwitchLinear

QUANTIZED_TYPES = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)


def _dequantized(module: nn.Module) -> nn.Module:
    weight = mx.dequantize(module.weight, module.scales, module.get("biases"),
                           group_size=module.group_size, bits=module.bits, mode=module.mode)
    if isinstance(module, nn.QuantizedEmbedding):
        layer = nn.Embedding(*weight.shape)
    elif isinstance(module, QuantizedSwitchLinear):
        experts, out_dims, in_dims = weight.shape
        layer = SwitchLinear(in_dims, out_dims, experts)
    else:
        out_dims, in_dims = weight.shape
        layer = nn.Linear(in_dims, out_dims, bias="bias" in module)
        if "bias" in module:
            layer.bias = module.bias
    layer.weight = weight
    return layer


def fuse_adapters(model: nn.Module, *, dequantize: bool = False) -> nn.Module:
    """Replace every LoRA layer of `model` by its merged base layer, in place.

    With `dequantize`, every quantized layer of the model (adapted or not) becomes float, so
    the result is a plain float model. Returns the model in eval mode.
    """
    fused = [(name, m.fused(dequantize)) for name, m in model.named_modules()
             if isinstance(m, LoRAAdapter)]
    if not fused:
        raise ValueError("the model has no LoRA adapters to fuse")
    model.update_modules(tree_unflatten(fused))
    if dequantize:
        quantized = [(name, _dequantized(m)) for name, m in model.named_modules()
                     if isinstance(m, QUANTIZED_TYPES)]
        if quantized:
            model.update_modules(tree_unflatten(quantized))
    model.eval()
    mx.eval(model.parameters())
    return model


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
    from qwen2_mlx.convert.save import ShardedWriter, atomic_output_dir

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
    from qwen2_mlx.convert.save import check_not_source, check_output_free
    from qwen2_mlx.loader import load, load_config, resolve_model_path

    source = resolve_model_path(model_path)
    check_not_source(save_path, source, "the base model")
    check_output_free(Path(save_path), force)  # before the work, not after it
    model, tokenizer = load(source, dtype=dtype)
    load_adapter(model, adapter_path)
    fuse_adapters(model, dequantize=dequantize)
    return save_model(model, save_path, load_config(source), tokenizer, force=force)
