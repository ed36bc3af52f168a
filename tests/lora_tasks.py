"""Synthetic fine-tuning tasks and helpers shared by the LoRA tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import mlx.core as mx

from qwen2_mlx.lora import lora_layers

LETTERS = "abcd"


def last_letter_items(n_train: int, n_test: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Distinct random strings of 3-6 letters from "abcd", split into train and held-out.

    No held-out string occurs in the training set, so answering them needs the rule
    (answer = the last letter of the string), not a memorised mapping.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    items: list[str] = []
    while len(items) < n_train + n_test:
        s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
        if s not in seen:
            seen.add(s)
            items.append(s)
    return items[:n_train], items[n_train:]


def last_letter_record(s: str) -> dict:
    return {"prompt": s, "completion": s[-1]}


def write_jsonl(path: Path, records: list) -> Path:
    """One JSON object per line (str entries are written verbatim, to make bad lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def randomize_adapters(model, seed: int = 0, std: float = 0.1) -> None:
    """Nonzero B (so A gets gradients too) and, for DoRA, a magnitude away from ||W||."""
    mx.random.seed(seed)
    for layer in lora_layers(model):
        layer.lora_b = std * mx.random.normal(layer.lora_b.shape)
        if "m" in layer:
            layer.m = layer.m * (1.0 + 0.1 * mx.random.normal(layer.m.shape))
    mx.eval(model.parameters())
