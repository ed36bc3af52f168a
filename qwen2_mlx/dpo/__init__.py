"""Direct Preference Optimization of Qwen2 models with LoRA adapters, in MLX.

    >>> from qwen2_mlx import load
    >>> from qwen2_mlx.dpo import DPOConfig, train_dpo
    >>> from qwen2_mlx.lora import LoRAConfig
    >>> from qwen2_mlx.train import TrainingConfig
    >>> model, tokenizer = load("Qwen/Qwen2-0.5B-Instruct")
    >>> train_dpo(model, tokenizer, "examples/dpo/data", adapter_path="dpo_adapters",
    ...           lora=LoRAConfig(rank=8, alpha=16), config=TrainingConfig(iters=100),
    ...           dpo=DPOConfig(beta=0.1, loss_type="sigmoid"))

The reference model is the same model with its adapters disabled (no second copy of the
weights); `DPOConfig(precompute_ref=True)` computes its log-probs once per dataset and caches
them on disk. The adapters load like LoRA ones (`load(..., adapter_path=...)`, `qwen2-mlx fuse`).
"""

from qwen2_mlx.dpo.data import (
    PreferenceBatch,
    PreferenceDataset,
    PreferencePair,
    encode_pair,
    load_preference_datasets,
    load_preference_jsonl,
    make_preference_batch,
)
from qwen2_mlx.dpo.logps import reference_logps, sequence_logps
from qwen2_mlx.dpo.loss import LOSS_TYPES, METRICS, PairLosses, dpo_loss
from qwen2_mlx.dpo.reference import precompute_reference_logps
from qwen2_mlx.dpo.trainer import DPOConfig, DPOProgress, DPOResult, evaluate_dpo, train_dpo

__all__ = [
    "DPOConfig",
    "DPOProgress",
    "DPOResult",
    "LOSS_TYPES",
    "METRICS",
    "PairLosses",
    "PreferenceBatch",
    "PreferenceDataset",
    "PreferencePair",
    "dpo_loss",
    "encode_pair",
    "evaluate_dpo",
    "load_preference_datasets",
    "load_preference_jsonl",
    "make_preference_batch",
    "precompute_reference_logps",
    "reference_logps",
    "sequence_logps",
    "train_dpo",
]
