"""LoRA fine-tuning: `train(model, tokenizer, data, ...)`, the next-token objective on the
training loop.

Loss: next-token cross-entropy summed over the trained target tokens of a batch and divided
by their number (the token-level mean of transformers and mlx-lm).
"""

from __future__ import annotations

import os
from dataclasses import asdict

import mlx.core as mx
import mlx.nn as nn

from qwen2_mlx.lora.layers import LoRAConfig
from qwen2_mlx.train.checkpoint import prepare_adapter_dir, prepare_adapters, start_training
from qwen2_mlx.train.config import Callback, TrainingConfig, TrainingResult
from qwen2_mlx.train.data import Batch, make_batch
from qwen2_mlx.train.evaluate import evaluate_batches
from qwen2_mlx.train.logps import token_logps
from qwen2_mlx.train.loop import MicroStep, Objective, run_training
from qwen2_mlx.train.text_data import Dataset, load_datasets


def batch_loss_sum(model: nn.Module, batch: Batch) -> mx.array:
    """Sum over the batch's trained targets of -log p(target), in float32."""
    return -token_logps(model, batch).sum()


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 4,
             max_batches: int = -1) -> float:
    """Token-level mean loss over `dataset` (first `max_batches` length-sorted batches; -1: all),
    with dropout off."""

    def score(indices):
        batch = make_batch([dataset.examples[i] for i in indices])
        return batch_loss_sum(model, batch), batch.trained

    total, count = evaluate_batches(model, dataset, score, batch_size=batch_size,
                                    max_batches=max_batches)
    return float(total) / max(count, 1)


class CrossEntropyObjective(Objective):
    """The token-level mean cross-entropy of `batch_loss_sum` on a `Dataset`."""

    def __init__(self, model: nn.Module, train_set: Dataset, valid_set: Dataset | None,
                 config: TrainingConfig, pad_id: int = 0):
        super().__init__(model, train_set, valid_set, config, pad_id)
        self._loss_and_grad = nn.value_and_grad(model, batch_loss_sum)

    def micro_batch(self, index: int) -> Batch:
        return self.schedule.batch(index)

    def loss_and_grad(self, batch: Batch) -> MicroStep:
        loss, grads = self._loss_and_grad(self.model, batch)
        return MicroStep(loss, grads, terms=batch.trained, tokens=batch.tokens,
                         trained_tokens=batch.trained)

    def validate(self, result: TrainingResult, step: int) -> tuple[float, dict]:
        config = self.config
        return evaluate(self.model, self.valid_set, config.batch_size, config.val_batches), {}


def train(
    model: nn.Module,
    tokenizer,
    data: str | os.PathLike | dict[str, Dataset | None],
    *,
    adapter_path: str | os.PathLike = "adapters",
    lora: LoRAConfig | None = None,
    config: TrainingConfig | None = None,
    resume_adapter_file: str | os.PathLike | None = None,
    callback: Callback | None = None,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> TrainingResult:
    """Fine-tune LoRA adapters on `model` and save them under `adapter_path`.

    Args:
        model: a loaded base model (float or quantized: QLoRA), with or without LoRA layers;
            LoRA layers are added from `lora` when it has none.
        tokenizer: the model's tokenizer (renders chat data; may be None when `data` holds
            already tokenized datasets).
        data: a directory with train.jsonl (and valid.jsonl), or {"train": Dataset,
            "valid": Dataset or None} from `load_datasets`.
        adapter_path: output directory: adapters.safetensors, adapter_config.json,
            training_state.safetensors and numbered checkpoints every `save_every` steps.
        lora: what to adapt (default LoRAConfig(); read from the adapter's config on resume).
        config: training settings (default TrainingConfig()).
        resume_adapter_file: an adapters.safetensors (or numbered checkpoint) to continue
            from; its training_state file restores the optimizer and step.
        callback: called with a TrainingProgress on each event; returning False stops
            training after saving the adapters (for a Stop button).
        metadata: extra fields for adapter_config.json (e.g. the base model's name).
        overwrite: replace the adapters of an earlier run in `adapter_path`; without it (and
            without `resume_adapter_file`) a directory that already holds files is refused.

    The adapter directory is checked (and created) before anything else, so a bad path
    fails at once, not at the first save. Raises TrainingDivergedError when the loss or
    gradient turns NaN/inf; the adapters of that step are not written (earlier checkpoints
    stay). The global MLX random seed is
    reset from `config.seed` at each step (dropout masks and LoRA init are reproducible).
    """
    config = config or TrainingConfig()
    adapter_path = prepare_adapter_dir(adapter_path, resuming=resume_adapter_file is not None,
                                       overwrite=overwrite)
    if isinstance(data, dict):
        datasets = data
    else:
        datasets = load_datasets(data, tokenizer, splits=("train", "valid"),
                                 max_seq_length=config.max_seq_length,
                                 mask_prompt=config.mask_prompt, chat=config.chat)
    train_set, valid_set = datasets["train"], datasets.get("valid")
    lora, resume_file = prepare_adapters(model, lora, config.seed, resume_adapter_file)
    start = start_training(model, config, resume_file)
    objective = CrossEntropyObjective(model, train_set, valid_set, config,
                                      pad_id=getattr(tokenizer, "pad_token_id", None) or 0)
    return run_training(objective, start, TrainingResult(step=start.step), config=config,
                        adapter_path=adapter_path, lora=lora,
                        extra={"training": asdict(config), **(metadata or {})},
                        callback=callback)
