"""Which part of a Qwen2 model each of N processes holds: pure arithmetic on the config.

Nothing here communicates or reads weights, so every rule can be checked (and a shard count
the model cannot use refused) before anything is loaded, and tested in one process.

Tensor parallelism (rank r of N):
- Query heads: H/N consecutive heads each; N must divide H.
- KV heads: the heads rank r's queries read. When N divides K that is K/N heads, split like the
  queries. When it does not, each KV head is replicated on every rank whose queries read it:
  with N a multiple of K, each rank holds one KV head and each KV head sits on N/K ranks
  (Qwen2-0.5B's 14 query / 2 KV heads on 2 ranks: 7 + 1 per rank; Qwen2-1.5B's 12 / 2 on 4
  ranks: 3 + 1, each KV head on 2 ranks). A layout in which a rank's queries read its KV heads
  unevenly (28 query / 4 KV heads on 7 ranks: 4 queries over 3 + 1 of two KV heads) cannot run
  as grouped-query attention and is refused.
- Dense MLP and shared expert: the hidden (intermediate) width split N ways.
- Routed experts (qwen2_moe): E/N whole experts each.
- Embedding and LM head: the vocabulary split N ways.
- Quantized layers split along whole quantization groups: a layer split along its input
  (o_proj, down_proj) needs its per-rank input width to be a multiple of its group size.

Pipeline parallelism: contiguous layer ranges, as even as possible (the first ranks take one
more layer when N does not divide the depth); at most one rank per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwen2_mlx.model import ModelConfig
from qwen2_mlx.moe import is_moe_layer

MODES = ("tensor", "pipeline")


class ParallelError(ValueError):
    """A parallel run that cannot proceed: a bad mode or shard count, ranks that disagree, or
    a failure on some rank (the same error is raised on every rank)."""


def check_mode(parallel: str) -> None:
    if parallel not in MODES:
        raise ParallelError(
            f"parallel must be one of {', '.join(map(repr, MODES))} (or None), got {parallel!r}"
        )


def split(total: int, parts: int, index: int) -> range:
    """The `index`-th of `parts` equal consecutive slices of range(total) (parts divides total)."""
    size = total // parts
    return range(index * size, (index + 1) * size)


@dataclass(frozen=True)
class TensorShard:
    """What rank `rank` of `size` holds under tensor parallelism (ranges of global indices)."""

    rank: int
    size: int
    heads: range  # query heads
    kv_heads: range
    kv_total: int  # the model's KV heads
    intermediate: range  # dense MLP hidden units
    shared_expert: range  # the MoE shared expert's hidden units
    experts: range  # routed experts
    vocab: range

    @property
    def kv_replicated(self) -> bool:
        """Whether some other rank holds the same KV heads."""
        return len(self.kv_heads) * self.size > self.kv_total


def kv_heads_for(config: ModelConfig, heads: range) -> range:
    """The KV heads that query heads `heads` read, or a ParallelError when they read them
    unevenly (GQA: query head h reads KV head h // (H / K))."""
    group = config.num_attention_heads // config.num_key_value_heads
    first, last = heads.start // group, (heads.stop - 1) // group
    counts = [len(range(max(heads.start, kv * group), min(heads.stop, (kv + 1) * group)))
              for kv in range(first, last + 1)]
    if len(set(counts)) != 1:
        raise ParallelError(
            f"query heads {heads.start}..{heads.stop - 1} read KV heads {first}..{last} unevenly "
            f"({counts} queries each): {config.num_attention_heads} query heads over "
            f"{config.num_key_value_heads} KV heads cannot be split this way"
        )
    return range(first, last + 1)


def tensor_shard(config: ModelConfig, rank: int, size: int) -> TensorShard:
    """Rank `rank`'s part under tensor parallelism, or a ParallelError saying why `size`
    processes cannot split this model (raised identically on every rank)."""
    if size < 2:
        raise ParallelError(f"tensor parallelism needs at least 2 processes, got {size}")
    H, K = config.num_attention_heads, config.num_key_value_heads
    problems = []
    if H % size:
        problems.append(f"{H} attention heads are not divisible by {size}")
    if config.vocab_size % size:
        problems.append(f"the vocabulary ({config.vocab_size}) is not divisible by {size}")
    dense = any(not is_moe_layer(config, i) for i in range(config.num_hidden_layers))
    if dense and config.intermediate_size % size:
        problems.append(f"intermediate_size {config.intermediate_size} is not divisible by {size}")
    if config.model_type == "qwen2_moe" and config.num_experts:
        if config.num_experts % size:
            problems.append(f"{config.num_experts} experts are not divisible by {size}")
        if config.shared_expert_intermediate_size % size:
            problems.append(f"shared_expert_intermediate_size "
                            f"{config.shared_expert_intermediate_size} is not divisible by {size}")
    if problems:
        raise ParallelError(f"cannot split this model over {size} processes with "
                            f"parallel='tensor': " + "; ".join(problems)
                            + " (parallel='pipeline' splits by layers instead)")
    heads = split(H, size, rank)
    return TensorShard(
        rank=rank, size=size, heads=heads, kv_heads=kv_heads_for(config, heads), kv_total=K,
        intermediate=split(config.intermediate_size, size, rank),
        shared_expert=split(config.shared_expert_intermediate_size, size, rank),
        experts=split(config.num_experts, size, rank),
        vocab=split(config.vocab_size, size, rank),
    )


def check_all_ranks(config: ModelConfig, size: int) -> list[TensorShard]:
    """Every rank's part (so an uneven KV layout on any rank fails on all of them)."""
    return [tensor_shard(config, r, size) for r in range(size)]


def input_split_layers(config: ModelConfig) -> dict[str, int]:
    """Module path -> global input width of each layer tensor parallelism splits along its
    input (o_proj, dense down_proj, the shared expert's down_proj)."""
    widths = {}
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}"
        widths[f"{prefix}.self_attn.o_proj"] = config.num_attention_heads * config.head_dim
        if is_moe_layer(config, i):
            widths[f"{prefix}.mlp.shared_expert.down_proj"] = config.shared_expert_intermediate_size
        else:
            widths[f"{prefix}.mlp.down_proj"] = config.intermediate_size
    return widths


def check_quantized_split(config: ModelConfig, quantization: dict[str, Any] | None,
                          size: int) -> None:
    """Refuse a quantized checkpoint whose input-split layers would cut a quantization group.

    `quantization` is config.json's block (per-layer entries win over the default group size).
    """
    if not quantization:
        return
    bad = []
    for path, width in input_split_layers(config).items():
        entry = quantization.get(path, {})
        if entry is False:
            continue  # kept in float
        group = (entry or {}).get("group_size", quantization["group_size"])
        if (width // size) % group:
            bad.append(f"{path} ({width} inputs / {size} = {width // size}, group size {group})")
    if bad:
        shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ParallelError(
            "cannot split this quantized model with parallel='tensor': each rank must hold whole "
            f"quantization groups, but {shown}; convert with a smaller --q-group-size or use "
            "parallel='pipeline'"
        )


def pipeline_layers(config: ModelConfig, rank: int, size: int) -> range:
    """The contiguous decoder layers rank `rank` of `size` runs (first ranks take the extra)."""
    if size < 2:
        raise ParallelError(f"pipeline parallelism needs at least 2 processes, got {size}")
    layers = config.num_hidden_layers
    if size > layers:
        raise ParallelError(
            f"cannot split {layers} layers over {size} processes with parallel='pipeline': "
            "every process needs at least one layer"
        )
    base, extra = divmod(layers, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
