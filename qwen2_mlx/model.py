"""The Qwen2 decoder in MLX: attention, MLP or mixture of experts, block, model.

Shapes follow the architecture diagram: tokens (B, L) -> embeddings (B, L, D) -> N pre-norm
blocks -> final RMSNorm -> logits (B, L, V). Attention works in (B, heads, L, head_dim).
Weight names match the Hugging Face checkpoints verbatim so weights load without renaming.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from qwen2_mlx.cache import NO_CACHE, KVCache, ModelCache, QuantizedKVCache
from qwen2_mlx.config import ModelConfig
from qwen2_mlx.dca import DualChunkAttention
from qwen2_mlx.long_context import with_long_context
from qwen2_mlx.masks import Mask, create_attention_masks
from qwen2_mlx.metal_kernels.dispatch import kernel_backend
from qwen2_mlx.metal_kernels.quantized import swiglu
from qwen2_mlx.moe import SparseMoeBlock, is_moe_layer, moe_quant_predicate, stack_expert_weights
from qwen2_mlx.rope import RoPE
from qwen2_mlx.validation import TokenIdError, check_token_array


class Attention(nn.Module):
    """Grouped-query attention: q/k/v with bias, o without; RoPE on q and k, then the cache
    attends (it appends k and v and reads itself as stored, float or quantized).

    Under Dual Chunk Attention (`qwen2_mlx.dca`) the positions and the attention are
    `self.dual_chunk`'s instead: keys are cached rotated at chunk-relative positions and
    queries are rotated three ways (spec long-context.md §4).
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        dim = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.sliding_window = (
            config.sliding_window
            if config.layer_types[layer_idx] == "sliding_attention"
            else None
        )
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)
        self.set_positions(config)

    def set_positions(self, config: ModelConfig) -> None:
        """(Re)build the position encoding for the config's long-context mode."""
        long_context = config.long_context
        self.mode = "dca" if long_context.dca is not None else "standard"
        self.dca = long_context.dca
        self.rope = RoPE(
            self.head_dim,
            theta=config.rope_theta,
            scaling=long_context.rope_scaling,
            max_position_embeddings=config.max_position_embeddings,
        )
        self.dual_chunk = (None if self.dca is None
                           else DualChunkAttention(self.dca, self.rope.inv_freq, self.scale))

    def __call__(self, x: mx.array, mask: Mask = None, cache: KVCache | None = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        cache = cache if cache is not None else NO_CACHE
        if self.dual_chunk is None:
            q = self.rope(q, offset=cache.offset)
            k = self.rope(k, offset=cache.offset)
            out = cache.attend(q, k, v, scale=self.scale, mask=mask)
        else:
            out = self.dual_chunk(q, k, v, cache)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        # Declared in mlx-lm's order so converted checkpoints are byte-identical to its own.
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        # One fused kernel for gate, up and SiLU when the projections are quantized.
        return self.down_proj(swiglu(self.gate_proj, self.up_proj, x))


def feed_forward(config: ModelConfig, layer_idx: int) -> nn.Module:
    """A block's MLP: Qwen2-MoE's sparse experts on its MoE layers, else the dense SwiGLU."""
    if is_moe_layer(config, layer_idx):
        shared = MLP(config.hidden_size, config.shared_expert_intermediate_size)
        return SparseMoeBlock(config, shared_expert=shared)
    return MLP(config.hidden_size, config.intermediate_size)


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = feed_forward(config, layer_idx)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Mask = None, cache: KVCache | None = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2Model(nn.Module):
    """Embedding, decoder layers and final norm (the `model.*` weights)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # Pipeline parallelism (qwen2_mlx.parallel.pipeline) sets a stage: `layers` then
        # holds only this process's layers, which start from the previous stage's output.
        self.pipeline = None

    def __call__(self, input_ids: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        if self.pipeline is None:
            h = self.embed_tokens(input_ids)
        else:
            h = self.pipeline.stage_input(input_ids, self.embed_tokens)
        caches = cache if cache is not None else [None] * len(self.layers)
        masks = create_attention_masks(h, caches[0], self.sliding_window)
        for layer, layer_cache in zip(self.layers, caches, strict=True):
            mask = masks.sliding if layer.self_attn.sliding_window else masks.full
            h = layer(h, mask, layer_cache)
        if self.pipeline is not None:  # on to the next stage; every rank gets the last's
            h = self.pipeline.stage_output(h, cache)
        return self.norm(h)

    @property
    def sliding_window(self) -> int | None:
        """The window of the sliding layers (None when no layer slides)."""
        return next((layer.self_attn.sliding_window for layer in self.layers
                     if layer.self_attn.sliding_window), None)


class Model(nn.Module):
    """Qwen2 causal language model: `model(input_ids (B, L), cache) -> logits (B, L, vocab)`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        kernel_backend()  # decided once per process: a bad QWEN2_MLX_KERNELS fails here
        self.config = config
        self.model = Qwen2Model(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def __call__(self, input_ids: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        """Logits (B, L, vocab) of `input_ids` (B, L), appended to `cache` when given.

        The ids are checked first (integers in [0, vocab_size); a TokenIdError names the
        first bad one): one min/max reduction and a sync on the input. A decode loop that
        feeds back its own sampled tokens calls `forward`, which skips the check.
        """
        if not isinstance(input_ids, mx.array):
            raise TokenIdError(
                f"input_ids must be an mx.array of shape (batch, length), got "
                f"{type(input_ids).__name__}")
        check_token_array(input_ids, self.config.vocab_size)
        return self.forward(input_ids, cache)

    def forward(self, input_ids: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        """`__call__` without the id check, for ids known to be in range (sampled ones)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {input_ids.shape}")
        h = self.model(input_ids, cache)
        if isinstance(cache, ModelCache):
            cache.add_tokens(input_ids)
        return self.head(h)

    def head(self, hidden: mx.array) -> mx.array:
        """Logits of final hidden states (..., D) -> (..., vocab): the LM head, or the tied
        embedding when the config ties them (`as_linear` also works quantized)."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def make_cache(
        self, kv_bits: int | None = None, kv_group_size: int | None = None
    ) -> ModelCache:
        """One growing KV cache per layer, as a `ModelCache` (a list of them that also records
        the token ids they hold); `kv_bits=8` stores it 8-bit quantized.

        The quantization group runs along head_dim: 64 when it divides head_dim (Qwen2's
        64 and 128), else 32.
        """
        mode = self.layers[0].self_attn.mode
        if kv_bits is None:
            return ModelCache(KVCache(mode=mode) for _ in self.layers)
        group = kv_group_size or (64 if self.config.head_dim % 64 == 0 else 32)
        return ModelCache(QuantizedKVCache(kv_bits, group, mode=mode) for _ in self.layers)

    def set_long_context(
        self,
        *,
        dca: bool = False,
        chunk_size: int | None = None,
        local_size: int | None = None,
        yarn_factor: float | None = None,
    ) -> None:
        """Switch on Dual Chunk Attention or YaRN for a model whose config lacks it.

        Changes the position encoding only (no weights); existing caches become invalid.
        """
        fields = dataclasses.asdict(self.config)
        updated = with_long_context(fields, dca=dca, chunk_size=chunk_size,
                                    local_size=local_size, yarn_factor=yarn_factor)
        self.config.rope_scaling = updated.get("rope_scaling")
        self.config.dual_chunk_attention_config = updated.get("dual_chunk_attention_config")
        _ = self.config.long_context  # validate before touching the layers
        for layer in self.layers:
            layer.self_attn.set_positions(self.config)

    @property
    def quant_predicate(self):
        """Which layers the converter may quantize: the MoE router and shared-expert gate
        stay in float (a rounded router picks different experts)."""
        return moe_quant_predicate if self.config.model_type == "qwen2_moe" else None

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop tensors Hugging Face checkpoints carry that the model does not use, and stack
        Qwen2-MoE's per-expert tensors into `mlp.switch_mlp.*` (E, out, in)."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.config.model_type == "qwen2_moe":
            weights = stack_expert_weights(weights, self.config.num_experts)
        if self.config.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights
