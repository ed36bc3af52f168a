"""Running one Qwen2 model over several processes (several Macs) with `mx.distributed`.

    # mlx.launch -n 2 --backend ring --python "$(which python)" script.py
    from qwen2_mlx import load, generate
    model, tokenizer = load("Qwen/Qwen2-7B-Instruct", parallel="tensor")   # or "pipeline"
    text = generate(model, tokenizer, "Hello", max_tokens=32)   # same text on every rank

- `parallel="tensor"`: every layer split across ranks (tensor.py; Qwen2-MoE's experts divided
  among ranks, experts.py); two all_sums of one hidden-size vector per token per layer.
- `parallel="pipeline"`: contiguous layer ranges per rank (pipeline.py); one send per token
  per rank boundary.
- plan.py decides who holds what and refuses shard counts a model cannot use; group.py makes
  errors on one rank fail every rank alike; fingerprint.py checks all ranks load the same
  files; watchdog.py ends a run whose peer stopped answering.
"""

from qwen2_mlx.parallel.group import init_group, launched_rank
from qwen2_mlx.parallel.load import Sharding, load_sharded, load_sharded_model
from qwen2_mlx.parallel.plan import (
    MODES,
    ParallelError,
    TensorShard,
    pipeline_layers,
    tensor_shard,
)
from qwen2_mlx.parallel.watchdog import RankWatchdog

__all__ = [
    "MODES",
    "ParallelError",
    "RankWatchdog",
    "Sharding",
    "TensorShard",
    "init_group",
    "launched_rank",
    "load_sharded",
    "load_sharded_model",
    "pipeline_layers",
    "tensor_shard",
]
