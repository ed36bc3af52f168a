"""`load_sharded`: each process of an `mlx.launch` run loads its part of a Qwen2 model."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from qwen2_mlx.loader import (
    load_config,
    load_model,
    quantization_settings,
    resolve_model_path,
)
from qwen2_mlx.model import ModelConfig
from qwen2_mlx.parallel.adapters import load_sharded_adapter
from qwen2_mlx.parallel.fingerprint import checkpoint_fingerprint
from qwen2_mlx.parallel.group import (
    Group,
    all_or_none,
    broadcast_seed,
    check_same_checkpoint,
    init_group,
)
from qwen2_mlx.parallel.pipeline import (
    PipelineStage,
    holds_embedding,
    select_stage_weights,
    shard_pipeline,
)
from qwen2_mlx.parallel.plan import (
    ParallelError,
    check_all_ranks,
    check_mode,
    check_quantized_split,
    pipeline_layers,
)
from qwen2_mlx.parallel.tensor import Split, TensorSharder, select_weights


@dataclass
class Sharding:
    """What this process holds, set as `model.sharding` by `load_sharded`."""

    mode: str  # "tensor" or "pipeline"
    group: Group
    splits: dict[str, Split] = field(default_factory=dict)  # tensor: what was cut, by path
    stage: PipelineStage | None = None  # pipeline: this rank's layers

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()


def load_sharded(
    path_or_repo: str | os.PathLike,
    *,
    parallel: str | None,
    group: Group | None = None,
    dtype: str | mx.Dtype | None = None,
    adapter_path: str | os.PathLike | None = None,
    revision: str | None = None,
    dca: bool = False,
    chunk_size: int | None = None,
    local_size: int | None = None,
    yarn_factor: float | None = None,
) -> tuple[nn.Module, object]:
    """Load this process's part of a model: `load(..., parallel=...)` (same arguments).

    Every rank of `group` (default: `mx.distributed.init()`) must call it with the same
    arguments. In order: every rank finds the model and fingerprints it (config, tokenizer,
    sampled weights, adapter, options); different fingerprints are refused. The shard count
    is checked against the config before any weight is read. Each rank then builds its part
    (`parallel="tensor"`: heads, hidden units, experts and vocabulary split, see plan.py;
    `"pipeline"`: a contiguous range of layers) and reads only the tensors of that part. A
    failure on any rank raises the same `ParallelError` on every rank. Finally MLX's random
    generator is seeded alike on every rank, so sampling without a seed draws the same tokens
    everywhere (the ranks must, or their collectives would stop matching).

    The model computes the same logits as the whole model on every rank; `model.sharding`
    says what this rank holds. Every rank must then evaluate the same arrays in the same
    order (e.g. all of them run the same `generate`), since each evaluation runs collectives.
    """
    long_context = dict(dca=dca, chunk_size=chunk_size, local_size=local_size,
                        yarn_factor=yarn_factor)
    return _load(path_or_repo, parallel, group, dtype, adapter_path, revision, long_context,
                 with_tokenizer=True)


def load_sharded_model(
    model_path: str | os.PathLike, *, parallel: str | None, group: Group | None = None,
    dtype: str | mx.Dtype | None = None,
) -> nn.Module:
    """The model part alone, from a local directory (no tokenizer needed), as `load_model`
    is to `load`: for benchmarks and checkpoints without tokenizer files."""
    model, _ = _load(model_path, parallel, group, dtype, None, None, {}, with_tokenizer=False)
    return model


def _load(path_or_repo, parallel, group, dtype, adapter_path, revision, long_context: dict,
          with_tokenizer: bool) -> tuple[nn.Module, object]:
    from qwen2_mlx.tokenizer import Qwen2Tokenizer

    if parallel is None:
        raise ParallelError("a group was given without parallel='tensor' or 'pipeline'")
    check_mode(parallel)
    group = init_group(parallel, group)
    options = (parallel, str(dtype), *sorted(long_context.items()))
    fingerprint = b""
    with all_or_none(group):
        model_path = resolve_model_path(path_or_repo, revision=revision)
        raw_config = load_config(model_path)
        config = ModelConfig.from_dict(raw_config)
        fingerprint = checkpoint_fingerprint(model_path, adapter_path, options)
    check_same_checkpoint(group, fingerprint)

    # The configs are now known to be identical, so these checks fail alike on every rank.
    rank, size = group.rank(), group.size()
    sharding = Sharding(parallel, group)
    if parallel == "tensor":
        shard = check_all_ranks(config, size)[rank]
        check_quantized_split(config, quantization_settings(raw_config), size)

        def cut(model: nn.Module, weights: dict) -> dict:
            sharding.splits = TensorSharder(shard, group)(model)
            return select_weights(model, sharding.splits, weights)
    else:
        sharding.stage = PipelineStage(group, pipeline_layers(config, rank, size),
                                       config.hidden_size)

        def cut(model: nn.Module, weights: dict) -> dict:
            shard_pipeline(model, sharding.stage)
            return select_stage_weights(sharding.stage, weights, holds_embedding(model))

    tokenizer = None
    with all_or_none(group):
        model = load_model(model_path, dtype=dtype, shard=cut)
        if sharding.stage is not None:
            sharding.stage.set_hidden_dtype(model)
        if any(v not in (None, False) for v in long_context.values()):
            model.set_long_context(**long_context)
        if adapter_path is not None:
            load_sharded_adapter(model, adapter_path, splits=sharding.splits,
                                 stage=sharding.stage, total_layers=config.num_hidden_layers)
        if with_tokenizer:
            tokenizer = Qwen2Tokenizer.from_pretrained(model_path)
    model.sharding = sharding
    mx.random.seed(broadcast_seed(group, None))
    return model, tokenizer
