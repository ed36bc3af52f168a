"""Qwen2-MoE's sparse mixture-of-experts block, computed with MLX's gather matmuls.

The maths follows transformers' `Qwen2MoeSparseMoeBlock` (modeling_qwen2_moe.py):

    router_logits = gate(x)                                  # (..., E), in x's dtype
    p = softmax(router_logits) in float32; top-k of p        # k of E experts per token
    w = top-k p, divided by its sum iff norm_topk_prob, then cast to x's dtype
    y = sum_k w_k * down_k(silu(gate_k(x)) * up_k(x))        # the routed experts
      + sigmoid(shared_expert_gate(x)) * shared_expert(x)    # the always-on shared expert

The E experts of a layer are stored stacked, `switch_mlp.{gate,up,down}_proj.weight` of shape
(E, out, in), the names and layout mlx-lm uses, so its converted checkpoints load as they are.
`mx.gather_mm` / `mx.gather_qmm` multiply each token only by its own experts' matrices, so a
decode step reads k of the E expert weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn

if TYPE_CHECKING:
    from qwen2_mlx.config import ModelConfig

# Sort (token, expert) pairs by expert before the gather matmuls once there are this many, so
# consecutive rows share an expert's matrix. Measured on the CPU backend (mlx 0.32.4, 64
# experts top-8, hidden 1024, expert width 256, float32 experts): the expert MLPs alone are
# 10-20% faster sorted from 8 tokens (64 pairs) up, slower at 4 tokens; whole-model prefill
# of 64 tokens 5.9 vs 5.3 tok/s (examples/bench_moe.py, "qwen2-mlx unsorted"). mlx-lm's
# SwitchGLU uses the same cut-off. Decode (k pairs per token) never sorts.
SORT_MIN_PAIRS = 64


def is_moe_layer(config: ModelConfig, layer_idx: int) -> bool:
    """Whether decoder layer `layer_idx` holds the sparse MoE block (else a dense MLP).

    transformers' `Qwen2MoeDecoderLayer`: MoE iff the layer is not in `mlp_only_layers`,
    there are experts, and `(layer_idx + 1) % decoder_sparse_step == 0`.
    """
    return (
        config.model_type == "qwen2_moe"
        and layer_idx not in config.mlp_only_layers
        and config.num_experts > 0
        and (layer_idx + 1) % config.decoder_sparse_step == 0
    )


def experts_compute_dtype(dtype: mx.Dtype) -> mx.Dtype:
    """The dtype the expert matmuls run in on the current backend.

    On Apple GPUs the gather matmuls are fast in half precision, so experts run in the model's
    dtype. MLX's CPU `GatherMM` only supports float32, and its quantized matmuls are ~9x faster
    with float32 activations (shared/reference/mlx-cpu-performance.md), so everywhere else
    the experts run in float32 and the result is cast back.
    """
    if mx.metal.is_available() and mx.default_device().type == mx.gpu:
        return dtype
    return mx.float32


class SwitchLinear(nn.Module):
    """E bias-free linear layers stacked as `weight` (E, out, in); each row picks its own.

    `__call__(x, indices)`: `x` (..., 1, in) and `indices` (...) broadcast against each other
    over the leading axes; the result is (..., 1, out) with row r multiplied by
    `weight[indices[r]]`.
    """

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = math.sqrt(1.0 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        weight = self["weight"]
        if weight.dtype != x.dtype:
            weight, indices = _experts_as(weight, indices, x.dtype)
        return mx.gather_mm(
            x, weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
        )

    def to_quantized(
        self,
        group_size: int | None = None,
        bits: int | None = None,
        mode: str = "affine",
        quantize_input: bool = False,
    ) -> QuantizedSwitchLinear:
        """The quantized counterpart, for `nn.quantize`."""
        if quantize_input:
            raise ValueError("quantize_input is not supported for the MoE experts")
        return QuantizedSwitchLinear(self.weight, group_size, bits, mode)


def _experts_as(
    weight: mx.array, indices: mx.array, dtype: mx.Dtype
) -> tuple[mx.array, mx.array]:
    """`weight` cast to `dtype`, touching no more expert matrices than there are indices.

    With fewer (row, expert) pairs than experts (decode), the selected matrices are gathered
    first and only they are cast; the indices then point into that gathered stack, in order.
    """
    if indices.size < weight.shape[0]:
        taken = weight[indices.flatten()].astype(dtype)
        return taken, mx.arange(indices.size, dtype=mx.uint32).reshape(indices.shape)
    return weight.astype(dtype), indices


class QuantizedSwitchLinear(nn.Module):
    """`SwitchLinear` with each expert's matrix quantized (`mx.quantize` per (out, in) slice).

    Built from float stacked weights (E, out, in). Parameters `weight`, `scales` and, in affine
    mode, `biases`: the names and shapes mlx-lm writes, so quantized mlx-lm MoE checkpoints
    load as they are.
    """

    def __init__(
        self,
        weight: mx.array,
        group_size: int | None = None,
        bits: int | None = None,
        mode: str = "affine",
    ):
        super().__init__()
        self.group_size, self.bits = _quantization_defaults(mode, group_size, bits)
        self.mode = mode
        if weight.shape[-1] % self.group_size:
            raise ValueError(
                f"expert input size {weight.shape[-1]} is not a multiple of the quantization "
                f"group size {self.group_size}"
            )
        self.weight, self.scales, *biases = mx.quantize(
            weight, self.group_size, self.bits, mode=mode
        )
        self.biases = biases[0] if biases else None
        self.freeze()

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x,
            self["weight"],
            self["scales"],
            self.get("biases"),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )


def _quantization_defaults(mode: str, group_size: int | None, bits: int | None) -> tuple[int, int]:
    # The same defaults as nn.QuantizedLinear (mlx.nn.layers.quantized).
    defaults = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
    if mode not in defaults:
        raise ValueError(f"unknown quantization mode {mode!r}; known: {', '.join(defaults)}")
    return group_size or defaults[mode][0], bits or defaults[mode][1]


class SwitchGLU(nn.Module):
    """The routed experts: SwiGLU MLPs `down(silu(gate(x)) * up(x))`, stacked E at a time."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(dim, hidden_dim, num_experts)
        self.up_proj = SwitchLinear(dim, hidden_dim, num_experts)
        self.down_proj = SwitchLinear(hidden_dim, dim, num_experts)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x (..., D), indices (..., k) -> (..., k, D): each token through each of its experts.

        The result is in the experts' compute dtype (float32 on the CPU backend).
        """
        *lead, dim = x.shape
        k = indices.shape[-1]
        x = x.reshape(-1, 1, dim).astype(experts_compute_dtype(x.dtype))
        indices = indices.reshape(-1, k)
        if indices.size >= SORT_MIN_PAIRS:
            # One row per (token, expert) pair, ordered by expert, then put back in place.
            flat = indices.flatten()
            order = mx.argsort(flat)
            y = self._experts(x[order // k], flat[order], sorted_indices=True)
            y = y[mx.argsort(order)].reshape(-1, k, dim)
        else:
            y = self._experts(x[:, None], indices, sorted_indices=False).squeeze(-2)
        return y.reshape(*lead, k, dim)

    def _experts(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        gate = self.gate_proj(x, indices, sorted_indices)
        up = self.up_proj(x, indices, sorted_indices)
        return self.down_proj(nn.silu(gate) * up, indices, sorted_indices)


class SparseMoeBlock(nn.Module):
    """transformers' `Qwen2MoeSparseMoeBlock`: router, top-k routed experts, gated shared expert.

    `shared_expert` is the dense SwiGLU MLP of width `shared_expert_intermediate_size`
    (model.py's `MLP`, passed in so this module does not import the model).
    """

    def __init__(self, config: ModelConfig, shared_expert: nn.Module):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(
            config.hidden_size, config.moe_intermediate_size, config.num_experts
        )
        self.shared_expert = shared_expert
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        # Set by `recording_router_logits`: a callable that receives this layer's router logits.
        self.router_logits_sink = None

    def route(self, router_logits: mx.array) -> tuple[mx.array, mx.array]:
        """(weights (..., k) in the logits' dtype, expert indices (..., k)) for each token.

        Softmax and top-k run on float32 values, as transformers does: a half-precision
        softmax rounds near-equal probabilities together and can pick a different expert.
        """
        probs = mx.softmax(router_logits.astype(mx.float32), axis=-1)
        k = self.top_k
        experts = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k])
        weights = mx.take_along_axis(probs, experts, axis=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return weights.astype(router_logits.dtype), experts

    def __call__(self, x: mx.array) -> mx.array:
        router_logits = self.gate(x)
        if self.router_logits_sink is not None:
            self.router_logits_sink(router_logits)
        weights, experts = self.route(router_logits)
        y = self.switch_mlp(x, experts)
        # The weights were rounded to x's dtype above, as transformers rounds them.
        routed = (y * weights[..., None].astype(y.dtype)).sum(axis=-2).astype(x.dtype)
        # A true sigmoid: llama.cpp's silu(g)/g form is NaN at g = 0.
        shared = mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return routed + shared


# --- Checkpoint layouts -------------------------------------------------------------------

_PER_EXPERT = re.compile(
    r"^(?P<prefix>.*\.mlp)\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)"
    r"\.(?P<param>weight|scales|biases)$"
)
_FUSED = re.compile(r"^(?P<prefix>.*\.mlp)\.experts\.(?P<proj>gate_up_proj|down_proj)$")


def stack_expert_weights(
    weights: dict[str, mx.array], num_experts: int
) -> dict[str, mx.array]:
    """Rename a checkpoint's expert tensors to the stacked `mlp.switch_mlp.*` layout.

    Accepts the Hugging Face Hub layout (`mlp.experts.{e}.{gate,up,down}_proj.weight`, also
    what transformers 5 `save_pretrained` writes), transformers 5's in-memory fused layout
    (`mlp.experts.gate_up_proj` (E, 2I, D) with gate rows first, `mlp.experts.down_proj`
    (E, D, I)), and the already stacked mlx-lm layout (left as is).

    A group that lacks some of the experts 0..E-1 is left under its per-expert names: the
    converter streams shards and offers the leftovers again with the next shard (an expert
    stack may span two), and the loader then reports them as unexpected tensors.
    """
    out: dict[str, mx.array] = {}
    groups: dict[tuple[str, str, str], dict[int, mx.array]] = {}
    for name, value in weights.items():
        if m := _PER_EXPERT.match(name):
            key = (m["prefix"], m["proj"], m["param"])
            groups.setdefault(key, {})[int(m["expert"])] = value
        elif m := _FUSED.match(name):
            _check_expert_count(name, value.shape[0], num_experts)
            target = f"{m['prefix']}.switch_mlp"
            if m["proj"] == "down_proj":
                out[f"{target}.down_proj.weight"] = value
            else:
                # transformers: `gate, up = linear(x, gate_up_proj[e]).chunk(2, dim=-1)`.
                if value.shape[1] % 2:
                    raise ValueError(f"{name} has an odd number of rows {value.shape[1]}")
                half = value.shape[1] // 2
                out[f"{target}.gate_proj.weight"] = value[:, :half]
                out[f"{target}.up_proj.weight"] = value[:, half:]
        else:
            out[name] = value
    for (prefix, proj, param), experts in groups.items():
        if set(experts) == set(range(num_experts)):
            out[f"{prefix}.switch_mlp.{proj}.{param}"] = mx.stack(
                [experts[e] for e in range(num_experts)]
            )
        else:
            out.update({f"{prefix}.experts.{e}.{proj}.{param}": w for e, w in experts.items()})
    return out


def _check_expert_count(name: str, count: int, num_experts: int) -> None:
    if count != num_experts:
        raise ValueError(f"{name} stacks {count} experts but the config has {num_experts}")


def cast_experts_for_backend(model: nn.Module) -> int:
    """Store float expert weights in the backend's expert compute dtype; returns how many
    stacks were cast.

    On the CPU backend experts compute in float32 (see `experts_compute_dtype`). Half
    precision stacks would otherwise be cast on every call: for the selected experts only in
    decode, but still ~2x the expert time of float32 weights on the baseline x86 build (no
    F16C), and for all E experts in prefill. Casting once at load trades 2x expert memory
    for that time; on Metal it changes nothing. Quantized experts are left alone.
    """
    cast = 0
    for _, module in model.named_modules():
        if isinstance(module, SwitchLinear):
            target = experts_compute_dtype(module.weight.dtype)
            if module.weight.dtype != target:
                module.weight = module.weight.astype(target)
                cast += 1
    return cast


def moe_quant_predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
    """Which modules to quantize in a Qwen2-MoE model (a `class_predicate` for `nn.quantize`).

    Everything quantizable except the router (`mlp.gate`) and `mlp.shared_expert_gate`: both
    are tiny (E x D and 1 x D), and the router's logits decide which experts run, so rounding
    them can switch experts (mlx-lm quantizes both; Qwen3-MoE in mlx-lm keeps the router at
    8 bits for this reason).
    """
    if path.endswith((".mlp.gate", ".mlp.shared_expert_gate")):
        return False
    return hasattr(module, "to_quantized")


# --- Router auxiliary loss ----------------------------------------------------------------


@contextmanager
def recording_router_logits(model: nn.Module) -> Iterator[list[mx.array]]:
    """Collect every MoE layer's router logits (..., E) during forwards inside the block.

        with recording_router_logits(model) as router_logits:
            logits = model(input_ids)
        aux = load_balancing_loss(router_logits, E, k)

    The list fills in layer order, one entry per MoE layer per forward pass.
    """
    collected: list[mx.array] = []
    blocks = [m for _, m in model.named_modules() if isinstance(m, SparseMoeBlock)]
    for block in blocks:
        block.router_logits_sink = collected.append
    try:
        yield collected
    finally:
        for block in blocks:
            block.router_logits_sink = None


def load_balancing_loss(
    router_logits: Sequence[mx.array],
    num_experts: int,
    top_k: int,
    attention_mask: mx.array | None = None,
) -> mx.array:
    """The Switch-Transformer load-balancing loss, as transformers' `load_balancing_loss_func`.

    Over all layers' tokens (padding excluded by `attention_mask`, shape (batch, length)):
    f_e = (top-k assignments to expert e) / tokens, P_e = mean router probability of e, and
    the loss is E * sum_e f_e * P_e. It is unscaled: a fine-tuning loss adds
    `config.router_aux_loss_coef * load_balancing_loss(...)`, as transformers does.
    """
    if not router_logits:
        raise ValueError("no router logits: the model has no MoE layer")
    assigned = mx.zeros((num_experts,), dtype=mx.float32)
    prob_sum = mx.zeros((num_experts,), dtype=mx.float32)
    rows = mx.array(0.0)
    mask = None
    if attention_mask is not None:
        mask = attention_mask.reshape(-1, 1).astype(mx.float32)
    for logits in router_logits:
        logits = logits.reshape(-1, num_experts)
        if mask is not None and mask.shape[0] != logits.shape[0]:
            raise ValueError(
                f"attention_mask covers {mask.shape[0]} tokens but the router saw "
                f"{logits.shape[0]}"
            )
        # transformers takes this softmax in the logits' own dtype (no float32 upcast here).
        probs = mx.softmax(logits, axis=-1, precise=True)
        chosen = mx.stop_gradient(mx.argpartition(-probs, kth=top_k - 1, axis=-1)[:, :top_k])
        counts = (chosen[..., None] == mx.arange(num_experts)).astype(mx.float32).sum(axis=1)
        probs = probs.astype(mx.float32)
        if mask is not None:
            counts, probs = counts * mask, probs * mask
            rows = rows + mask.sum()
        else:
            rows = rows + logits.shape[0]
        assigned = assigned + counts.sum(axis=0)
        prob_sum = prob_sum + probs.sum(axis=0)
    return num_experts * mx.sum((assigned / rows) * (prob_sum / rows))


def forward_with_aux_loss(
    model: nn.Module, input_ids: mx.array, attention_mask: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """`(logits, aux_loss)` for a Qwen2-MoE model: one forward pass plus the unscaled
    load-balancing loss over its MoE layers (`transformers`' `output_router_logits=True`)."""
    config = model.config
    with recording_router_logits(model) as router_logits:
        logits = model(input_ids)
    aux = load_balancing_loss(
        router_logits, config.num_experts, config.num_experts_per_tok, attention_mask
    )
    return logits, aux


# --- Parameter counts ---------------------------------------------------------------------


def activated_parameter_count(model: nn.Module) -> int:
    """Parameters one token uses: all of them except the unselected routed experts.

    The "A14B" of Qwen2-57B-A14B counts, per token, attention, norms, the router, the shared
    expert and its gate, k of the E routed experts, plus the embedding and the LM head (as
    Qwen counts them; a lookup reads one row, but the table is counted whole). So from the
    total we subtract (E - k) / E of every MoE layer's stacked expert weights.
    """
    from mlx.utils import tree_flatten

    total = sum(p.size for _, p in tree_flatten(model.parameters()))
    idle = 0
    for _, module in model.named_modules():
        if isinstance(module, SparseMoeBlock):
            experts = sum(p.size for _, p in tree_flatten(module.switch_mlp.parameters()))
            idle += experts * (module.num_experts - module.top_k) // module.num_experts
    return total - idle
