"""Convert Hugging Face Qwen2 checkpoints to MLX models, in float or quantized.

    >>> from qwen2_mlx.convert import convert
    >>> convert("Qwen/Qwen2-0.5B-Instruct", "qwen2-0.5b-4bit", quantize=True, q_bits=4)
"""

from qwen2_mlx.convert.convert import ConversionResult, convert
from qwen2_mlx.convert.quantize import RECIPES, plan_quantization, quantize_model
from qwen2_mlx.convert.save import DiskFullError

__all__ = [
    "RECIPES",
    "ConversionResult",
    "DiskFullError",
    "convert",
    "plan_quantization",
    "quantize_model",
]
