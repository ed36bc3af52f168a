"""Quantize a loaded float base model in memory for QLoRA (adapters over a 4-bit base).

The recipe is the converter's (`qwen2_mlx.convert.quantize_model`), so QLoRA trains against
the same weights `qwen2-mlx convert -q` would write; in a Qwen2-MoE model the router and the
shared-expert gate stay in float (`moe.moe_quant_predicate`). MLX's CPU backend runs quantized
matmuls much faster with float32 activations than with half precision ones, so on Linux load
the model in float32 before quantizing (the scales, and so the activations, take the weights'
dtype); on Apple GPUs float16 or bfloat16 is the usual choice.
"""

from __future__ import annotations

import mlx.nn as nn


def quantize_base(model: nn.Module, bits: int = 4, group_size: int = 64) -> nn.Module:
    """Quantize `model` in place with the converter's default recipe; returns it."""
    from qwen2_mlx.convert.quantize import quantize_model
    from qwen2_mlx.moe import moe_quant_predicate

    config = getattr(model, "config", None)
    is_moe = getattr(config, "model_type", None) == "qwen2_moe"
    quantize_model(model, {}, group_size=group_size, bits=bits,
                   quant_predicate=moe_quant_predicate if is_moe else None)
    return model
