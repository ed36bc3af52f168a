"""Convert Hugging Face Qwen2 checkpoints to MLX models, in float or quantized.

    >>> from qwen2_mlx.convert import convert
    >>> convert("Qwen/Qwen2-0.5B-Instruct", "qwen2-0.5b-4bit", quantize=True, q_bits=4)

`fuse_model` writes a base model with a LoRA adapter merged in, the same way; `quantize_base`
quantizes a loaded model in memory with the same recipe (QLoRA).
"""

from qwen2_mlx.convert.convert import ConversionResult, convert
from qwen2_mlx.convert.fuse import fuse_model, save_model
from qwen2_mlx.convert.quantize import RECIPES, plan_quantization, quantize_base, quantize_model
from qwen2_mlx.convert.save import DiskFullError, OutputExistsError

__all__ = [
    "RECIPES",
    "ConversionResult",
    "DiskFullError",
    "OutputExistsError",
    "convert",
    "fuse_model",
    "plan_quantization",
    "quantize_base",
    "quantize_model",
    "save_model",
]
