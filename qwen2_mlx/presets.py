"""Configurations of the published Qwen2 models, dense and MoE (from their config.json files)."""

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


def preset(name: str) -> ModelConfig:
    """A copy of a published configuration, by name (e.g. "Qwen2-7B")."""
    import copy

    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
