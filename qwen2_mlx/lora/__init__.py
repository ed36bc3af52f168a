"""LoRA / DoRA / QLoRA fine-tuning of Qwen2 models with MLX.

    >>> from qwen2_mlx import load
    >>> from qwen2_mlx.lora import LoRAConfig, TrainingConfig, train
    >>> model, tokenizer = load("Qwen/Qwen2-0.5B-Instruct")
    >>> train(model, tokenizer, "data/", adapter_path="adapters",
    ...       lora=LoRAConfig(rank=8, alpha=16), config=TrainingConfig(iters=600))

`load_adapter(model, path)` adds a trained adapter to a loaded model, `adapters_disabled(model)`
turns all adapters off for a reference pass, and `fuse_adapters` / `fuse_model` merge them.
"""

from qwen2_mlx.lora.adapters import load_adapter, save_adapter
from qwen2_mlx.lora.data import (
    DataFormatError,
    Dataset,
    TruncationWarning,
    load_datasets,
    load_jsonl,
)
from qwen2_mlx.lora.fuse import fuse_adapters, fuse_model, save_model
from qwen2_mlx.lora.layers import (
    LoRAConfig,
    LoRALinear,
    adapters_disabled,
    apply_lora,
    lora_layers,
    remove_lora,
    trainable_parameter_count,
)
from qwen2_mlx.lora.trainer import (
    TrainingConfig,
    TrainingDivergedError,
    TrainingProgress,
    TrainingResult,
    evaluate,
    train,
)

__all__ = [
    "DataFormatError",
    "Dataset",
    "LoRAConfig",
    "LoRALinear",
    "TrainingConfig",
    "TrainingDivergedError",
    "TrainingProgress",
    "TrainingResult",
    "TruncationWarning",
    "adapters_disabled",
    "apply_lora",
    "evaluate",
    "fuse_adapters",
    "fuse_model",
    "load_adapter",
    "load_datasets",
    "load_jsonl",
    "lora_layers",
    "remove_lora",
    "save_adapter",
    "save_model",
    "trainable_parameter_count",
    "train",
]
