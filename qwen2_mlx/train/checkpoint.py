"""Where a training run writes and how it resumes.

The adapter directory is checked (and created) before the first step; an earlier run's
adapters are never silently replaced. A checkpoint is the adapters (`qwen2_mlx.lora`'s files)
plus `training_state.safetensors` (the optimizer state), also kept as a numbered pair
``0000100_*`` every `save_every` steps; both carry the step so a torn pair is detected. Batch
order and dropout masks are functions of (seed, step), so resuming continues exactly.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from qwen2_mlx.errors import HintedError
from qwen2_mlx.files import atomic_save_safetensors
from qwen2_mlx.lora.adapters import (
    ADAPTER_FILE,
    CONFIG_FILE,
    load_adapter_weights,
    read_adapter_config,
    resolve_adapter_files,
    save_adapter,
)
from qwen2_mlx.lora.layers import (
    LoRAConfig,
    apply_lora,
    lora_config_of,
    lora_layers,
    trainable_parameter_count,
)
from qwen2_mlx.train.config import TrainingConfig
from qwen2_mlx.train.optimizer import build_optimizer

STATE_SUFFIX = "training_state.safetensors"
# Files a new run into an adapter directory may find and keep: DPO's cached reference
# log-probs, keyed by the data and base weights (reusable by any run on them).
REUSABLE_PREFIX = "reference_logps_"



class AdapterDirectoryError(HintedError):
    """An adapter directory a training run may not write into (in use, a file, unwritable)."""


def _is_adapter_output(name: str) -> bool:
    return name == CONFIG_FILE or name.endswith((ADAPTER_FILE, STATE_SUFFIX))


def prepare_adapter_dir(adapter_path: str | os.PathLike, *, resuming: bool = False,
                        overwrite: bool = False, create: bool = True) -> Path:
    """Create (or, with `create=False`, only check) the output directory of a training run,
    before its first step.

    A path that is a file, lies under a file, or cannot be written is an error now, not after
    the run. A directory that already holds files (an earlier run's adapters) is refused,
    so retraining never silently replaces adapters, unless the run resumes from a checkpoint
    (`resuming`) or `overwrite` is given: then the earlier run's adapter files (adapters,
    config, training states, numbered checkpoints) are removed and other files are kept.
    """
    path = Path(adapter_path).expanduser()
    if path.exists() and not path.is_dir():
        raise AdapterDirectoryError(f"the adapter path {path} is a file; adapters are written "
                                    "to a directory")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise AdapterDirectoryError(f"cannot create the adapter directory {path}: {existing} "
                                    "is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AdapterDirectoryError(f"cannot write the adapter directory {path}: {existing} "
                                    "is not writable")
    if existing != path and not path.exists():
        if not create:
            return path
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AdapterDirectoryError(f"cannot create the adapter directory {path}: "
                                        f"{e.strerror or e}") from e
    present = sorted(p.name for p in path.iterdir() if not p.name.startswith(REUSABLE_PREFIX))
    if not present or resuming:
        return path
    if not overwrite:
        shown = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "")
        problem = f"the adapter directory {path} already holds {shown}"
        raise AdapterDirectoryError(
            problem,
            api_hint="; resume it (resume_adapter_file=...), replace its adapters "
                     "(overwrite=True) or choose another adapter_path",
            cli_hint=f"; continue that run with --resume-adapter-file {path / ADAPTER_FILE}, "
                     "replace its adapters with --overwrite, or choose another --adapter-path")
    if create:
        for name in present:
            if _is_adapter_output(name) and (path / name).is_file():
                (path / name).unlink()
    return path


def state_file_for(adapter_file: Path) -> Path:
    """training_state file paired with an adapter file: adapters.safetensors ->
    training_state.safetensors, 0000100_adapters.safetensors -> 0000100_training_state..."""
    adapter_file = Path(adapter_file)
    name = adapter_file.name
    if name.endswith(ADAPTER_FILE):
        return adapter_file.with_name(name[: -len(ADAPTER_FILE)] + STATE_SUFFIX)
    return adapter_file.with_name(adapter_file.stem + "." + STATE_SUFFIX)


def save_training_state(path: Path, optimizer_state: dict, step: int) -> None:
    arrays = {f"optimizer.{k}": v for k, v in tree_flatten(optimizer_state)}
    atomic_save_safetensors(path, arrays, {"step": str(step)})


def load_training_state(path: Path) -> tuple[dict[str, mx.array], int]:
    """(flat optimizer state without the 'optimizer.' prefix, step)."""
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise ValueError(f"cannot read training state {path}: {e}") from e
    if "step" not in metadata:
        raise ValueError(f"{path} has no step in its metadata; it is not a training state")
    flat = {k[len("optimizer."):]: v for k, v in arrays.items() if k.startswith("optimizer.")}
    return flat, int(metadata["step"])



def restore_optimizer(optimizer: optim.Optimizer, model: nn.Module, flat: dict) -> None:
    optimizer.init(model.trainable_parameters())
    expected = dict(tree_flatten(optimizer.state))
    if set(flat) != set(expected):
        raise ValueError("the training state does not match the adapters being trained "
                         "(different targets, rank or optimizer); resume with the same settings")
    optimizer.state = tree_unflatten(list(flat.items()))


def prepare_adapters(model: nn.Module, lora: LoRAConfig | None, seed: int,
                     resume_adapter_file: str | os.PathLike | None = None,
                     ) -> tuple[LoRAConfig, Path | None]:
    """Give `model` LoRA layers to train: keep the ones it has, or add them from `lora` (read
    from the checkpoint's adapter_config.json when resuming without one). Returns the
    adapters' config and the adapter file to resume from (None for a fresh run)."""
    resume_file = None
    if resume_adapter_file is not None:
        resume_file, resume_config_file = resolve_adapter_files(resume_adapter_file)
        if lora is None:
            lora, _ = read_adapter_config(resume_config_file)
    if lora_layers(model):
        lora = lora or lora_config_of(model)
    else:
        lora = lora or LoRAConfig()
        mx.random.seed(seed)
        apply_lora(model, lora)
    return lora, resume_file


def resume_checkpoint(model: nn.Module, optimizer: optim.Optimizer, resume_file: Path) -> int:
    """Load the adapter weights of `resume_file` and its optimizer state; returns its step."""
    saved_step = load_adapter_weights(model, resume_file)
    state_file = state_file_for(resume_file)
    if not state_file.is_file():
        # stacklevel: resume_checkpoint < start_training < train / train_dpo < the caller.
        warnings.warn(f"{state_file} not found: resuming from the adapter weights with a "
                      "fresh optimizer at step 0", stacklevel=4)
        return 0
    flat, step = load_training_state(state_file)
    if saved_step is not None and saved_step != step:
        raise ValueError(f"{resume_file} is from step {saved_step} but {state_file} "
                         f"from step {step}: the checkpoint pair is torn")
    restore_optimizer(optimizer, model, flat)
    return step


def save_checkpoint(model: nn.Module, optimizer: optim.Optimizer, adapter_path: Path,
                    lora: LoRAConfig, step: int, *, numbered: bool,
                    extra: dict | None = None) -> Path:
    """Write adapters.safetensors + training_state.safetensors (and the numbered pair
    ``0000100_*`` when `numbered`) with adapter_config.json; returns adapters.safetensors."""
    names = [f"{step:07d}_{ADAPTER_FILE}"] if numbered else []
    for name in names + [ADAPTER_FILE]:
        adapter_file = adapter_path / name
        save_training_state(state_file_for(adapter_file), optimizer.state, step)
        save_adapter(model, adapter_path, lora, file_name=name, step=step, extra=extra)
    return adapter_path / ADAPTER_FILE


@dataclass
class TrainingStart:
    """Where a run begins: the optimizer (restored from the checkpoint when resuming), the step
    it is at, and the model's parameter counts (for the "start" event)."""

    optimizer: optim.Optimizer
    step: int
    resumed: bool
    trainable_parameters: int
    total_parameters: int


def start_training(model: nn.Module, config: TrainingConfig,
                   resume_file: Path | None) -> TrainingStart:
    """Check that `model` has adapters to train, build the optimizer and, when `resume_file`
    is given, restore the adapters, the optimizer state and the step from it."""
    trainable, total = trainable_parameter_count(model)
    if trainable == 0:
        raise ValueError("the model has no trainable adapter parameters")
    optimizer = build_optimizer(config)
    step = 0 if resume_file is None else resume_checkpoint(model, optimizer, resume_file)
    if step > config.iters:
        raise ValueError(f"the checkpoint is at step {step}, past iters={config.iters}")
    return TrainingStart(optimizer, step, resume_file is not None, trainable, total)
