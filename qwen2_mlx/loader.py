"""Find a model (local directory or Hugging Face repo), read its config and weights, build it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from qwen2_mlx.config import ModelConfig
from qwen2_mlx.fingerprint import model_source
from qwen2_mlx.metal_kernels.quantized import use_kernel_linears
from qwen2_mlx.model import Model
from qwen2_mlx.model_files import (  # noqa: F401  (the loader's public names, re-exported)
    MODEL_FILE_PATTERNS,
    ModelNotFoundError,
    load_config,
    resolve_model_path,
    weight_files,
)
from qwen2_mlx.moe import cast_experts_for_backend
from qwen2_mlx.quantization import QUANTIZATION_BITS, QUANTIZATION_GROUP_SIZES


def load_weights(model_path: Path) -> dict[str, mx.array]:
    """All tensors of a checkpoint, by Hugging Face name (loaded lazily by MLX)."""
    weights: dict[str, mx.array] = {}
    for file in weight_files(model_path):
        try:
            weights.update(mx.load(str(file)))
        except Exception as e:  # MLX raises RuntimeError/ValueError for a damaged file
            raise ValueError(f"cannot read weights from {file}: the file is truncated or corrupt "
                             f"({e})") from e
    return weights


def check_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Raise an error naming every missing, unexpected or wrongly shaped tensor."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(weights[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(weights))
        if weights[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append("missing tensors: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(unexpected))
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong))
    if problems:
        raise ValueError("checkpoint does not match the model config: " + " | ".join(problems))


def _as_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype | None:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    names = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {', '.join(names)}, got {dtype!r}")
    return names[dtype]


def compute_dtype_for_backend() -> mx.Dtype | None:
    """The float dtype a quantized model should compute in on this process's MLX backend.

    On MLX's CPU backend the quantized matmul runs in the activation dtype: with float32
    activations it is ~8-9x faster and ~4x more accurate than with bfloat16 activations (mlx
    0.32.4, Qwen2-0.5B q8 g64: last-position logit rms error vs torch float32 4.5e-2 with
    float32 activations, 1.95e-1 with bfloat16; see the project's notes "MLX on the Linux CPU
    backend: measured facts"). So on CPU the scales, biases and unquantized floats are kept
    in float32, which makes the activations float32. On a GPU (Metal, or CUDA) the
    half-precision quantized kernels are the fast path: None keeps the checkpoint's dtype.
    The choice follows the device MLX computes on now (`mx.default_device()`), so a Mac run
    pinned to the CPU also gets float32.
    """
    if mx.default_device().type == mx.cpu:
        return mx.float32
    return None


def quantization_settings(config: dict[str, Any]) -> dict[str, Any] | None:
    """The MLX quantization block of a config.json, or None for a float checkpoint.

    mlx-lm writes `quantization` = {group_size, bits, mode, "<layer path>": {...} | false}
    and mirrors it as `quantization_config`; other `quantization_config`s (AWQ, GPTQ,
    bitsandbytes, fp8, ...) carry a `quant_method` and are not MLX layouts.
    """
    block = config.get("quantization")
    if block is None:
        legacy = config.get("quantization_config")
        if not legacy:
            return None
        if "quant_method" in legacy or not {"group_size", "bits"} <= set(legacy):
            method = legacy.get("quant_method", "unknown")
            raise ValueError(
                f"unsupported quantization_config (quant_method {method!r}): qwen2-mlx loads "
                "float checkpoints and MLX affine-quantized ones (config.json 'quantization' "
                "with group_size and bits); convert the float model with `qwen2-mlx convert -q`"
            )
        block = legacy
    if not isinstance(block, dict) or not {"group_size", "bits"} <= set(block):
        raise ValueError(f"config.json 'quantization' must hold group_size and bits, got {block!r}")
    return block


def _check_quantization(path: str, params: dict[str, Any]) -> dict[str, Any]:
    mode = params.get("mode", "affine")
    if mode == "affine" and (
        params["bits"] not in QUANTIZATION_BITS
        or params["group_size"] not in QUANTIZATION_GROUP_SIZES
    ):
        raise ValueError(
            f"{path}: {params['bits']}-bit quantization with group size {params['group_size']} "
            f"is not supported (bits {QUANTIZATION_BITS}, group sizes {QUANTIZATION_GROUP_SIZES})"
        )
    return {"group_size": params["group_size"], "bits": params["bits"], "mode": mode}


def layer_quantization(
    path: str, module: nn.Module, block: dict[str, Any], weights: dict[str, mx.array]
) -> dict[str, Any] | None:
    """How the layer at `path` is stored: {group_size, bits, mode}, or None when in float.

    A per-layer entry in `block` wins (a dict, or false for a layer left in float). Otherwise
    a layer is quantized iff the checkpoint has its `.scales`, and its bits and group size are
    read from the packed shapes, as mlx-lm does, so a layer the top-level default does not
    describe (e.g. one skipped or re-quantized) still loads.
    """
    if not hasattr(module, "to_quantized"):
        return None
    entry = block.get(path)
    if entry is False:
        return None
    if isinstance(entry, dict):
        merged = {"mode": block.get("mode", "affine"), **entry}
        return _check_quantization(path, merged)
    scales = weights.get(f"{path}.scales")
    packed = weights.get(f"{path}.weight")
    if scales is None or packed is None:
        return None
    in_dims = module.weight.shape[-1]
    # uint32 words hold 32 // bits values along the input dimension, one scale per group.
    inferred = {
        "group_size": in_dims // max(scales.shape[-1], 1),
        "bits": packed.shape[-1] * 32 // in_dims,
        "mode": block.get("mode", "affine"),
    }
    return _check_quantization(path, inferred)


def quantize_for_checkpoint(
    model: nn.Module, block: dict[str, Any], weights: dict[str, mx.array]
) -> list[str]:
    """Swap in QuantizedLinear/QuantizedEmbedding where the checkpoint is quantized.

    Must run before the weights are loaded, so the packed tensors find matching parameters.
    Returns the paths of the quantized layers.
    """
    plan = {
        path: params
        for path, module in model.named_modules()
        if (params := layer_quantization(path, module, block, weights)) is not None
    }
    nn.quantize(model, class_predicate=lambda path, _: plan.get(path, False))
    return sorted(plan)


# A process's part of a model (qwen2_mlx.parallel): `shard(model, weights) -> weights` cuts
# the built, not yet loaded model to this process's part and returns the checkpoint tensors
# that part loads (lazy: tensors it drops are never read from disk).
Shard = Callable[[nn.Module, dict[str, mx.array]], dict[str, mx.array]]


def load_model(
    model_path: Path, dtype: str | mx.Dtype | None = None, shard: Shard | None = None
) -> Model:
    """Build the model from a local directory and load its weights.

    Float checkpoints keep their on-disk dtype unless `dtype` is given. Quantized MLX
    checkpoints (a `quantization` block in config.json, as qwen2-mlx and mlx-lm write) get
    quantized layers; their floats (scales, biases, norms) take `dtype` when given, else
    `compute_dtype_for_backend()` (float32 on CPU, as stored on Metal). `shard` (see `Shard`)
    loads one process's part of the model for `qwen2_mlx.parallel`.
    """
    raw_config = load_config(model_path)
    config = ModelConfig.from_dict(raw_config)
    model = Model(config)
    weights = model.sanitize(load_weights(model_path))
    block = quantization_settings(raw_config)
    if block is not None:
        quantize_for_checkpoint(model, block, weights)
    if shard is not None:
        weights = shard(model, weights)
    target = _as_dtype(dtype)
    if target is None and block is not None:
        target = compute_dtype_for_backend()
    if target is not None:
        weights = {
            k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }
    check_weights(model, weights)
    model.load_weights(list(weights.items()), strict=True)
    # MLX's CPU gather_mm is float32-only: keep half-precision experts in float32 there,
    # once, instead of casting the selected experts at every step.
    cast_experts_for_backend(model)
    if block is not None:
        use_kernel_linears(model)  # quantized layers dispatch to the decode kernels
    mx.eval(model.parameters())
    model.eval()
    return model


def load(
    path_or_repo: str | os.PathLike,
    *,
    dtype: str | mx.Dtype | None = None,
    adapter_path: str | os.PathLike | None = None,
    revision: str | None = None,
    dca: bool = False,
    chunk_size: int | None = None,
    local_size: int | None = None,
    yarn_factor: float | None = None,
):
    """Load a Qwen2 model and its tokenizer.

    Args:
        path_or_repo: a local model directory or a Hugging Face repo id
            (e.g. ``"Qwen/Qwen2-0.5B-Instruct"``), downloaded into the HF cache when needed.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` to cast floating weights;
            ``None`` keeps a float checkpoint's dtype, and runs a quantized one in
            ``compute_dtype_for_backend()`` (float32 on CPU, the checkpoint's dtype on Metal).
        adapter_path: a LoRA adapter directory to apply on top of the weights.
        revision: a Hub branch, tag or commit.
        dca, chunk_size, local_size: switch on Dual Chunk Attention (see
            `Model.set_long_context`) for a model whose config lacks it.
        yarn_factor: switch on static YaRN with this factor instead.

    Returns:
        ``(model, tokenizer)``.
    """
    from qwen2_mlx.tokenizer import Qwen2Tokenizer

    model_path = resolve_model_path(path_or_repo, revision=revision)
    model = load_model(model_path, dtype=dtype)
    if dca or yarn_factor is not None or chunk_size is not None or local_size is not None:
        model.set_long_context(dca=dca, chunk_size=chunk_size, local_size=local_size,
                               yarn_factor=yarn_factor)
    if adapter_path is not None:
        from qwen2_mlx.lora import load_adapter

        load_adapter(model, adapter_path)
    # What a saved chat session is checked against (qwen2_mlx.fingerprint).
    model.source = model_source(model_path, weight_files(model_path), adapter_path)
    tokenizer = Qwen2Tokenizer.from_pretrained(model_path)
    return model, tokenizer
