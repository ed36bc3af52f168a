"""LoRA / DoRA adapters for Qwen2 models in MLX: the layers, the adapter files, merging.

    >>> from qwen2_mlx import load
    >>> from qwen2_mlx.lora import LoRAConfig, apply_lora, load_adapter
    >>> model, tokenizer = load("Qwen/Qwen2-0.5B-Instruct")
    >>> apply_lora(model, LoRAConfig(rank=8, alpha=16))     # fresh adapters, to train
    >>> load_adapter(model, "adapters")                     # or trained ones, to use

`adapters_disabled(model)` turns all adapters off for a reference pass and `fuse_adapters`
merges them into the weights. Training them is `qwen2_mlx.train` (fine-tuning) and
`qwen2_mlx.dpo` (preference tuning); writing a fused model is `qwen2_mlx.convert.fuse_model`.
Nothing here imports the loader, the converter or the trainers, so `load(adapter_path=...)`
pulls in only these modules.
"""

from qwen2_mlx.lora.adapters import load_adapter, save_adapter
from qwen2_mlx.lora.fuse import fuse_adapters
from qwen2_mlx.lora.layers import (
    LoRAConfig,
    LoRALinear,
    adapters_disabled,
    apply_lora,
    lora_layers,
    remove_lora,
    trainable_parameter_count,
)

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "adapters_disabled",
    "apply_lora",
    "fuse_adapters",
    "load_adapter",
    "lora_layers",
    "remove_lora",
    "save_adapter",
    "trainable_parameter_count",
]
