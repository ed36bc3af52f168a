"""Gradient checkpointing for decoder blocks with `mx.checkpoint`.

A checkpointed block keeps only its input for the backward pass and recomputes its inside,
trading about one extra forward per block for the activation memory of all blocks.

mlx-lm patches `type(layer).__call__`, which changes every instance of the class in the
process (other models included). Here each chosen block gets its own subclass, so nothing
else is touched and `disable_grad_checkpoint` restores the original class.

`mx.checkpoint` recomputes the block by calling it again, so a dropout mask drawn from the
global random state would differ between the forward and the recomputation (the gradient
would then belong to another mask). The wrapper therefore draws one key per call and hands
each LoRA layer of the block a fixed sub-key, identical in both passes.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
import mlx.nn as nn

from qwen2_mlx.lora.layers import lora_layers


@cache
def _checkpointed_class(cls: type) -> type:
    def __call__(self, x: mx.array, *args, **kwargs):
        adapters = [m for m in lora_layers(self) if m.training and m.dropout > 0.0]
        key = mx.random.randint(0, 2**31 - 1, (2,), dtype=mx.uint32) if adapters else None

        def inner(params, x):
            self.update(params)
            if key is not None:
                for adapter, sub in zip(adapters, mx.random.split(key, len(adapters)),
                                        strict=True):
                    adapter.dropout_key = sub
            try:
                return cls.__call__(self, x, *args, **kwargs)
            finally:
                for adapter in adapters:
                    adapter.dropout_key = None

        return mx.checkpoint(inner)(self.trainable_parameters(), x)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__,
                                                        "_unchecked_class": cls})


def enable_grad_checkpoint(blocks: list[nn.Module]) -> None:
    """Checkpoint each of `blocks` (typically `model.layers`)."""
    for block in blocks:
        if "_unchecked_class" not in type(block).__dict__:
            block.__class__ = _checkpointed_class(type(block))


def disable_grad_checkpoint(blocks: list[nn.Module]) -> None:
    """Undo `enable_grad_checkpoint`."""
    for block in blocks:
        original = type(block).__dict__.get("_unchecked_class")
        if original is not None:
            block.__class__ = original
