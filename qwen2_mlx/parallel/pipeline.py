"""Pipeline parallelism: each rank runs a contiguous range of decoder layers.

Rank 0 embeds the tokens and runs the first layers, sends its hidden state (batch, length,
hidden) to rank 1, which runs the next ones, and so on. The last stage's output then goes to
every rank (one `all_gather`), and every rank applies the final norm and the LM head, so all
ranks hold the same logits and sample the same token. Each rank builds and loads only its own
layers (the others' tensors are never read from the safetensors files); the first rank holds
the embedding, every rank the final norm and the LM head (a tied head is the embedding, which
every rank then holds).

The model calls a `PipelineStage` at two points (`Qwen2Model.pipeline`, see model.py):
`stage_input` instead of the embedding lookup, and `stage_output` after its layers.
"""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn

from qwen2_mlx.parallel.watchdog import note_progress

Group = mx.distributed.Group

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


class PipelineStage:
    """Rank `group.rank()`'s place in the pipeline: it runs global layers `layers`."""

    def __init__(self, group: Group, layers: range, hidden_size: int):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.layers = layers
        self.hidden_size = hidden_size
        self.hidden_dtype = mx.float32  # set from the loaded weights (`set_hidden_dtype`)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def stage_input(self, input_ids: mx.array, embed_tokens: nn.Module) -> mx.array:
        """The hidden state this stage starts from: the token embeddings on the first rank,
        what the previous rank sends on the others."""
        note_progress()
        if self.is_first:
            return embed_tokens(input_ids)
        shape = (*input_ids.shape, self.hidden_size)
        return mx.distributed.recv(shape, self.hidden_dtype, self.rank - 1, group=self.group)

    def stage_output(self, h: mx.array, caches: list | None) -> mx.array:
        """Send `h` on to the next stage and return the last stage's output, on every rank.

        The send must happen even when the caller evaluates only the KV caches (prefill), so
        the last cache of this stage is made to depend on it.
        """
        if not self.is_last:
            h = mx.distributed.send(h, self.rank + 1, group=self.group)
            if caches:
                _depend_on(caches[-1], h)
        gathered = mx.distributed.all_gather(h, group=self.group)
        batch = h.shape[0]
        return gathered[(self.size - 1) * batch:]

    def set_hidden_dtype(self, model: nn.Module) -> None:
        """The hidden state's dtype, as the first stage's embedding produces it: the float
        dtype of the embedding, or of the LM head on ranks that do not hold the embedding
        (a checkpoint stores both alike)."""
        embed = model.model.embed_tokens
        source = embed if holds_embedding(model) else model.lm_head
        self.hidden_dtype = (source["scales"] if "scales" in source else source["weight"]).dtype


def _depend_on(cache, x: mx.array) -> None:
    """Make evaluating `cache`'s state also evaluate `x`."""
    if isinstance(cache.keys, tuple):  # QuantizedKVCache: (packed, scales, biases)
        cache.keys = (mx.depends(cache.keys[0], x), *cache.keys[1:])
    else:
        cache.keys = mx.depends(cache.keys, x)


def shard_pipeline(model: nn.Module, stage: PipelineStage) -> None:
    """Cut a built (not yet loaded) model to `stage`'s layers; ranks after the first drop an
    untied embedding."""
    inner = model.model
    inner.layers = inner.layers[stage.layers.start:stage.layers.stop]
    inner.pipeline = stage
    if not stage.is_first and not model.config.tie_word_embeddings:
        inner.embed_tokens = nn.Module()  # never called: later stages receive hidden states


def select_stage_weights(
    stage: PipelineStage, weights: dict[str, mx.array], keep_embedding: bool = True
) -> dict[str, mx.array]:
    """The tensors (checkpoint or adapter) this stage loads, its layers renumbered from 0;
    the others are dropped unread."""
    out = {}
    for name, value in weights.items():
        if m := _LAYER.match(name):
            layer = int(m[1])
            if layer in stage.layers:
                out[f"model.layers.{layer - stage.layers.start}.{m[2]}"] = value
        elif keep_embedding or not name.startswith("model.embed_tokens."):
            out[name] = value
    return out


def holds_embedding(model: nn.Module) -> bool:
    """Whether this rank kept the embedding table (see `shard_pipeline`)."""
    return len(model.model.embed_tokens.parameters()) > 0
