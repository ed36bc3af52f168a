"""LoRA and DoRA layers around frozen `nn.Linear` / `nn.QuantizedLinear`, and how to apply them.

A wrapped projection computes ``y = base(x) + scale * (dropout(x) @ lora_a) @ lora_b`` with
``lora_a`` (in, rank) and ``lora_b`` (rank, out), the layout and parameter names mlx-lm uses, so
adapter files move between the two projects. ``scale`` is ``alpha / rank`` (PEFT's convention;
mlx-lm asks for the scale itself, and the adapter config records both).

DoRA (Liu et al. 2024, eq. 5) rescales each output row of the adapted weight
``W' = W + scale * (lora_a @ lora_b).T`` to a learned magnitude ``m``:
``y = m / ||W'||_row * (x @ W.T + scale * lora(x)) + bias``, with the norm treated as a constant
in the backward pass (the paper's section 4.3, as PEFT does).

MoE experts (`SwitchLinear`, E stacked matrices) get one low-rank pair per expert,
``lora_a`` (E, rank, in) and ``lora_b`` (E, out, rank) as in mlx-lm, applied with the same
`gather_mm` routing as the base; DoRA is not offered there. The router (`mlp.gate`) and
`mlp.shared_expert_gate` are left out of every target group.

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
from mlx.utils import tree_flatten, tree_unflatten

from qwen2_mlx.moe import QuantizedSwitchLinear, SwitchLinear

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
    """Resolve user target names against the adaptable-layer paths of one decoder block.

    A group name expands to its members present in the block, a full path matches itself,
    and a short name ("q_proj") matches every path ending in ".q_proj". A name matching
    nothing in this block is skipped (a MoE model mixes dense and expert blocks); apply_lora
    reports names that match no block at all.
    """
    available = list(block_paths)
    chosen: list[str] = []
    for target in targets:
        if target in TARGET_GROUPS:
            matches = [p for p in TARGET_GROUPS[target] if p in available]
            # A MoE block has routed and shared experts where a dense block has mlp.*_proj.
            if target in ("mlp", "all-linear"):
                matches += [p for p in available
                            if p.startswith(("mlp.switch_mlp.", "mlp.shared_expert."))]
        elif target in available:
            matches = [target]
        else:
            matches = [p for p in available if p.endswith("." + target)]
        chosen.extend(m for m in matches if m not in chosen)
    return chosen


LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)
EXPERT_TYPES = (SwitchLinear, QuantizedSwitchLinear)


def _packed_in_dims(base: nn.Module) -> int:
    packed = base.weight.shape[-1]
    quantized = isinstance(base, nn.QuantizedLinear | QuantizedSwitchLinear)
    return packed * 32 // base.bits if quantized else packed


def dense_weight(base: nn.Module) -> mx.array:
    """The float weight of a (Quantized)Linear (out, in) or (Quantized)SwitchLinear
    (E, out, in), de-quantized when needed."""
    if isinstance(base, nn.QuantizedLinear | QuantizedSwitchLinear):
        return mx.dequantize(base.weight, base.scales, base.get("biases"),
                             group_size=base.group_size, bits=base.bits, mode=base.mode)
    return base.weight


def _matmul_without_bias(base: nn.Module, x: mx.array) -> mx.array:
    if isinstance(base, nn.QuantizedLinear):
        return mx.quantized_matmul(x, base.weight, scales=base.scales, biases=base.get("biases"),
                                   transpose=True, group_size=base.group_size, bits=base.bits,
                                   mode=base.mode)
    return x @ base.weight.T


class LoRAAdapter(nn.Module):
    """What all adapter layers share: the frozen `base`, scale, dropout, on/off switch."""

    def __init__(self, base: nn.Module, scale: float, dropout: float):
        super().__init__()
        self.base = base
        self.scale = float(scale)
        self.dropout = float(dropout)
        self.enabled = True
        # Set by gradient checkpointing so a recomputed forward redraws the same mask.
        self.dropout_key: mx.array | None = None

    def _dropped(self, x: mx.array) -> mx.array:
        if not self.training or self.dropout == 0.0:
            return x
        keep = 1.0 - self.dropout
        mask = mx.random.bernoulli(keep, x.shape, key=self.dropout_key)
        return x * mask * (1.0 / keep)

    def delta_weight(self) -> mx.array:
        """The float32 update that merging adds to the base weight."""
        raise NotImplementedError

    def fused(self, dequantize: bool = False) -> nn.Module:
        """The base layer with the update merged in."""
        raise NotImplementedError


class LoRALinear(LoRAAdapter):
    """A frozen Linear/QuantizedLinear plus a trainable low-rank update (optionally DoRA).

    The adapter weights are float32 whatever the base dtype, so float16/bfloat16 and
    quantized bases train in full precision; the adapter output is cast back to the base
    output's dtype.
    """

    def __init__(self, base: nn.Module, rank: int = 8, scale: float = 2.0,
                 dropout: float = 0.0, dora: bool = False):
        if not isinstance(base, LINEAR_TYPES):
            raise ValueError(f"LoRALinear wraps Linear or QuantizedLinear, got "
                             f"{type(base).__name__}")
        super().__init__(base, scale, dropout)
        in_dims, out_dims = _packed_in_dims(base), base.weight.shape[0]
        # Kaiming-uniform bound for A (PEFT and mlx-lm); B = 0 so training starts at the base.
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))
        if dora:
            self.m = self.adapted_row_norm()

    @property
    def is_dora(self) -> bool:
        return "m" in self

    def delta_weight(self) -> mx.array:
        """scale * (lora_a @ lora_b).T, shape (out, in)."""
        return self.scale * (self.lora_b.T @ self.lora_a.T)

    def adapted_row_norm(self) -> mx.array:
        """||W + delta||_2 over each output row, float32 (DoRA's denominator)."""
        w = dense_weight(self.base).astype(mx.float32) + self.delta_weight()
        return mx.linalg.norm(w, axis=1)

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


class LoRASwitchLinear(LoRAAdapter):
    """LoRA on the E stacked experts of a (Quantized)SwitchLinear: one (A, B) per expert.

    ``y = base(x, idx) + scale * (dropout(x) @ lora_a[idx].T) @ lora_b[idx].T``, each row
    through its own experts' pairs with `gather_mm`, as the base routes it.
    """

    def __init__(self, base: nn.Module, rank: int = 8, scale: float = 2.0,
                 dropout: float = 0.0):
        if not isinstance(base, EXPERT_TYPES):
            raise ValueError(f"LoRASwitchLinear wraps SwitchLinear, got {type(base).__name__}")
        super().__init__(base, scale, dropout)
        experts, out_dims = base.weight.shape[:2]
        in_dims = _packed_in_dims(base)
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (experts, rank, in_dims))
        self.lora_b = mx.zeros((experts, out_dims, rank))

    @property
    def is_dora(self) -> bool:
        return False

    def delta_weight(self) -> mx.array:
        """scale * lora_b @ lora_a, shape (E, out, in)."""
        return self.scale * (self.lora_b @ self.lora_a)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = self.base(x, indices, sorted_indices)
        if not self.enabled:
            return y
        z = mx.gather_mm(self._dropped(x), self.lora_a.swapaxes(-1, -2), rhs_indices=indices,
                         sorted_indices=sorted_indices)
        z = mx.gather_mm(z, self.lora_b.swapaxes(-1, -2), rhs_indices=indices,
                         sorted_indices=sorted_indices)
        return y + (self.scale * z).astype(y.dtype)

    def fused(self, dequantize: bool = False) -> nn.Module:
        weight = dense_weight(self.base)
        merged = (weight.astype(mx.float32) + self.delta_weight()).astype(weight.dtype)
        if isinstance(self.base, QuantizedSwitchLinear) and not dequantize:
            return QuantizedSwitchLinear(merged, self.base.group_size, self.base.bits,
                                         self.base.mode)
        experts, out_dims, in_dims = merged.shape
        layer = SwitchLinear(in_dims, out_dims, experts)
        layer.weight = merged
        return layer


def make_adapter(base: nn.Module, config: LoRAConfig, path: str = "") -> LoRAAdapter:
    """The adapter layer for `base` under `config`."""
    if isinstance(base, EXPERT_TYPES):
        if config.dora:
            raise ValueError(f"DoRA is not supported on MoE expert layers ({path}); "
                             "use LoRA or leave the experts out of the targets")
        return LoRASwitchLinear(base, config.rank, config.scale, config.dropout)
    return LoRALinear(base, config.rank, config.scale, config.dropout, config.dora)


def lora_layers(model: nn.Module) -> list[LoRAAdapter]:
    """All adapter layers of `model`, in module order."""
    return [m for _, m in model.named_modules() if isinstance(m, LoRAAdapter)]


def _blocks(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"{type(model).__name__} has no decoder layers (model.layers) to adapt")
    return layers


def adaptable_paths(block: nn.Module) -> list[str]:
    """Paths of the layers LoRA can wrap inside one decoder block."""
    return [name for name, m in block.named_modules()
            if name and isinstance(m, LINEAR_TYPES + EXPERT_TYPES)]


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap the targeted layers of `model` in LoRA layers and freeze everything else.

    Only the adapter parameters (lora_a, lora_b and DoRA's m) stay trainable. Returns the
    full paths of the wrapped modules. Raises ValueError when the model already has adapters,
    a target matches no layer in the adapted blocks, or num_layers exceeds the depth.
    """
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters; load a fresh base model")
    blocks = _blocks(model)
    n = config.num_layers or len(blocks)
    if n > len(blocks):
        raise ValueError(f"num_layers is {n} but the model has {len(blocks)} layers")
    first = len(blocks) - n
    plans = []
    matched: set[str] = set()
    for i, block in enumerate(blocks[first:], start=first):
        available = adaptable_paths(block)
        for target in config.targets:
            if expand_targets([target], available):
                matched.add(target)
        plans.append((i, block, expand_targets(config.targets, available)))
    unmatched = [t for t in config.targets if t not in matched]
    if unmatched:
        example = adaptable_paths(blocks[-1])
        raise ValueError(
            f"LoRA target(s) {', '.join(map(repr, unmatched))} match no layer; a decoder block "
            f"has {', '.join(example)} (groups: {', '.join(TARGET_GROUPS)})"
        )
    wrapped: list[str] = []
    for i, block, paths in plans:
        modules = dict(block.named_modules())
        updates = [(path, make_adapter(modules[path], config, f"layers.{i}.{path}"))
                   for path in paths]
        block.update_modules(tree_unflatten(updates))
        wrapped.extend(f"layers.{i}.{path}" for path in paths)
    model.freeze()
    for layer in lora_layers(model):
        layer.unfreeze(keys=[k for k in ADAPTER_PARAMETERS if k in layer], recurse=False)
    return wrapped


def lora_config_of(model: nn.Module) -> LoRAConfig:
    """The LoRAConfig that describes the adapters already in `model` (e.g. after
    `load_adapter`): rank, scale, dropout and DoRA from the layers, the adapted paths as
    targets, and the adapted blocks as num_layers."""
    adapted: dict[int, list[str]] = {}
    for i, block in enumerate(_blocks(model)):
        paths = [name for name, m in block.named_modules() if isinstance(m, LoRAAdapter)]
        if paths:
            adapted[i] = paths
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters")
    first = layers[0]
    rank = first.lora_a.shape[-1] if isinstance(first, LoRALinear) else first.lora_a.shape[1]
    targets = tuple(dict.fromkeys(p for paths in adapted.values() for p in paths))
    config = LoRAConfig(rank=rank, alpha=first.scale * rank, dropout=first.dropout,
                        targets=targets, num_layers=len(_blocks(model)) - min(adapted),
                        dora=any(layer.is_dora for layer in layers))
    config.scale = first.scale
    return config


def remove_lora(model: nn.Module) -> nn.Module:
    """Put the original base layers back (adapters discarded, nothing merged)."""
    updates = [(name, m.base) for name, m in model.named_modules()
               if isinstance(m, LoRAAdapter)]
    if updates:
        model.update_modules(tree_unflatten(updates))
    return model


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; quantized weights count as unpacked elements."""
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = 0
    for _, module in model.named_modules():
        quantized = isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding
                               | QuantizedSwitchLinear)
        for name, value in module.items():
            if not isinstance(value, mx.array):
                continue
            if quantized and name in ("scales", "biases"):
                continue
            total += value.size * 32 // module.bits if quantized and name == "weight" \
                else value.size
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
