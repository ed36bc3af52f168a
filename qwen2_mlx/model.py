"""The Qwen2 decoder in MLX: attention, MLP or mixture of experts, block, model.

Shapes follow the architecture diagram: tokens (B, L) -> embeddings (B, L, D) -> N pre-norm
blocks -> final RMSNorm -> logits (B, L, V). Attention works in (B, heads, L, head_dim).
Weight names match the Hugging Face checkpoints verbatim so weights load without renaming.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from qwen2_mlx.cache import KVCache, ModelCache, QuantizedKVCache
from qwen2_mlx.config import ModelConfig
from qwen2_mlx.long_context import with_long_context
from qwen2_mlx.metal_kernels.attention import (
    quantized_scaled_dot_product_attention,
    scaled_dot_product_attention,
)
from qwen2_mlx.metal_kernels.dispatch import kernel_backend
from qwen2_mlx.metal_kernels.dual_chunk_attention import (
    dca_write_keys,
    dual_chunk_attention,
    quantized_dual_chunk_attention,
)
from qwen2_mlx.metal_kernels.quantized import swiglu
from qwen2_mlx.moe import SparseMoeBlock, is_moe_layer, moe_quant_predicate, stack_expert_weights
from qwen2_mlx.rope import RoPE
from qwen2_mlx.validation import TokenIdError, check_token_array


class Attention(nn.Module):
    """Grouped-query attention: q/k/v with bias, o without; RoPE on q and k.

    Under Dual Chunk Attention, keys are cached rotated at chunk-relative positions and
    scaled by the length temperature, and queries are rotated three ways inside
    `dual_chunk_attention` (spec long-context.md §4).
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

    def __call__(self, x: mx.array, cache: KVCache | None = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)

        if cache is not None and cache.mode != self.mode:
            raise ValueError(
                f"this KV cache was written in {cache.mode!r} attention mode but the model "
                f"runs {self.mode!r}: the mode is fixed per sequence, start a new cache"
            )
        if self.dca is not None:
            out = self._dual_chunk_attention(q, k, v, cache)
            return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset=offset)
        k = self.rope(k, offset=offset)
        if isinstance(cache, QuantizedKVCache):
            # The attention reads the 8/4-bit cache as stored (a kernel does on Metal).
            kq, vq = cache.update_and_fetch_quantized(k, v)
            mask = attention_mask(L, cache.offset, self.sliding_window)
            out = quantized_scaled_dot_product_attention(
                q, kq, vq, scale=self.scale, mask=mask,
                group_size=cache.group_size, bits=cache.bits)
        else:
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
            mask = attention_mask(L, k.shape[2], self.sliding_window)
            out = scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _dual_chunk_attention(
        self, q: mx.array, k: mx.array, v: mx.array, cache: KVCache | None
    ) -> mx.array:
        offset = cache.offset if cache is not None else 0
        # The length temperature comes from the whole prompt during (chunked) prefill and
        # from the current length in decode; cached keys keep the one they were written
        # with (vLLM's behaviour, spec §4.4).
        prompt_length = cache.prompt_length if cache is not None else 0
        temperature = self.dca.temperature(max(offset + q.shape[2], prompt_length))
        inv_freq = self.rope.inv_freq
        k = dca_write_keys(k, offset, self.dca, inv_freq, temperature=temperature)
        args = dict(q_start=offset, cfg=self.dca, inv_freq=inv_freq, scale=self.scale,
                    q_temperature=temperature)
        if isinstance(cache, QuantizedKVCache):
            # Decode reads the 8/4-bit cache as stored (a kernel does on Metal).
            kq, vq = cache.update_and_fetch_quantized(k, v)
            return quantized_dual_chunk_attention(q, kq, vq, group_size=cache.group_size,
                                                  bits=cache.bits, **args)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return dual_chunk_attention(q, k, v, **args)


def attention_mask(
    n_queries: int, n_keys: int, sliding_window: int | None
) -> mx.array | str | None:
    """Mask for the last `n_queries` positions of a sequence of `n_keys`.

    Queries sit at the end (bottom-right aligned), as in chunked prefill against a cache.
    With a sliding window, query i sees keys j with i - window < j <= i, as transformers'
    `sliding_window_causal_mask_function` does.
    """
    if sliding_window is None or n_keys <= sliding_window:
        return "causal" if n_queries > 1 else None
    q_pos = mx.arange(n_keys - n_queries, n_keys)[:, None]
    k_pos = mx.arange(n_keys)[None, :]
    return (k_pos <= q_pos) & (k_pos > q_pos - sliding_window)


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

    def __call__(self, x: mx.array, cache: KVCache | None = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2Model(nn.Module):
    """Embedding, decoder layers and final norm (the `model.*` weights)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(self, input_ids: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        h = self.embed_tokens(input_ids)
        caches = cache if cache is not None else [None] * len(self.layers)
        for layer, layer_cache in zip(self.layers, caches, strict=True):
            h = layer(h, layer_cache)
        return self.norm(h)


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
        if self.config.tie_word_embeddings:
            # as_linear also works for a quantized embedding.
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

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
