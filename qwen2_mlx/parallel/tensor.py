"""Tensor parallelism: sharded layers, and the transform that cuts a built model to one rank.

Megatron-LM's split (Shoeybi et al. 2019, §3): in each block half the first projections are
split by output (q/k/v, gate/up: "all-to-sharded", no communication) and the last by input
(o_proj, down_proj: "sharded-to-all"), whose partial outputs one `all_sum` adds up. So a
decoder layer costs two all_sums of a (batch, length, hidden) activation. The embedding and
the LM head are split by vocabulary: a lookup zeroes the rows other ranks own and all_sums;
the head's per-rank logits are gathered. Which slices a rank holds comes from `plan.py`.

`shard_tensor_parallel(model, shard, group)` works on a built but not yet loaded model: it
slices every parameter it splits (still lazy, never computed), swaps the layers that
communicate for their parallel subclasses (same parameter names, so checkpoints load
unchanged) and returns the table of what it split, which `select_weights` applies to the
checkpoint tensors and the adapter loader to LoRA tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from qwen2_mlx.metal_kernels.quantized import QuantizedEmbedding, QuantizedLinear, _rebrand
from qwen2_mlx.moe import QuantizedSwitchLinear, SparseMoeBlock
from qwen2_mlx.parallel.experts import ExpertParallelMoeBlock
from qwen2_mlx.parallel.plan import TensorShard

Group = mx.distributed.Group


@dataclass(frozen=True)
class Split:
    """How one layer is cut: `kind` is "rows" (output features), "cols" (input features) or
    "experts" (the leading expert axis of a stacked expert layer); `part` the slice kept."""

    kind: str
    part: range


def gather_last_axis(x: mx.array, group: Group) -> mx.array:
    """Every rank's `x` concatenated along the last axis, in rank order (the per-rank vocab
    logits into full logits). `all_gather` concatenates along the first axis, so the ranks'
    blocks are moved next to the last axis before merging it."""
    n = group.size()
    gathered = mx.distributed.all_gather(x, group=group).reshape(n, *x.shape)
    return mx.moveaxis(gathered, 0, -2).reshape(*x.shape[:-1], n * x.shape[-1])


class RowParallel:
    """A projection holding a slice of its input features: its output is a partial sum.

    `reduce` False leaves the all_sum to the caller (the MoE block sums its shared expert and
    routed experts at once).
    """

    group: Group
    reduce: bool

    def partial(self, x: mx.array) -> mx.array:
        """This rank's share of the output: x[..., my inputs] @ W[:, my inputs].T."""
        return super().__call__(x)

    def combine(self, partial: mx.array) -> mx.array:
        """The full output from every rank's `partial` (or `partial` itself when not `reduce`)."""
        return mx.distributed.all_sum(partial, group=self.group) if self.reduce else partial

    def __call__(self, x: mx.array) -> mx.array:
        return self.combine(self.partial(x))


class RowParallelLinear(RowParallel, nn.Linear):
    """`nn.Linear` split by input features, outputs summed over ranks."""


class RowParallelQuantizedLinear(RowParallel, QuantizedLinear):
    """The quantized `RowParallelLinear`; each rank holds whole quantization groups."""


class _VocabParallelHead:
    """An LM head holding a slice of the vocabulary's rows; logits are gathered."""

    group: Group

    def __call__(self, x: mx.array) -> mx.array:
        return gather_last_axis(super().__call__(x), self.group)


class VocabParallelLinear(_VocabParallelHead, nn.Linear):
    """The untied LM head, split by vocabulary."""


class VocabParallelQuantizedLinear(_VocabParallelHead, QuantizedLinear):
    """The quantized untied LM head, split by vocabulary."""


class _VocabParallelEmbedding:
    """An embedding holding rows `vocab_start ..` of the table.

    A token another rank owns gets zeros here and its row there, so one all_sum gives every
    rank the full embedding (exactly: the other terms are zeros). `as_linear` (the tied LM
    head) computes this rank's logits and gathers them.
    """

    group: Group
    vocab_start: int

    def __call__(self, ids: mx.array) -> mx.array:
        local = ids.astype(mx.int32) - self.vocab_start
        owned = (local >= 0) & (local < self["weight"].shape[0])
        rows = super().__call__(mx.where(owned, local, 0))
        return mx.distributed.all_sum(mx.where(owned[..., None], rows, 0), group=self.group)

    def as_linear(self, x: mx.array) -> mx.array:
        return gather_last_axis(super().as_linear(x), self.group)


class VocabParallelEmbedding(_VocabParallelEmbedding, nn.Embedding):
    """`nn.Embedding` split by vocabulary."""


class VocabParallelQuantizedEmbedding(_VocabParallelEmbedding, QuantizedEmbedding):
    """The quantized embedding split by vocabulary."""


def as_subclass(module: nn.Module, cls: type, **attributes) -> nn.Module:
    """A `cls` instance holding `module`'s arrays and settings, plus `attributes`.

    `cls` adds behaviour to `type(module)` without new parameters, so the parameter names,
    the frozen state and the quantization settings carry over (the arrays are shared).
    """
    new = _rebrand(module, cls)
    for name, value in attributes.items():
        object.__setattr__(new, name, value)
    return new


def _is_quantized(module: nn.Module) -> bool:
    return isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding | QuantizedSwitchLinear)


def parameter_slice(module: nn.Module, name: str, split: Split) -> tuple[int, int, int] | None:
    """(axis, start, stop) of parameter `name` of `module` under `split`; None when the whole
    parameter is kept (the bias of an input-split layer is not split)."""
    part = split.part
    if split.kind in ("rows", "experts"):
        return 0, part.start, part.stop
    if name == "bias":
        return None
    if not _is_quantized(module):
        return -1, part.start, part.stop
    # Packed uint32 words hold 32 // bits values of a row; one scale and bias per group.
    if name == "weight":
        return -1, part.start * module.bits // 32, part.stop * module.bits // 32
    return -1, part.start // module.group_size, part.stop // module.group_size


def take(array: mx.array, axis: int, start: int, stop: int) -> mx.array:
    """array[start:stop] along `axis`, as a copy (a view would keep the whole array alive)."""
    index = [slice(None)] * array.ndim
    index[axis] = slice(start, stop)
    return mx.contiguous(array[tuple(index)])


def _split_module(module: nn.Module, split: Split) -> None:
    """Slice `module`'s own (still lazy) parameters so its shapes are this rank's."""
    for name, value in list(module.items()):
        if isinstance(value, mx.array) and (where := parameter_slice(module, name, split)):
            module[name] = take(value, *where)


class TensorSharder:
    """Cuts one model to rank `shard.rank`'s part; `splits` records what was cut (by path)."""

    def __init__(self, shard: TensorShard, group: Group):
        self.shard = shard
        self.group = group
        self.splits: dict[str, Split] = {}

    def _rows(self, path: str, module: nn.Module, part: range) -> nn.Module:
        split = Split("rows", part)
        _split_module(module, split)
        self.splits[path] = split
        return module

    def _cols(self, path: str, module: nn.Module, part: range, reduce: bool = True) -> nn.Module:
        if "bias" in module:
            raise ValueError(f"{path}: an input-split projection with a bias is not supported")
        split = Split("cols", part)
        _split_module(module, split)
        self.splits[path] = split
        cls = RowParallelQuantizedLinear if _is_quantized(module) else RowParallelLinear
        return as_subclass(module, cls, group=self.group, reduce=reduce)

    def _mlp(self, path: str, mlp: nn.Module, part: range, reduce: bool) -> None:
        self._rows(f"{path}.gate_proj", mlp.gate_proj, part)
        self._rows(f"{path}.up_proj", mlp.up_proj, part)
        mlp.down_proj = self._cols(f"{path}.down_proj", mlp.down_proj, part, reduce)

    def _attention(self, path: str, attn: nn.Module) -> None:
        shard, d = self.shard, attn.head_dim
        heads = range(shard.heads.start * d, shard.heads.stop * d)
        kv = range(shard.kv_heads.start * d, shard.kv_heads.stop * d)
        self._rows(f"{path}.q_proj", attn.q_proj, heads)
        self._rows(f"{path}.k_proj", attn.k_proj, kv)
        self._rows(f"{path}.v_proj", attn.v_proj, kv)
        attn.o_proj = self._cols(f"{path}.o_proj", attn.o_proj, heads)
        attn.n_heads, attn.n_kv_heads = len(shard.heads), len(shard.kv_heads)

    def _moe(self, path: str, block: SparseMoeBlock) -> nn.Module:
        experts = Split("experts", self.shard.experts)
        for name in ("gate_proj", "up_proj", "down_proj"):
            layer = getattr(block.switch_mlp, name)
            _split_module(layer, experts)
            self.splits[f"{path}.switch_mlp.{name}"] = experts
        # The shared expert's partial output joins the routed experts' in the block's all_sum.
        self._mlp(f"{path}.shared_expert", block.shared_expert, self.shard.shared_expert,
                  reduce=False)
        return as_subclass(block, ExpertParallelMoeBlock, group=self.group,
                           first_expert=self.shard.experts.start,
                           local_experts=len(self.shard.experts))

    def __call__(self, model: nn.Module) -> dict[str, Split]:
        for i, layer in enumerate(model.layers):
            path = f"model.layers.{i}"
            self._attention(f"{path}.self_attn", layer.self_attn)
            if isinstance(layer.mlp, SparseMoeBlock):
                layer.mlp = self._moe(f"{path}.mlp", layer.mlp)
            else:
                self._mlp(f"{path}.mlp", layer.mlp, self.shard.intermediate, reduce=True)
        vocab = self.shard.vocab
        embed = self._rows("model.embed_tokens", model.model.embed_tokens, vocab)
        cls = (VocabParallelQuantizedEmbedding if _is_quantized(embed)
               else VocabParallelEmbedding)
        model.model.embed_tokens = as_subclass(embed, cls, group=self.group,
                                               vocab_start=vocab.start)
        if "lm_head" in model:
            head = self._rows("lm_head", model.lm_head, vocab)
            cls = VocabParallelQuantizedLinear if _is_quantized(head) else VocabParallelLinear
            model.lm_head = as_subclass(head, cls, group=self.group)
        return self.splits


def select_weights(
    model: nn.Module, splits: dict[str, Split], weights: dict[str, mx.array]
) -> dict[str, mx.array]:
    """The checkpoint tensors cut as `splits` says (others whole); empties `weights`.

    Each cut tensor is read and sliced on its own (`mx.eval` one at a time) and the whole one
    is let go at once (`weights` gives up its reference), so loading never holds more than
    this rank's part plus the one whole tensor being cut.
    """
    modules = dict(model.named_modules())
    out = {}
    for name in list(weights):
        value = weights.pop(name)
        path, _, param = name.rpartition(".")
        split = splits.get(path)
        where = parameter_slice(modules[path], param, split) if split and path in modules else None
        if where is None:
            out[name] = value
            continue
        out[name] = take(value, *where)
        mx.eval(out[name])
    return out
