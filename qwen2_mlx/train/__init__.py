"""Training Qwen2 adapters in MLX: one loop, one data pipeline, one checkpoint format.

    >>> from qwen2_mlx import load
    >>> from qwen2_mlx.lora import LoRAConfig
    >>> from qwen2_mlx.train import TrainingConfig, train
    >>> model, tokenizer = load("Qwen/Qwen2-0.5B-Instruct")
    >>> train(model, tokenizer, "data/", adapter_path="adapters",
    ...       lora=LoRAConfig(rank=8, alpha=16), config=TrainingConfig(iters=600))

What every objective shares:

* loop.py: `run_training`, driven by an `Objective` (batches, loss, report hooks);
* config.py: `TrainingConfig`, `TrainingProgress` (callback events), `TrainingResult`;
* optimizer.py: schedule, optimizer, gradient norm and clipping, the NaN/inf stop;
* data.py: JSONL reading with file:line errors, split files, `Batch`, `BatchSchedule`;
* checkpoint.py: the adapter directory, checkpoints and exact resume;
* logps.py: `token_logps(model, batch)`, behind every loss and evaluation;
* evaluate.py: `evaluate_batches`, the one evaluation routine;
* progress.py: the progress lines the commands print;
* grad_checkpoint.py: recomputing blocks in the backward pass.

The objectives: next-token fine-tuning here (finetune.py, with its data formats in
text_data.py), preference tuning in `qwen2_mlx.dpo`.
"""

from qwen2_mlx.train.config import TrainingConfig, TrainingProgress, TrainingResult
from qwen2_mlx.train.data import DataFormatError, TruncationWarning
from qwen2_mlx.train.finetune import evaluate, train
from qwen2_mlx.train.logps import token_logps
from qwen2_mlx.train.optimizer import TrainingDivergedError
from qwen2_mlx.train.text_data import Dataset, load_datasets, load_jsonl

__all__ = [
    "DataFormatError",
    "Dataset",
    "TrainingConfig",
    "TrainingDivergedError",
    "TrainingProgress",
    "TrainingResult",
    "TruncationWarning",
    "evaluate",
    "load_datasets",
    "load_jsonl",
    "token_logps",
    "train",
]
