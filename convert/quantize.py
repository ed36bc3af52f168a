"""Which layers to quantize, at how many bits: predicates, named mixed recipes, the config block.

MLX affine quantization (`mx.quantize`) packs each group of `group_size` consecutive input
weights of a row into `bits`-bit integers with one float scale and bias per group, so a layer
can only be quantized when its input dimension is a multiple of the group size.

A quantization predicate has mlx-lm's signature `(path, module) -> bool | dict`: False keeps
the layer in float, True uses the default settings, and a dict {group_size, bits, mode} gives
the layer its own settings, which are then written per layer into config.json.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from qwen2_mlx.quantization import (  # noqa: F401  (check_quantization: public here too)
    QUANTIZATION_GROUP_SIZES,
    check_quantization,
)

DEFAULT_GROUP_SIZE = 64
DEFAULT_BITS = 4
MODE = "affine"

QuantPredicate = Callable[[str, nn.Module], "bool | dict[str, Any]"]


class QuantizationWarning(UserWarning):
    """Some layers could not be quantized and stay in float."""


def layer_settings(group_size: int, bits: int) -> dict[str, Any]:
    """One layer's settings in the config.json layout mlx-lm writes."""
    check_quantization(bits, group_size)
    return {"group_size": group_size, "bits": bits, "mode": MODE}


# ------------------------------------------------------------------------- named recipes
def _layer_index(path: str) -> int | None:
    """The decoder layer a module path belongs to ("model.layers.7.mlp..." -> 7)."""
    parts = path.split(".")
    for name, nxt in zip(parts, parts[1:], strict=False):
        if name == "layers" and nxt.isdigit():
            return int(nxt)
    return None


def _llama_cpp_style(low_bits: int, high_bits: int) -> Callable[..., QuantPredicate]:
    """mlx-lm's `mixed_<low>_<high>` recipes, after llama.cpp's Q4_K_M choices.

    v_proj and down_proj get `high_bits` in the first and last eighth of the layers and in
    every third layer in between; lm_head always gets `high_bits`; everything else
    (embedding included) `low_bits`. Same per-layer choices as mlx-lm, so the same recipe
    name gives the same config.json quantization block in both tools.
    """

    def build(model: nn.Module, group_size: int, bits: int | None) -> QuantPredicate:
        n = len(model.layers)
        low = layer_settings(group_size, low_bits)
        high = layer_settings(group_size, high_bits)

        def predicate(path: str, module: nn.Module) -> dict[str, Any]:
            i = _layer_index(path)
            i = 0 if i is None else i  # mlx-lm counts layer-less modules as layer 0
            more_bits = i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2
            if ("v_proj" in path or "down_proj" in path) and more_bits:
                return dict(high)
            if "lm_head" in path:
                return dict(high)
            return dict(low)

        return predicate

    return build


def _embeddings_8_bit(model: nn.Module, group_size: int, bits: int | None) -> QuantPredicate:
    """Token embedding and LM head at 8 bits, every other layer at --q-bits (default 4).

    The embedding and the head touch every token's logits (they are the same matrix when
    tied), and are a small share of a large model's weights, so they get the most bits.
    """
    high = layer_settings(group_size, 8)
    low = layer_settings(group_size, bits or DEFAULT_BITS)

    def predicate(path: str, module: nn.Module) -> dict[str, Any]:
        is_head = path.endswith("embed_tokens") or path.endswith("lm_head")
        return dict(high if is_head else low)

    return predicate


# name -> builder(model, group_size, bits) -> predicate
RECIPES: dict[str, Callable[..., QuantPredicate]] = {
    "mixed_2_6": _llama_cpp_style(2, 6),
    "mixed_3_4": _llama_cpp_style(3, 4),
    "mixed_3_6": _llama_cpp_style(3, 6),
    "mixed_4_6": _llama_cpp_style(4, 6),
    "embeddings_8": _embeddings_8_bit,
}

RECIPE_HELP = {
    "mixed_2_6": "2 bits; 6 for lm_head and v/down_proj in the first/last eighth and every "
                 "third layer (mlx-lm's recipe)",
    "mixed_3_4": "as mixed_2_6 with 3 and 4 bits",
    "mixed_3_6": "as mixed_2_6 with 3 and 6 bits",
    "mixed_4_6": "as mixed_2_6 with 4 and 6 bits",
    "embeddings_8": "embedding and lm_head at 8 bits, the rest at --q-bits",
}


def recipe_predicate(
    name: str, model: nn.Module, group_size: int, bits: int | None = None
) -> QuantPredicate:
    """The predicate of the named recipe (see RECIPES) for `model`."""
    if name not in RECIPES:
        raise ValueError(f"unknown quantization recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name](model, group_size, bits)


# ----------------------------------------------------------------------------------- plan
@dataclass
class QuantizationPlan:
    """Per-layer decisions: `layers` maps a module path to its settings; `left_in_float`
    maps each quantizable layer kept in float to the reason."""

    group_size: int
    bits: int
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    left_in_float: dict[str, str] = field(default_factory=dict)
    configured: set[str] = field(default_factory=set)  # layers a predicate gave settings
    # Layers that could not be quantized: path -> (input dimension, group size).
    indivisible: dict[str, tuple[int, int]] = field(default_factory=dict)

    def check_quantized(self) -> None:
        """Raise ValueError when no layer could be quantized (the result would be a float
        model called quantized)."""
        if self.layers:
            return
        if not self.indivisible:
            raise ValueError("nothing was quantized: the quantization predicate excluded "
                             "every layer")
        dims = sorted({d for d, _ in self.indivisible.values()})
        raise ValueError(
            f"nothing can be quantized with group size {self.group_size}: no layer's input "
            f"dimension ({', '.join(map(str, dims))}) is a multiple of it; choose a group size "
            f"of {', '.join(map(str, QUANTIZATION_GROUP_SIZES))} that divides them")

    def float_summary(self) -> str | None:
        """One line on the layers left in float because their input dimension is not a
        multiple of the group size (None when every such layer was quantized)."""
        if not self.indivisible:
            return None
        total = len(self.layers) + len(self.left_in_float)
        dims = sorted({d for d, _ in self.indivisible.values()})
        names = sorted(self.indivisible)
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return (f"{len(names)} of {total} quantizable layers stay in float: input dimension "
                f"{', '.join(map(str, dims))} is not a multiple of group size "
                f"{self.group_size} ({shown})")

    def config_block(self) -> dict[str, Any]:
        """config.json's `quantization` in mlx-lm's layout.

        Top-level group_size/bits/mode are the defaults; layers a predicate configured get
        their own entry, and layers left in float get `false` (mlx-lm's loader reads both).
        """
        block: dict[str, Any] = {"group_size": self.group_size, "bits": self.bits, "mode": MODE}
        block.update({path: dict(self.layers[path]) for path in sorted(self.configured)})
        block.update({path: False for path in self.left_in_float})
        return block


def _first_decides(
    first: QuantPredicate | None, second: QuantPredicate | None
) -> QuantPredicate | None:
    """`first`'s answer unless it is True (no opinion), then `second`'s."""
    if first is None or second is None:
        return first or second

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        decision = first(path, module)
        return second(path, module) if decision is True else decision

    return predicate


def plan_quantization(
    model: nn.Module,
    group_size: int = DEFAULT_GROUP_SIZE,
    bits: int = DEFAULT_BITS,
    predicate: QuantPredicate | None = None,
) -> QuantizationPlan:
    """Decide each layer's quantization without touching weights.

    Every module with `to_quantized` (Linear, Embedding and their MoE relatives) is
    quantized unless its input dimension is not a multiple of its group size or the
    predicate says no. The model's own `quant_predicate` (if it defines one, e.g. to keep a
    router at 8 bits) decides first; `predicate` decides the layers it leaves at True.
    """
    check_quantization(bits, group_size)
    default = layer_settings(group_size, bits)
    predicate = _first_decides(getattr(model, "quant_predicate", None), predicate)
    plan = QuantizationPlan(group_size=group_size, bits=bits)
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized") or not path:
            continue
        decision = predicate(path, module) if predicate is not None else True
        if decision is False:
            plan.left_in_float[path] = "excluded by the quantization predicate"
            continue
        settings = dict(default)
        if isinstance(decision, dict):
            settings = {**default, **decision}
            check_quantization(settings["bits"], settings["group_size"])
        in_dims = module.weight.shape[-1]
        if in_dims % settings["group_size"]:
            plan.left_in_float[path] = (
                f"input dimension {in_dims} is not a multiple of group size "
                f"{settings['group_size']}"
            )
            plan.indivisible[path] = (in_dims, settings["group_size"])
            continue
        plan.layers[path] = settings
        if isinstance(decision, dict):
            plan.configured.add(path)
    return plan


def quantize_weight(weight: mx.array, settings: dict[str, Any]) -> dict[str, mx.array]:
    """`{"weight": packed uint32, "scales", "biases"}` of one float weight (last axis = input)."""
    packed, scales, biases = mx.quantize(
        weight, group_size=settings["group_size"], bits=settings["bits"], mode=MODE
    )
    return {"weight": packed, "scales": scales, "biases": biases}


def quantize_model(
    model: nn.Module,
    config: dict[str, Any],
    group_size: int = DEFAULT_GROUP_SIZE,
    bits: int = DEFAULT_BITS,
    quant_predicate: QuantPredicate | str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize an in-memory model; returns it and a config carrying the quantization block.

    `quant_predicate` is a predicate or a recipe name from RECIPES. The config gets
    `quantization` and its mirror `quantization_config`, as mlx-lm writes them. Raises
    ValueError when no layer can be quantized; warns (QuantizationWarning, one line) when
    some stay in float because of their dimensions.
    """
    if isinstance(quant_predicate, str):
        quant_predicate = recipe_predicate(quant_predicate, model, group_size, bits)
    plan = plan_quantization(model, group_size, bits, quant_predicate)
    plan.check_quantized()
    summary = plan.float_summary()
    if summary is not None:
        warnings.warn(summary, QuantizationWarning, stacklevel=2)
    nn.quantize(model, class_predicate=lambda path, _: plan.layers.get(path, False))
    config = copy.deepcopy(config)
    config["quantization"] = plan.config_block()
    config["quantization_config"] = plan.config_block()
    return model, config


def bits_per_weight(total_bytes: int, total_parameters: int) -> float:
    """Average stored bits per model parameter (scales, biases and float layers included)."""
    return 8 * total_bytes / max(total_parameters, 1)


def quantize_base(model: nn.Module, bits: int = 4, group_size: int = 64) -> nn.Module:
    """Quantize a loaded float model in place with the default recipe, for QLoRA (adapters
    trained over a quantized base, against the weights `qwen2-mlx convert -q` would write; in
    a Qwen2-MoE model the router and the shared-expert gate stay in float, by the model's own
    `quant_predicate`). On MLX's CPU backend load the model in float32 first: the quantized
    matmul runs much faster with float32 activations than with half-precision ones."""
    quantize_model(model, {}, group_size=group_size, bits=bits)
    return model
