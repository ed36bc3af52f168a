"""DPO training: `train_dpo(model, tokenizer, data, ...)`, the DPO objective on the training loop.

It trains LoRA adapters with `qwen2_mlx.train`'s `run_training` (optimizer and schedule,
batch order, gradient accumulation, clipping, NaN stop, checkpoints and exact resume), given a
`DPOObjective`: a DPO loss instead of cross-entropy. The loss of a step is the mean of the
per-pair losses over all its pairs; with gradient accumulation the per-pair sums of the
micro-batches are added before dividing, so k micro-batches of b pairs give the gradient of
one batch of k*b pairs.

The reference model is the policy with its adapters disabled. Its log-probs come either from
a forward pass before each policy pass (no graph, freed before the policy's forward) or, with
`precompute_ref`, from one pass over each dataset at the start, cached on disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from qwen2_mlx.dpo.data import (
    PreferenceBatch,
    PreferenceDataset,
    load_preference_datasets,
    make_preference_batch,
)
from qwen2_mlx.dpo.logps import check_reference_is_base, reference_logps, sequence_logps
from qwen2_mlx.dpo.loss import (
    METRICS,
    check_loss_settings,
    dpo_loss,
    metric_sums,
    metrics_dict,
)
from qwen2_mlx.dpo.reference import precompute_reference_logps
from qwen2_mlx.lora.layers import LoRAConfig
from qwen2_mlx.train.checkpoint import prepare_adapter_dir, prepare_adapters, start_training
from qwen2_mlx.train.config import TrainingConfig, TrainingProgress, TrainingResult
from qwen2_mlx.train.evaluate import evaluate_batches
from qwen2_mlx.train.loop import MicroStep, Objective, run_training


@dataclass
class DPOConfig:
    """The preference objective and where the reference log-probs come from.

    Args:
        beta: strength of the implicit KL constraint (TRL's default 0.1; IPO's tau).
        loss_type: "sigmoid" (DPO), "ipo" or "hinge".
        label_smoothing: assumed share of flipped labels, conservative DPO (sigmoid only).
        precompute_ref: compute the reference log-probs of each dataset once before training
            (cached in `ref_cache_dir`) instead of a reference forward pass every step.
        ref_cache_dir: directory of the reference cache (default: the adapter directory).
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    precompute_ref: bool = False
    ref_cache_dir: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        check_loss_settings(self.beta, self.loss_type, self.label_smoothing)


@dataclass
class DPOProgress(TrainingProgress):
    """A TrainingProgress with the DPO metrics.

    `metrics`: on "step" the step's values, averaged since the previous report when `report`
    is True; on "validation" the validation values; on "reference" (after the reference
    log-probs of a split are ready) {"pairs": n, "cached": 1.0 if read from the cache}.
    `split` names the dataset of a "reference" event; `checkpoint` is then its cache file.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    split: str | None = None


@dataclass
class DPOResult(TrainingResult):
    metrics: list[dict[str, float]] = field(default_factory=list)  # one per step of this run
    val_metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    reference_files: dict[str, Path] = field(default_factory=dict)
    reference_peak_memory_gb: float = 0.0  # of the precompute pass, when run


Callback = Callable[[DPOProgress], "bool | None"]


def _reference_for(model: nn.Module, dataset: PreferenceDataset,
                   batch: PreferenceBatch) -> tuple[mx.array, mx.array]:
    if dataset.ref_chosen is not None and dataset.ref_rejected is not None:
        return (mx.array(dataset.ref_chosen[batch.indices]),
                mx.array(dataset.ref_rejected[batch.indices]))
    logps = reference_logps(model, batch.sequences)
    return logps[:batch.size], logps[batch.size:]


def batch_dpo_loss(model: nn.Module, batch: PreferenceBatch, ref_chosen: mx.array,
                   ref_rejected: mx.array, dpo: DPOConfig) -> tuple[mx.array, mx.array]:
    """(sum of the per-pair losses, `metric_sums`) of one batch under the policy."""
    logps = sequence_logps(model, batch.sequences)
    n = batch.size
    pair = dpo_loss(logps[:n], logps[n:], ref_chosen, ref_rejected, beta=dpo.beta,
                    loss_type=dpo.loss_type, label_smoothing=dpo.label_smoothing,
                    chosen_lengths=batch.scored[:n], rejected_lengths=batch.scored[n:])
    return pair.losses.sum(), metric_sums(pair, logps[:n], logps[n:])


def evaluate_dpo(model: nn.Module, dataset: PreferenceDataset, dpo: DPOConfig | None = None,
                 batch_size: int = 4, max_batches: int = -1, pad_id: int = 0) -> dict[str, float]:
    """Mean DPO metrics (`METRICS`) over `dataset` (first `max_batches` length-sorted batches;
    -1: all), with dropout off. Uses the dataset's precomputed reference log-probs if any."""
    dpo = dpo or DPOConfig()

    def score(indices):
        batch = make_preference_batch(dataset, indices, pad_id)
        ref_chosen, ref_rejected = _reference_for(model, dataset, batch)
        _, sums = batch_dpo_loss(model, batch, ref_chosen, ref_rejected, dpo)
        return sums, batch.size

    sums, pairs = evaluate_batches(model, dataset, score, batch_size=batch_size,
                                   max_batches=max_batches, pad_id=pad_id)
    return metrics_dict(sums, pairs)


class DPOObjective(Objective):
    """The mean DPO loss over the pairs of a `PreferenceDataset`; its step, report and
    validation events carry the DPO metrics (`DPOProgress.metrics`)."""

    progress_type = DPOProgress

    def __init__(self, model: nn.Module, train_set: PreferenceDataset,
                 valid_set: PreferenceDataset | None, config: TrainingConfig, dpo: DPOConfig,
                 pad_id: int = 0):
        super().__init__(model, train_set, valid_set, config, pad_id)
        self.train_set, self.dpo, self.pad_id = train_set, dpo, pad_id

        def loss_fn(model, batch, ref_chosen, ref_rejected):
            return batch_dpo_loss(model, batch, ref_chosen, ref_rejected, dpo)

        self._loss_and_grad = nn.value_and_grad(model, loss_fn)
        # The metric sums and pairs since the previous report: its metrics are per-pair means.
        self._window_sums, self._window_pairs = mx.zeros(len(METRICS)), 0

    def micro_batch(self, index: int) -> PreferenceBatch:
        return make_preference_batch(self.train_set, self.schedule.indices(index), self.pad_id)

    def loss_and_grad(self, batch: PreferenceBatch) -> MicroStep:
        ref_chosen, ref_rejected = _reference_for(self.model, self.train_set, batch)
        (loss, sums), grads = self._loss_and_grad(self.model, batch, ref_chosen, ref_rejected)
        return MicroStep(loss, grads, terms=batch.size, tokens=batch.sequences.tokens,
                         trained_tokens=batch.sequences.trained, metric_sums=sums)

    def validate(self, result: DPOResult, step: int) -> tuple[float, dict]:
        config = self.config
        val = evaluate_dpo(self.model, self.valid_set, self.dpo, config.batch_size,
                           config.val_batches, self.pad_id)
        result.val_metrics.append((step, val))
        return val["loss"], {"metrics": val}

    def step_fields(self, result: DPOResult, metric_sums, terms: int) -> dict:
        step_metrics = metrics_dict(metric_sums, terms)
        result.metrics.append(step_metrics)
        self._window_sums = self._window_sums + metric_sums
        self._window_pairs += terms
        return {"metrics": step_metrics}

    def report_fields(self) -> dict:
        metrics = metrics_dict(self._window_sums, self._window_pairs)
        self._window_sums, self._window_pairs = mx.zeros(len(METRICS)), 0
        return {"metrics": metrics, "train_loss": metrics["loss"]}

    def done_fields(self, result: DPOResult) -> dict:
        return {"metrics": result.metrics[-1] if result.metrics else {}}


def train_dpo(
    model: nn.Module,
    tokenizer,
    data: str | os.PathLike | dict[str, PreferenceDataset | None],
    *,
    adapter_path: str | os.PathLike = "adapters",
    lora: LoRAConfig | None = None,
    config: TrainingConfig | None = None,
    dpo: DPOConfig | None = None,
    resume_adapter_file: str | os.PathLike | None = None,
    callback: Callback | None = None,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> DPOResult:
    """Train LoRA adapters on `model` with DPO and save them under `adapter_path`.

    Args:
        model: a loaded base model (float or quantized), with or without LoRA layers; LoRA
            layers are added from `lora` when it has none. The base with adapters disabled is
            the reference model.
        tokenizer: the model's tokenizer (renders the pairs; may be None when `data` holds
            tokenized datasets).
        data: a directory with train.jsonl (and valid.jsonl) of preference pairs, or
            {"train": PreferenceDataset, "valid": PreferenceDataset or None}.
        adapter_path: output directory, as for LoRA training (adapters, optimizer state,
            numbered checkpoints every `save_every` steps) plus the reference cache.
        lora: what to adapt (default LoRAConfig(); read from the adapter's config on resume).
        config: the training settings of LoRA training (`mask_prompt` and `chat` do not apply:
            DPO always scores the replies of chat-rendered pairs). `batch_size` counts pairs.
        dpo: the objective and the reference (default DPOConfig()).
        resume_adapter_file: an adapters.safetensors (or numbered checkpoint) to continue
            from, with its optimizer state and step.
        callback: called with a DPOProgress on each event; returning False stops training
            after saving the adapters.
        metadata: extra fields for adapter_config.json.
        overwrite: replace the adapters of an earlier run in `adapter_path` (its cached
            reference log-probs are kept); without it (and without `resume_adapter_file`) a
            directory that already holds files is refused.

    Raises TrainingDivergedError when the loss or gradient turns NaN/inf (nothing is written
    for that step), ValueError when parameters other than the adapters would train.
    """
    config = config or TrainingConfig()
    dpo = dpo or DPOConfig()
    adapter_path = prepare_adapter_dir(adapter_path, resuming=resume_adapter_file is not None,
                                       overwrite=overwrite)
    if isinstance(data, dict):
        datasets = data
    else:
        datasets = load_preference_datasets(data, tokenizer, splits=("train", "valid"),
                                            max_seq_length=config.max_seq_length)
    train_set, valid_set = datasets["train"], datasets.get("valid")
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0

    lora, resume_file = prepare_adapters(model, lora, config.seed, resume_adapter_file)
    check_reference_is_base(model)
    start = start_training(model, config, resume_file)
    objective = DPOObjective(model, train_set, valid_set, config, dpo, pad_id)
    result = DPOResult(step=start.step)

    if dpo.precompute_ref:
        cache_dir = Path(dpo.ref_cache_dir) if dpo.ref_cache_dir is not None else adapter_path
        mx.reset_peak_memory()
        for split, dataset in (("train", train_set), ("valid", valid_set)):
            if dataset is None:
                continue
            file, cached = precompute_reference_logps(model, dataset, batch_size=config.batch_size,
                                                      cache_dir=cache_dir, pad_id=pad_id)
            result.reference_files[split] = file
            if callback is not None:
                callback(DPOProgress("reference", start.step, config.iters, checkpoint=file,
                                     split=split, peak_memory_gb=mx.get_peak_memory() / 1e9,
                                     metrics={"pairs": float(len(dataset)),
                                              "cached": float(cached)}))
        result.reference_peak_memory_gb = mx.get_peak_memory() / 1e9

    extra = {"training": asdict(config),
             "dpo": {**asdict(dpo), "ref_cache_dir": None if dpo.ref_cache_dir is None
                     else str(dpo.ref_cache_dir)},
             **(metadata or {})}
    return run_training(objective, start, result, config=config, adapter_path=adapter_path,
                        lora=lora, extra=extra, callback=callback)
