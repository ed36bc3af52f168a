"""LoRA adapters (loaded, not trained) on a sharded model: they follow their base layers.

An adapter adds ``scale * (x @ lora_a) @ lora_b`` to its base projection (lora/layers.py).
- Base split by output rows (q/k/v, gate/up): lora_b's columns and DoRA's magnitude `m` are
  cut like the base's rows; lora_a is whole. The update is then local, as the base's output.
- Base split by input (o_proj, down_proj): lora_a's rows are cut like the base's input; each
  rank's ``x_r @ lora_a_r @ lora_b`` is a partial sum like the base's, so it is added before
  the all_sum (`RowParallelLoRALinear`). DoRA's row norms ||W + delta|| span the whole input:
  each rank's sum of squares is all_summed.
- Routed experts: lora_a and lora_b are cut along the expert axis like the experts.
- Pipeline: a rank loads the adapters of its own layers.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from qwen2_mlx.lora.adapters import (
    load_adapter_weights,
    read_adapter_config,
    resolve_adapter_files,
)
from qwen2_mlx.lora.layers import (
    LoRAConfig,
    LoRALinear,
    adaptable_paths,
    apply_lora,
    dense_weight,
    expand_targets,
)
from qwen2_mlx.parallel.pipeline import PipelineStage, select_stage_weights
from qwen2_mlx.parallel.tensor import RowParallel, Split, as_subclass, take


class RowParallelLoRALinear(LoRALinear):
    """LoRA around an input-split projection (`RowParallelLinear`): base and adapter partial
    outputs are summed over ranks together."""

    def __call__(self, x: mx.array) -> mx.array:
        base = self.base
        if not self.enabled:
            return base(x)
        z = (self._dropped(x) @ self.lora_a) @ self.lora_b  # float32 (promoted)
        y = base.partial(x)
        if not self.is_dora:
            return base.combine(y + (self.scale * z).astype(y.dtype))
        # m / ||W'||_row is one factor per output row, so it may scale the partial sums.
        factor = self.m / mx.stop_gradient(self.adapted_row_norm())
        return base.combine((factor * (y + self.scale * z)).astype(y.dtype))

    def adapted_row_norm(self) -> mx.array:
        w = dense_weight(self.base).astype(mx.float32) + self.delta_weight()
        squares = mx.distributed.all_sum((w * w).sum(axis=1), group=self.base.group)
        return mx.sqrt(squares)


def adapter_slice(param: str, split: Split) -> tuple[int, int, int] | None:
    """(axis, start, stop) of adapter tensor `param` for a base cut by `split`; None: whole."""
    part = split.part
    if split.kind == "experts":  # lora_a (E, r, in), lora_b (E, out, r)
        return 0, part.start, part.stop
    if split.kind == "rows":  # lora_b (r, out), m (out,)
        return {"lora_b": (1, part.start, part.stop), "m": (0, part.start, part.stop)}.get(param)
    return (0, part.start, part.stop) if param == "lora_a" else None  # lora_a (in, r)


def _select_tensor_parallel(splits: dict[str, Split]):
    def select(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        out = {}
        for name, value in weights.items():
            path, _, param = name.rpartition(".")
            split = splits.get(path.removesuffix(".base"))
            where = adapter_slice(param, split) if split is not None else None
            out[name] = take(value, *where) if where else value
        return out

    return select


def _local_layers(config: LoRAConfig, total: int, stage: PipelineStage) -> int:
    """How many of this stage's layers the adapter covers (it adapts the last num_layers)."""
    first_adapted = total - (config.num_layers or total)
    return max(0, stage.layers.stop - max(stage.layers.start, first_adapted))


def load_sharded_adapter(
    model: nn.Module, adapter_path, *, splits: dict[str, Split] | None = None,
    stage: PipelineStage | None = None, total_layers: int | None = None,
) -> nn.Module:
    """`lora.load_adapter` for a model sharded by tensor (`splits`) or pipeline (`stage`)
    parallelism: wrap this rank's layers and load its part of the adapter tensors."""
    weights_file, config_file = resolve_adapter_files(adapter_path)
    config, _ = read_adapter_config(config_file)
    if stage is not None:
        local = _local_layers(config, total_layers, stage)
        blocks = model.layers[len(model.layers) - local:]
        # A target may live only in other stages' layers (a MoE model's dense layers).
        config.targets = tuple(t for t in config.targets
                               if any(expand_targets([t], adaptable_paths(b)) for b in blocks))
        if local == 0 or not config.targets:
            return model  # the adapter covers none of this stage's layers
        config.num_layers = local
        apply_lora(model, config)
        load_adapter_weights(model, weights_file, select=lambda w: select_stage_weights(stage, w))
    else:
        apply_lora(model, config)
        swaps = [(path, as_subclass(m, RowParallelLoRALinear)) for path, m in model.named_modules()
                 if isinstance(m, LoRALinear) and isinstance(m.base, RowParallel)]
        if swaps:
            model.update_modules(tree_unflatten(swaps))
        load_adapter_weights(model, weights_file, select=_select_tensor_parallel(splits))
    model.eval()
    return model
