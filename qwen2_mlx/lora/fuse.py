"""Merge LoRA adapters into the base weights (`fuse_adapters`).

Each adapted layer becomes ``W + scale * (lora_a @ lora_b).T`` (per expert for MoE experts;
DoRA: rescaled to its magnitude). A quantized base is de-quantized, merged and re-quantized
with its own group size, bits and mode; that second rounding is the quality loss users report
after fusing QLoRA adapters (mlx-examples #488, #425), so `dequantize=True` writes float
weights instead, which equal the adapter model up to float rounding. Writing the merged model
as a directory is the converter's (`qwen2_mlx.convert.fuse_model`, `save_model`).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

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
