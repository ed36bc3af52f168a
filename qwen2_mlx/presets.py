"""Configurations of the published qwen2-architecture models (from their config.json files).

Qwen2 dense and MoE, Qwen2.5 (the -Instruct configs; Coder and Math share the shapes of the
same size), QwQ-32B and DeepSeek-R1-Distill-Qwen. `use_sliding_window` is false in all of them,
so `sliding_window` and `max_window_layers` are recorded but change nothing.
"""

from __future__ import annotations

from qwen2_mlx.config import ModelConfig

_COMMON = dict(model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1_000_000.0)

PRESETS: dict[str, ModelConfig] = {
    "Qwen2-0.5B": ModelConfig(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
        tie_word_embeddings=True, max_position_embeddings=32768, **_COMMON),
    "Qwen2-1.5B": ModelConfig(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
        tie_word_embeddings=True, max_position_embeddings=32768, **_COMMON),
    "Qwen2-7B": ModelConfig(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
        tie_word_embeddings=False, max_position_embeddings=131072, **_COMMON),
    "Qwen2-72B": ModelConfig(
        hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=152064,
        tie_word_embeddings=False, max_position_embeddings=131072, **_COMMON),
    # Every layer is MoE (decoder_sparse_step 1, no mlp_only_layers), so intermediate_size
    # (the dense MLP width) is unused; 64 routed experts, 8 per token, plus the shared expert.
    "Qwen2-57B-A14B": ModelConfig(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=151936,
        tie_word_embeddings=False, max_position_embeddings=131072,
        num_experts=64, num_experts_per_tok=8, moe_intermediate_size=2560,
        shared_expert_intermediate_size=20480, norm_topk_prob=False, decoder_sparse_step=1,
        router_aux_loss_coef=0.001, **{**_COMMON, "model_type": "qwen2_moe"}),
}

# Qwen2.5-Instruct config.json (Qwen/Qwen2.5-*-Instruct): 32K context (YaRN extends 7B+ to
# 128K), tied embeddings up to 3B; 14B and up use max_window_layers 70.
_QWEN25 = dict(_COMMON, max_position_embeddings=32768, sliding_window=32768)
PRESETS.update({
    "Qwen2.5-0.5B": ModelConfig(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
        max_window_layers=21, **_QWEN25),
    "Qwen2.5-1.5B": ModelConfig(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
        max_window_layers=21, **_QWEN25),
    "Qwen2.5-3B": ModelConfig(
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
        max_window_layers=70, **_QWEN25),
    "Qwen2.5-7B": ModelConfig(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_window_layers=28, **_QWEN25),
    "Qwen2.5-14B": ModelConfig(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
        num_key_value_heads=8, vocab_size=152064, max_window_layers=70, **_QWEN25),
    "Qwen2.5-32B": ModelConfig(
        hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
        num_key_value_heads=8, vocab_size=152064, max_window_layers=70, **_QWEN25),
    "Qwen2.5-72B": ModelConfig(
        hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=152064, max_window_layers=70, **_QWEN25),
    # Qwen/QwQ-32B: Qwen2.5-32B's shapes, RMSNorm eps 1e-5, 128K positions.
    "QwQ-32B": ModelConfig(
        hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
        num_key_value_heads=8, vocab_size=152064, max_window_layers=64, sliding_window=32768,
        max_position_embeddings=131072, **{**_COMMON, "rms_norm_eps": 1e-5}),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-*: distilled into Qwen2.5-Math-1.5B/7B (RoPE theta
    # 10000, untied 1.5B) and Qwen2.5-14B/32B (eps 1e-5); 128K positions.
    "DeepSeek-R1-Distill-Qwen-1.5B": ModelConfig(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, max_window_layers=21,
        max_position_embeddings=131072, **{**_COMMON, "rope_theta": 10000.0}),
    "DeepSeek-R1-Distill-Qwen-7B": ModelConfig(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_window_layers=28,
        max_position_embeddings=131072, **{**_COMMON, "rope_theta": 10000.0}),
    "DeepSeek-R1-Distill-Qwen-14B": ModelConfig(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
        num_key_value_heads=8, vocab_size=152064, max_window_layers=48,
        max_position_embeddings=131072, **{**_COMMON, "rms_norm_eps": 1e-5}),
    "DeepSeek-R1-Distill-Qwen-32B": ModelConfig(
        hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
        num_key_value_heads=8, vocab_size=152064, max_window_layers=64, sliding_window=131072,
        max_position_embeddings=131072, **{**_COMMON, "rms_norm_eps": 1e-5}),
})


def preset(name: str) -> ModelConfig:
    """A copy of a published configuration, by name (e.g. "Qwen2-7B")."""
    import copy

    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
