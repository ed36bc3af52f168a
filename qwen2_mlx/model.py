"""The Qwen2 decoder in MLX: config, attention, MLP or mixture of experts, block, model.

Shapes follow the architecture diagram: tokens (B, L) -> embeddings (B, L, D) -> N pre-norm
blocks -> final RMSNorm -> logits (B, L, V). Attention works in (B, heads, L, head_dim).
Weight names match the Hugging Face checkpoints verbatim so weights load without renaming.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from qwen2_mlx.cache import KVCache, QuantizedKVCache
from qwen2_mlx.long_context import LongContext, resolve_long_context, with_long_context
from qwen2_mlx.metal_kernels.attention import (
    quantized_scaled_dot_product_attention,
    scaled_dot_product_attention,
)
from qwen2_mlx.metal_kernels.dual_chunk_attention import dca_write_keys, dual_chunk_attention
from qwen2_mlx.metal_kernels.quantized import swiglu
from qwen2_mlx.moe import SparseMoeBlock, is_moe_layer, moe_quant_predicate, stack_expert_weights
from qwen2_mlx.rope import RoPE

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen2_moe")

# transformers' Qwen2MoeConfig defaults, for a qwen2_moe config.json that leaves a field out.
_QWEN2_MOE_DEFAULTS = dict(num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                           shared_expert_intermediate_size=5632)


@dataclass
class ModelConfig:
    """The fields of a Hugging Face Qwen2 / Qwen2-MoE `config.json` that change the computation.

    The MoE fields (`num_experts` onwards) matter only for `model_type: qwen2_moe`.
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    model_type: str = "qwen2"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    layer_types: list[str] = field(default_factory=list)
    dual_chunk_attention_config: dict[str, Any] | None = None
    eos_token_id: int | list[int] | None = None
    # Qwen2-MoE (transformers' Qwen2MoeConfig); see moe.py for how they are used.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}: qwen2-mlx runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        sizes = ("hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "vocab_size")
        for name in sizes:
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"config {name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must divide "
                f"hidden_size ({self.hidden_size})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.use_sliding_window and not self.sliding_window:
            raise ValueError("use_sliding_window is true but sliding_window is not set")
        if self.model_type == "qwen2_moe":
            self._check_moe()
        if not self.layer_types:
            # transformers' Qwen2Config: layer i slides iff sliding on and i >= max_window_layers;
            # Qwen2MoeConfig: iff sliding on, i < max_window_layers and i is even.
            moe = self.model_type == "qwen2_moe"
            self.layer_types = [
                "sliding_attention"
                if self.use_sliding_window
                and ((i < self.max_window_layers and i % 2 == 0) if moe
                     else i >= self.max_window_layers)
                else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for "
                f"{self.num_hidden_layers} layers"
            )
        unknown = set(self.layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"unknown layer_types {sorted(unknown)}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types has sliding_attention but sliding_window is not set")
        _ = self.long_context  # validates rope_scaling / dual_chunk_attention_config early

    def _check_moe(self) -> None:
        if not self.qkv_bias:
            raise ValueError("qkv_bias=false is not supported: q/k/v projections carry biases")
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0, got {self.num_experts}")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"mlp_only_layers {bad} are not layer indices 0..{self.num_hidden_layers - 1}"
            )
        if self.num_experts == 0:
            return
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in 1..num_experts ({self.num_experts}), "
                f"got {self.num_experts_per_tok}"
            )
        for name in ("moe_intermediate_size", "shared_expert_intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config {name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def long_context(self) -> LongContext:
        """Standard RoPE, static YaRN or Dual Chunk Attention, as the config selects."""
        return resolve_long_context(
            self.rope_scaling, self.dual_chunk_attention_config, self.max_position_embeddings
        )

    @property
    def context_length(self) -> int:
        """Longest sequence (prompt + generated) the model is configured for."""
        return self.long_context.context_length

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face config dict, in transformers 4.x or 5.x spelling.

        4.x writes top-level `rope_theta`/`rope_scaling`; 5.x nests both in `rope_parameters`.
        """
        config = dict(config)
        model_type = config.get("model_type")
        if model_type is None:
            raise ValueError("config.json has no model_type")
        rope_parameters = dict(config.get("rope_parameters") or {})
        if "rope_theta" not in config and "rope_theta" in rope_parameters:
            config["rope_theta"] = rope_parameters["rope_theta"]
        if config.get("rope_scaling") is None and rope_parameters:
            scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            config["rope_scaling"] = None if kind == "default" else scaling
        if config.get("num_key_value_heads") is None:
            config["num_key_value_heads"] = config.get("num_attention_heads")
        if not config.get("use_sliding_window", False):
            config["sliding_window"] = None
        if config.get("layer_types") is None:
            config.pop("layer_types", None)
        if model_type == "qwen2_moe":
            config = {**_QWEN2_MOE_DEFAULTS, **config}
            if config.get("mlp_only_layers") is None:
                config["mlp_only_layers"] = []
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [
            f.name for f in dataclasses.fields(cls)
            if f.name not in config
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"config.json lacks required fields: {', '.join(missing)}")
        return cls(**{k: v for k, v in config.items() if k in names})


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
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return dual_chunk_attention(q, k, v, q_start=offset, cfg=self.dca, inv_freq=inv_freq,
                                    scale=self.scale, q_temperature=temperature)


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
        # Pipeline parallelism (qwen2_mlx.parallel.pipeline) sets a stage: `layers` then
        # holds only this process's layers, which start from the previous stage's output.
        self.pipeline = None

    def __call__(self, input_ids: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        if self.pipeline is None:
            h = self.embed_tokens(input_ids)
        else:
            h = self.pipeline.stage_input(input_ids, self.embed_tokens)
        caches = cache if cache is not None else [None] * len(self.layers)
        for layer, layer_cache in zip(self.layers, caches, strict=True):
            h = layer(h, layer_cache)
        if self.pipeline is not None:  # on to the next stage; every rank gets the last's
            h = self.pipeline.stage_output(h, cache)
        return self.norm(h)


class Model(nn.Module):
    """Qwen2 causal language model: `model(input_ids (B, L), cache) -> logits (B, L, vocab)`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def __call__(self, input_ids: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {input_ids.shape}")
        h = self.model(input_ids, cache)
        if self.config.tie_word_embeddings:
            # as_linear also works for a quantized embedding.
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def make_cache(
        self, kv_bits: int | None = None, kv_group_size: int | None = None
    ) -> list[KVCache]:
        """One growing KV cache per layer; `kv_bits=8` stores it 8-bit quantized.

        The quantization group runs along head_dim: 64 when it divides head_dim (Qwen2's
        64 and 128), else 32.
        """
        mode = self.layers[0].self_attn.mode
        if kv_bits is None:
            return [KVCache(mode=mode) for _ in self.layers]
        group = kv_group_size or (64 if self.config.head_dim % 64 == 0 else 32)
        return [QuantizedKVCache(kv_bits, group, mode=mode) for _ in self.layers]

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
