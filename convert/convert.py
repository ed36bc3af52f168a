"""`convert()`: a Hugging Face Qwen2 checkpoint -> an MLX model directory, float or quantized.

The conversion streams: each input shard is read lazily, its tensors are renamed by the model
class's `sanitize`, cast, quantized one at a time and queued for the current output shard,
which is written once it reaches the shard size. Peak memory is therefore about one output
shard plus one tensor in flight, not the whole model.

Quantizing a tensor here is the same `mx.quantize` call mlx-lm makes (after the same cast),
so for the same input, dtype and settings the output tensors are identical to mlx-lm's.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from qwen2_mlx.config import ModelConfig
from qwen2_mlx.convert.download import fetch_checkpoint
from qwen2_mlx.convert.quantize import (
    DEFAULT_BITS,
    DEFAULT_GROUP_SIZE,
    RECIPES,
    QuantizationPlan,
    QuantPredicate,
    bits_per_weight,
    check_quantization,
    plan_quantization,
    quantize_weight,
    recipe_predicate,
)
from qwen2_mlx.convert.save import (
    MAX_SHARD_BYTES,
    ShardedWriter,
    atomic_output_dir,
    check_not_source,
    check_output_free,
    format_bytes,
    parse_size,
)
from qwen2_mlx.convert.weights import parameter_names, stream_model_weights
from qwen2_mlx.model import Model
from qwen2_mlx.model_files import load_config, weight_files
from qwen2_mlx.tokenizer import TOKENIZER_FILES

CONVERTIBLE_MODEL_TYPES = ("qwen2", "qwen2_moe")
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


@dataclass
class ConversionResult:
    """What `convert()` wrote."""

    path: Path
    files: list[str]
    total_size: int
    total_parameters: int
    dtype: str | None
    quantized_layers: list[str] = field(default_factory=list)
    left_in_float: dict[str, str] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return bits_per_weight(self.total_size, self.total_parameters)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _target_dtype(dtype: str | None, config: dict[str, Any]) -> str | None:
    """--dtype, else the checkpoint's declared dtype (4.x `torch_dtype`, 5.x `dtype`).

    None keeps each tensor's stored dtype (a config that declares none).
    """
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return dtype
    for key in ("torch_dtype", "dtype"):
        if config.get(key) in DTYPES:
            return config[key]
    return None


def check_source_config(config: dict[str, Any], source: Path) -> None:
    """Refuse model types this project does not run and already-quantized checkpoints."""
    model_type = config.get("model_type")
    if model_type not in CONVERTIBLE_MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type {model_type!r} cannot be converted; qwen2-mlx converts "
            f"{' and '.join(CONVERTIBLE_MODEL_TYPES)} checkpoints"
        )
    if "quantization" in config or "quantization_config" in config:
        raise ValueError(
            f"{source} is already quantized (its config.json has a quantization block); "
            "convert the float checkpoint it was made from"
        )


def build_model(config: dict[str, Any]) -> nn.Module:
    """The model skeleton for `config`; its parameters stay lazy (never computed)."""
    return Model(ModelConfig.from_dict(config))


def convert(
    hf_path: str | os.PathLike,
    mlx_path: str | os.PathLike = "mlx_model",
    *,
    quantize: bool = False,
    q_group_size: int | None = None,
    q_bits: int | None = None,
    dtype: str | None = None,
    quant_predicate: str | QuantPredicate | None = None,
    force: bool = False,
    revision: str | None = None,
    max_shard_size: int | str = MAX_SHARD_BYTES,
    log: Callable[[str], None] | None = _stderr,
) -> ConversionResult:
    """Convert a Hugging Face Qwen2 checkpoint into an MLX model directory.

    Args:
        hf_path: a local checkpoint directory (read in place) or a Hub repo id (downloaded
            into the Hugging Face cache, safetensors/config/tokenizer files only).
        mlx_path: the output directory; refused if it exists unless `force`.
        quantize: quantize Linear layers and the embedding (MLX affine quantization).
        q_group_size: 32, 64 or 128 (default 64); needs `quantize`.
        q_bits: 2, 3, 4, 5, 6 or 8 (default 4); needs `quantize`.
        dtype: "float16", "bfloat16" or "float32" for the float tensors (scales included);
            default: the checkpoint's declared dtype.
        quant_predicate: a recipe name from `RECIPES` (e.g. "mixed_4_6") or a predicate
            `(path, module) -> bool | dict`; needs `quantize`.
        force: replace an existing `mlx_path` (only once the new model is complete).
        revision: Hub branch, tag or commit.
        max_shard_size: largest output file, bytes or a string like "5GB".
        log: receives progress lines (default: stderr); None for silence.

    Returns:
        A ConversionResult (files written, size, bits per weight, layers left in float).
    """
    log = log or (lambda _: None)
    if not quantize and (q_group_size or q_bits or quant_predicate):
        raise ValueError("q_group_size, q_bits and quant_predicate need quantize=True")
    group_size = q_group_size or DEFAULT_GROUP_SIZE
    bits = q_bits or DEFAULT_BITS
    if quantize:
        check_quantization(bits, group_size)
    if isinstance(quant_predicate, str) and quant_predicate not in RECIPES:
        raise ValueError(
            f"unknown quantization recipe {quant_predicate!r}; known: {', '.join(RECIPES)}"
        )
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    max_shard_bytes = parse_size(max_shard_size)
    output = Path(mlx_path).expanduser()
    check_output_free(output, force)

    source = fetch_checkpoint(hf_path, revision=revision)
    check_not_source(output, source)
    config = load_config(source)
    check_source_config(config, source)
    model = build_model(config)
    target = _target_dtype(dtype, config)

    float_names = parameter_names(model)
    float_shapes = {k: v.shape for k, v in tree_flatten(model.parameters())}
    plan: QuantizationPlan | None = None
    if quantize:
        predicate = quant_predicate
        if isinstance(predicate, str):
            predicate = recipe_predicate(predicate, model, group_size, q_bits)
        plan = plan_quantization(model, group_size, bits, predicate)
        plan.check_quantized()  # before writing anything
        # The quantized skeleton gives the output names in the order mlx-lm writes them.
        nn.quantize(model, class_predicate=lambda path, _: plan.layers.get(path, False))
    output_order = parameter_names(model)

    files = weight_files(source)
    log(f"converting {source} ({len(files)} shard(s)) -> {output}"
        + (f", dtype {target}" if target else "")
        + (f", {bits}-bit group {group_size}" if quantize else "")
        + (f", recipe {quant_predicate}" if isinstance(quant_predicate, str) else ""))
    rank = {name: i for i, name in enumerate(float_names)}
    started = time.perf_counter()
    with atomic_output_dir(output, force=force, log=log) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes, order=output_order, log=log)
        for i, (file, tensors) in enumerate(
            stream_model_weights(model, source, expected=set(float_names)), start=1
        ):
            log(f"[{i}/{len(files)}] {file.name} ({format_bytes(file.stat().st_size)})")
            for name in sorted(tensors, key=rank.__getitem__):
                tensor = tensors.pop(name)
                _write_tensor(writer, name, tensor, float_shapes[name], target, plan)
                del tensor
        written = writer.close()
        _write_config(tmp / "config.json", config, target, plan)
        copied = _copy_tokenizer_files(source, tmp)
        if "tokenizer.json" not in copied:
            log(f"warning: {source} has no tokenizer.json; load() of the output will need one")

    result = ConversionResult(
        path=output,
        files=[f.name for f in written],
        total_size=writer.total_size,
        total_parameters=writer.total_parameters,
        dtype=target,
        quantized_layers=sorted(plan.layers) if plan else [],
        left_in_float=dict(plan.left_in_float) if plan else {},
    )
    log(f"wrote {output}: {len(written)} file(s), {format_bytes(result.total_size)}, "
        f"{result.bits_per_weight:.3f} bits per weight, {time.perf_counter() - started:.1f} s")
    summary = plan.float_summary() if plan is not None else None
    if summary is not None:
        log(f"warning: {summary}")
    return result


def _write_tensor(
    writer: ShardedWriter,
    name: str,
    tensor: mx.array,
    expected_shape: tuple[int, ...],
    target: str | None,
    plan: QuantizationPlan | None,
) -> None:
    if tuple(tensor.shape) != tuple(expected_shape):
        raise ValueError(
            f"checkpoint does not match the model config: {name} has shape "
            f"{tuple(tensor.shape)}, the config implies {tuple(expected_shape)}"
        )
    if target is not None and mx.issubdtype(tensor.dtype, mx.floating):
        tensor = tensor.astype(DTYPES[target])
    module_path, param = name.rsplit(".", 1)
    settings = plan.layers.get(module_path) if plan is not None else None
    if settings is None or param != "weight":
        writer.add(name, tensor)
        return
    for part, value in quantize_weight(tensor, settings).items():
        writer.add(f"{module_path}.{part}", value, bits=settings["bits"] if part == "weight"
                   else None)


def _write_config(
    file: Path, config: dict[str, Any], target: str | None, plan: QuantizationPlan | None
) -> None:
    """The source config, with the dtype written and, when quantized, mlx-lm's
    `quantization` block mirrored as `quantization_config`."""
    config = dict(config)
    config.pop("_name_or_path", None)
    _add_rope_keys_of_transformers_4(config)
    if target is not None:
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = target
    if plan is not None:
        config["quantization"] = plan.config_block()
        config["quantization_config"] = plan.config_block()
    file.write_text(json.dumps(dict(sorted(config.items())), indent=4) + "\n")


def _add_rope_keys_of_transformers_4(config: dict[str, Any]) -> None:
    """Also spell RoPE settings as top-level `rope_theta`/`rope_scaling`.

    transformers 5 nests them in `rope_parameters`; readers of the 4.x spelling (mlx-lm
    among them) would otherwise fall back to their default theta and compute wrong logits.
    """
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind != "default" and config.get("rope_scaling") is None:
        config["rope_scaling"] = {"type": kind, **scaling}


def _copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    """Copy the tokenizer and generation files the source has; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, destination / name)
            copied.append(name)
    return copied
