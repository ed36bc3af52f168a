"""The quantization settings qwen2-mlx reads and writes: MLX's affine quantization, which the
loader, the converter and QLoRA share (a neutral module, so none of them imports another)."""

from __future__ import annotations

# Affine quantization settings MLX's kernels implement (mx.quantize raises for others).
QUANTIZATION_BITS = (2, 3, 4, 5, 6, 8)
QUANTIZATION_GROUP_SIZES = (32, 64, 128)


def check_quantization(bits: int, group_size: int) -> None:
    """Raise ValueError unless MLX's affine quantization supports `bits` and `group_size`."""
    if bits not in QUANTIZATION_BITS:
        raise ValueError(
            f"quantization bits must be one of {', '.join(map(str, QUANTIZATION_BITS))}, "
            f"got {bits!r}"
        )
    if group_size not in QUANTIZATION_GROUP_SIZES:
        raise ValueError(
            "quantization group size must be one of "
            f"{', '.join(map(str, QUANTIZATION_GROUP_SIZES))}, got {group_size!r}"
        )
