"""LoRA and DoRA layers around frozen `nn.Linear` / `nn.QuantizedLinear`, and how to apply them.

A wrapped projection computes ``y = base(x) + scale * (dropout(x) @ lora_a) @ lora_b`` with
``lora_a`` (in, rank) and ``lora_b`` (rank, out), the layout and parameter names mlx-lm uses, so
adapter files move between the two projects. ``scale`` is ``alpha / rank`` (PEFT's convention;
mlx-lm asks for the scale itself, and the adapter config records both).

DoRA (Liu et al. 2024, eq. 5) rescales each output row of the adapted weight
``W' = W + scale * (lora_a @ lora_b).T`` to a learned magnitude ``m``:
``y = m / ||W'||_row * (x @ W.T + scale * lora(x)) + bias``, with the norm treated as a constant
in the backward pass (the paper's section 4.3, as PEFT does).

The base weights are never copied: `adapters_disabled(model)` switches every adapter off so the
same arrays give the base model's output (the DPO reference pass).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

ATTENTION_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_TARGETS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Named groups a user can ask for. "all-linear" follows PEFT: every projection inside the
# decoder blocks, not the output head.
TARGET_GROUPS = {
    "attention": ATTENTION_TARGETS,
    "mlp": MLP_TARGETS,
    "all-linear": ATTENTION_TARGETS + MLP_TARGETS,
}
# In MoE blocks the groups leave out the router (mlp.gate) and mlp.shared_expert_gate: mlx-lm
# adapts both by default, which changes routing; name them explicitly to adapt them.

ADAPTER_PARAMETERS = ("lora_a", "lora_b", "m")


@dataclass
class LoRAConfig:
    """What to adapt and how.

    Args:
        rank: rank r of the update ``lora_a @ lora_b``.
        alpha: the update is scaled by ``alpha / rank`` (PEFT's ``lora_alpha``).
        dropout: dropout probability on the adapter's input during training.
        targets: module paths inside a decoder block (``"self_attn.q_proj"``), their short
            names (``"q_proj"``) or groups (``"attention"``, ``"mlp"``, ``"all-linear"``).
        num_layers: adapt only the last `num_layers` blocks (None: all of them).
        dora: weight-decomposed LoRA (adds a trainable magnitude per output feature).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Sequence[str] = ("all-linear",)
    num_layers: int | None = None
    dora: bool = False
    scale: float = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1 (or None for all), got {self.num_layers}")
        if isinstance(self.targets, str):
            self.targets = [t for t in self.targets.split(",") if t.strip()]
        self.targets = tuple(t.strip() for t in self.targets)
        if not self.targets:
            raise ValueError("LoRA targets must name at least one module")
        self.scale = self.alpha / self.rank


def expand_targets(targets: Sequence[str], block_paths: Sequence[str]) -> list[str]:
    """Resolve user target names against the linear-layer paths of one decoder block.

    A group name expands to its members, a full path must exist, and a short name
    ("q_proj") matches every path ending in ".q_proj". Unknown names raise ValueError
    listing what the block has.
    """
    available = list(block_paths)
    chosen: list[str] = []
    for target in targets:
        if target in TARGET_GROUPS:
            matches = [p for p in TARGET_GROUPS[target] if p in available]
            # A MoE block has experts where a dense block has mlp.*_proj.
            if target in ("mlp", "all-linear"):
                matches += [p for p in available if p.startswith("mlp.experts")
                            or p.startswith("mlp.shared_expert.")]
        elif target in available:
            matches = [target]
        else:
            matches = [p for p in available if p.endswith("." + target)]
        if not matches:
            raise ValueError(
                f"LoRA target {target!r} matches no linear layer; a decoder block has "
                f"{', '.join(available)} (groups: {', '.join(TARGET_GROUPS)})"
            )
        chosen.extend(m for m in matches if m not in chosen)
    return chosen


def _linear_dims(base: nn.Module) -> tuple[int, int]:
    """(input_dims, output_dims) of a Linear or QuantizedLinear."""
    out_dims, packed_in = base.weight.shape
    if isinstance(base, nn.QuantizedLinear):
        return packed_in * 32 // base.bits, out_dims
    return packed_in, out_dims


def dense_weight(base: nn.Module) -> mx.array:
    """The (out, in) weight of a Linear, de-quantized for a QuantizedLinear."""
    if isinstance(base, nn.QuantizedLinear):
        return mx.dequantize(base.weight, base.scales, base.get("biases"),
                             group_size=base.group_size, bits=base.bits, mode=base.mode)
    return base.weight


def _matmul_without_bias(base: nn.Module, x: mx.array) -> mx.array:
    if isinstance(base, nn.QuantizedLinear):
        return mx.quantized_matmul(x, base.weight, scales=base.scales, biases=base.get("biases"),
                                   transpose=True, group_size=base.group_size, bits=base.bits,
                                   mode=base.mode)
    return x @ base.weight.T


class LoRALinear(nn.Module):
    """A frozen Linear/QuantizedLinear plus a trainable low-rank update (optionally DoRA).

    The adapter weights are float32 whatever the base dtype, so float16/bfloat16 and
    quantized bases train in full precision; the adapter output is cast back to the base
    output's dtype.
    """

    def __init__(self, base: nn.Module, rank: int = 8, scale: float = 2.0,
                 dropout: float = 0.0, dora: bool = False):
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
            raise ValueError(f"LoRA wraps Linear or QuantizedLinear, got {type(base).__name__}")
        self.base = base
        in_dims, out_dims = _linear_dims(base)
        # Kaiming-uniform bound for A (PEFT and mlx-lm); B = 0 so training starts at the base.
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))
        self.scale = float(scale)
        self.dropout = float(dropout)
        self.enabled = True
        # Set by gradient checkpointing so a recomputed forward redraws the same mask.
        self.dropout_key: mx.array | None = None
        if dora:
            self.m = self.adapted_row_norm()

    @property
    def is_dora(self) -> bool:
        return "m" in self

    def delta_weight(self) -> mx.array:
        """scale * (lora_a @ lora_b).T in float32, shape (out, in)."""
        return self.scale * (self.lora_b.T @ self.lora_a.T)

    def adapted_row_norm(self) -> mx.array:
        """||W + delta||_2 over each output row, float32 (DoRA's denominator)."""
        w = dense_weight(self.base).astype(mx.float32) + self.delta_weight()
        return mx.linalg.norm(w, axis=1)

    def _dropped(self, x: mx.array) -> mx.array:
        if not self.training or self.dropout == 0.0:
            return x
        keep = 1.0 - self.dropout
        mask = mx.random.bernoulli(keep, x.shape, key=self.dropout_key)
        return x * mask * (1.0 / keep)

    def __call__(self, x: mx.array) -> mx.array:
        if not self.enabled:
            return self.base(x)
        z = (self._dropped(x) @ self.lora_a) @ self.lora_b  # float32 (promoted)
        if not self.is_dora:
            y = self.base(x)
            return y + (self.scale * z).astype(y.dtype)
        y = _matmul_without_bias(self.base, x)
        factor = self.m / mx.stop_gradient(self.adapted_row_norm())
        out = (factor * (y + self.scale * z)).astype(y.dtype)
        if "bias" in self.base:
            out = out + self.base.bias
        return out

    def fused(self, dequantize: bool = False) -> nn.Module:
        """The base layer with the update merged in.

        A quantized base is de-quantized, updated and re-quantized with its own group size,
        bits and mode (the second rounding costs accuracy, see fuse.py), or left as a float
        Linear when `dequantize`. The merged weight keeps the base's float dtype.
        """
        weight = dense_weight(self.base)
        merged = weight.astype(mx.float32) + self.delta_weight()
        if self.is_dora:
            merged = (self.m / mx.linalg.norm(merged, axis=1))[:, None] * merged
        out_dims, in_dims = merged.shape
        has_bias = "bias" in self.base
        linear = nn.Linear(in_dims, out_dims, bias=has_bias)
        linear.weight = merged.astype(weight.dtype)
        if has_bias:
            linear.bias = self.base.bias
        if isinstance(self.base, nn.QuantizedLinear) and not dequantize:
            return nn.QuantizedLinear.from_linear(linear, self.base.group_size, self.base.bits,
                                                  mode=self.base.mode)
        return linear


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    """All LoRA layers of `model`, in module order."""
    return [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]


def _blocks(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"{type(model).__name__} has no decoder layers (model.layers) to adapt")
    return layers


def _linear_paths(block: nn.Module) -> list[str]:
    return [name for name, m in block.named_modules()
            if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and name]


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap the targeted projections of `model` in LoRA layers and freeze everything else.

    Only the adapter parameters (lora_a, lora_b and DoRA's m) stay trainable. Returns the
    full paths of the wrapped modules. Raises ValueError when the model already has adapters,
    a target matches nothing, or num_layers exceeds the model's depth.
    """
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters; load a fresh base model")
    blocks = _blocks(model)
    n = config.num_layers or len(blocks)
    if n > len(blocks):
        raise ValueError(f"num_layers is {n} but the model has {len(blocks)} layers")
    block_offset = len(blocks) - n
    wrapped: list[str] = []
    for i, block in enumerate(blocks[block_offset:], start=block_offset):
        paths = expand_targets(config.targets, _linear_paths(block))
        modules = dict(block.named_modules())
        updates = []
        for path in paths:
            layer = LoRALinear(modules[path], config.rank, config.scale, config.dropout,
                               config.dora)
            updates.append((path, layer))
            wrapped.append(f"layers.{i}.{path}")
        block.update_modules(_unflatten_modules(updates))
    model.freeze()
    for layer in lora_layers(model):
        layer.unfreeze(keys=[k for k in ADAPTER_PARAMETERS if k in layer], recurse=False)
    return wrapped


def _unflatten_modules(items: list[tuple[str, nn.Module]]) -> dict:
    """{"self_attn.q_proj": m} -> {"self_attn": {"q_proj": m}}; numeric parts become lists
    the way Module.update_modules expects (e.g. experts lists)."""
    from mlx.utils import tree_unflatten

    return tree_unflatten(items)


def remove_lora(model: nn.Module) -> nn.Module:
    """Put the original base layers back (adapters discarded, nothing merged)."""
    _replace_lora(model, lambda layer: layer.base)
    return model


def _replace_lora(model: nn.Module, make) -> None:
    from mlx.utils import tree_unflatten

    updates = [(name, make(m)) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if updates:
        model.update_modules(tree_unflatten(updates))


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; quantized weights count as unpacked elements."""
    from mlx.utils import tree_flatten

    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = 0
    for _, module in model.named_modules():
        for name, value in module.items():
            if not isinstance(value, mx.array):
                continue
            if isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding):
                if name == "weight":
                    total += value.size * 32 // module.bits
                elif name in ("scales", "biases"):
                    continue
                else:
                    total += value.size
            else:
                total += value.size
    return trainable, total


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every LoRA layer returns its base layer's output unchanged.

    The base weights are shared, so this is the reference model of DPO/KL terms without a
    second copy. Works inside `mx.value_and_grad` (the disabled pass contributes no adapter
    gradient). Raises ValueError when `model` has no adapters.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to disable")
    previous = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous, strict=True):
            layer.enabled = was
