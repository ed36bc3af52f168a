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

import importlib

# Loaded on first use, so that importing a light submodule (the CLI imports `launch` for
# every command) does not import MLX and the model.
_EXPORTS = {
    "MODES": "plan", "ParallelError": "plan", "TensorShard": "plan",
    "pipeline_layers": "plan", "tensor_shard": "plan",
    "init_group": "group", "launched_rank": "launch", "RankWatchdog": "watchdog",
    "Sharding": "load", "load_sharded": "load", "load_sharded_model": "load",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
