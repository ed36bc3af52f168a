"""Reference log-probabilities computed once per dataset and cached on disk.

With `precompute_reference_logps`, each training step runs the policy only (no reference
forward). The values are computed with the adapters disabled, over the same length-sorted
batches the trainer uses (`BatchSchedule` groups do not depend on the seed), so for the same
batch size they equal the reference log-probs of the on-the-fly pass exactly.

The cache file is keyed by a hash of the tokenized pairs and of the model without its
adapters (base weights under their adapter-free names, and the model config), so a cache
made before training is valid while training and after resuming, for any adapter, and is
recomputed when the data, the base model, its dtype or its quantization change. It is written
atomically (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from qwen2_mlx.dpo.data import PreferenceDataset, make_preference_batch
from qwen2_mlx.dpo.logps import reference_logps
from qwen2_mlx.files import atomic_save_safetensors
from qwen2_mlx.lora.layers import ADAPTER_PARAMETERS
from qwen2_mlx.train.checkpoint import REUSABLE_PREFIX
from qwen2_mlx.train.data import BatchSchedule

CACHE_FORMAT = 1
CACHE_PREFIX = REUSABLE_PREFIX  # kept by a new run into the same adapter directory


def _hash_array(h, value: mx.array) -> None:
    h.update(f"{value.dtype}{tuple(value.shape)}".encode())
    try:
        h.update(memoryview(value))
    except (BufferError, TypeError, ValueError):  # not contiguous: hash a packed copy
        h.update(np.array(value.view(mx.uint8)).tobytes())


def model_fingerprint(model: nn.Module) -> str:
    """Hex digest of the model's base weights and config, adapters excluded.

    A LoRA layer keeps its wrapped layer under ``.base``, so names drop that segment: the
    digest is the same before and after `apply_lora`, whatever is adapted.
    """
    h = hashlib.blake2b(digest_size=20)
    config = getattr(model, "config", None)
    if is_dataclass(config):
        h.update(json.dumps(asdict(config), sort_keys=True, default=str).encode())
    entries = []
    for name, value in tree_flatten(model.parameters()):
        parts = name.split(".")
        if parts[-1] in ADAPTER_PARAMETERS:
            continue
        entries.append((".".join(p for p in parts if p != "base"), value))
    for name, value in sorted(entries, key=lambda e: e[0]):
        h.update(name.encode())
        _hash_array(h, value)
    return h.hexdigest()


def dataset_fingerprint(dataset: PreferenceDataset) -> str:
    """Hex digest of the pairs' tokens and score masks, in order."""
    h = hashlib.blake2b(digest_size=20)
    for pair in dataset.examples:
        for example in (pair.chosen, pair.rejected):
            h.update(len(example.tokens).to_bytes(8, "little"))
            h.update(np.asarray(example.tokens, dtype=np.int64).tobytes())
            h.update(np.asarray(example.mask, dtype=np.bool_).tobytes())
    return h.hexdigest()


def cache_key(model: nn.Module, dataset: PreferenceDataset) -> str:
    return hashlib.blake2b(
        f"{CACHE_FORMAT}:{dataset_fingerprint(dataset)}:{model_fingerprint(model)}".encode(),
        digest_size=20).hexdigest()


def _read_cache(file: Path, key: str, pairs: int) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        arrays, metadata = mx.load(str(file), return_metadata=True)
    except Exception:  # a damaged cache is recomputed, not trusted
        return None
    if metadata.get("key") != key or set(arrays) != {"chosen", "rejected"}:
        return None
    chosen, rejected = np.array(arrays["chosen"]), np.array(arrays["rejected"])
    if chosen.shape != (pairs,) or rejected.shape != (pairs,):
        return None
    return chosen, rejected


def compute_reference_logps(model: nn.Module, dataset: PreferenceDataset, batch_size: int = 4,
                            pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) summed reference log-probs of every pair, float32, in dataset order."""
    chosen = np.zeros(len(dataset), dtype=np.float32)
    rejected = np.zeros(len(dataset), dtype=np.float32)
    plan = BatchSchedule(dataset, min(batch_size, len(dataset)), shuffle=False, pad_id=pad_id)
    for index in range(len(plan)):
        batch = make_preference_batch(dataset, plan.indices(index), pad_id)
        logps = np.array(reference_logps(model, batch.sequences))
        chosen[batch.indices] = logps[:batch.size]
        rejected[batch.indices] = logps[batch.size:]
    return chosen, rejected


def precompute_reference_logps(model: nn.Module, dataset: PreferenceDataset, *,
                               batch_size: int = 4, cache_dir: str | os.PathLike | None = None,
                               pad_id: int = 0) -> tuple[Path | None, bool]:
    """Fill `dataset.ref_chosen` / `ref_rejected` from the cache in `cache_dir`, or compute
    them (adapters disabled) and write the cache there.

    Returns (cache file or None without `cache_dir`, whether it was read from the cache).
    """
    key = cache_key(model, dataset) if cache_dir is not None else ""
    file = Path(cache_dir) / f"{CACHE_PREFIX}{key}.safetensors" if cache_dir is not None else None
    cached = _read_cache(file, key, len(dataset)) if file is not None and file.is_file() else None
    if cached is None:
        chosen, rejected = compute_reference_logps(model, dataset, batch_size, pad_id)
        if file is not None:
            atomic_save_safetensors(file, {"chosen": mx.array(chosen),
                                           "rejected": mx.array(rejected)},
                                    {"key": key, "pairs": str(len(dataset)),
                                     "source": str(dataset.path or "")})
    else:
        chosen, rejected = cached
    dataset.ref_chosen, dataset.ref_rejected = chosen, rejected
    return file, cached is not None
