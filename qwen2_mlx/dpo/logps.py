"""Sequence log-probabilities of replies, for the policy and for the reference model.

``log pi(y|x) = sum_t log softmax(logits_t)[y_t]`` over the scored targets of each row only
(the reply and its <|im_end|>; the prompt and the padding never enter). The output head runs
on those positions alone (`qwen2_mlx.train.logps`), so no (rows, length, vocab) logits tensor
exists.

The reference model is the same model with every adapter switched off (`adapters_disabled`):
the base weights are shared, so DPO holds one copy of them, not two as mlx-lm-lora does.
"""

from __future__ import annotations

from contextlib import nullcontext

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from qwen2_mlx.lora.layers import ADAPTER_PARAMETERS, adapters_disabled, lora_layers
from qwen2_mlx.train.data import Batch
from qwen2_mlx.train.logps import token_logps


def sequence_logps(model: nn.Module, batch: Batch) -> mx.array:
    """(rows,) float32: each row's summed log-probability of its scored targets."""
    rows, width = batch.inputs.shape
    row_of = batch.positions // width
    # A (rows, N) 0/1 matrix sums the tokens of each row (differentiable, one matmul).
    membership = (mx.arange(rows)[:, None] == row_of[None, :]).astype(mx.float32)
    return membership @ token_logps(model, batch)


def check_reference_is_base(model: nn.Module) -> None:
    """Raise ValueError unless only adapter parameters train.

    With adapters disabled the model must be exactly the base model; a trainable embedding or
    norm would move the "reference" along with the policy (unsloth's hazard (b)).
    """
    others = [name for name, _ in tree_flatten(model.trainable_parameters())
              if name.rsplit(".", 1)[-1] not in ADAPTER_PARAMETERS]
    if others:
        shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
        raise ValueError(f"DPO takes its reference model from the base weights with the adapters "
                         f"disabled, so only adapter parameters may train; these train too: "
                         f"{shown}")


def reference_logps(model: nn.Module, batch: Batch) -> mx.array:
    """The base model's `sequence_logps` (adapters off, dropout off), evaluated and detached.

    A model without adapters is its own base (so references can be precomputed before any
    adapter is added). Computed before, and outside, the policy's gradient pass: it holds no
    graph and its activations are freed before the policy's forward starts.
    """
    was_training = model.training
    model.eval()
    try:
        with adapters_disabled(model) if lora_layers(model) else nullcontext():
            logps = mx.stop_gradient(sequence_logps(model, batch))
            mx.eval(logps)
    finally:
        model.train(was_training)
    return logps
