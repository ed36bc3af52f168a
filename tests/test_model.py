"""Parity of the MLX model with transformers' Qwen2ForCausalLM on the same weights."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from qwen2_mlx.generate import generate_step
from qwen2_mlx.loader import load_model
from qwen2_mlx.masks import attention_mask
from qwen2_mlx.model import ModelConfig
from qwen2_mlx.sampling import SamplingParams

from conftest import load_torch_model

# hidden, query heads, kv heads: GQA ratios 7:1, 6:1, 8:1 and 1:1 (Qwen2 uses 7, 6 and 8).
GQA_SHAPES = {
    "gqa7": dict(hidden_size=112, num_heads=7, num_kv_heads=1),
    "gqa6": dict(hidden_size=96, num_heads=6, num_kv_heads=1),
    "gqa8": dict(hidden_size=128, num_heads=8, num_kv_heads=1),
    "mha": dict(hidden_size=64, num_heads=4, num_kv_heads=4),
    "gqa7x2": dict(hidden_size=112, num_heads=14, num_kv_heads=2),
}
VARIANTS = {
    "tied": dict(tie=True),
    "untied": dict(tie=False),
    "sliding": dict(sliding_window=5, max_window_layers=1, num_layers=3),
}


def torch_logits(path, ids: np.ndarray, dtype: str | None = None) -> np.ndarray:
    model = load_torch_model(path, dtype)
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """Max abs error relative to the logits' scale (their max magnitude)."""
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", GQA_SHAPES)
def test_float32_logits_match_transformers(checkpoint_factory, shape, variant):
    path = checkpoint_factory(**GQA_SHAPES[shape], **VARIANTS[variant])
    ids = np.random.RandomState(1).randint(0, 509, size=(2, 23))
    ours = np.array(load_model(path)(mx.array(ids)))
    assert rel_error(ours, torch_logits(path, ids)) <= 1e-4


def test_sliding_window_changes_the_logits(checkpoint_factory):
    """The sliding layers really slide: without the window the logits differ."""
    path = checkpoint_factory(**GQA_SHAPES["gqa7"], **VARIANTS["sliding"])
    model = load_model(path)
    ids = mx.array(np.random.RandomState(1).randint(0, 509, size=(1, 23)))
    windowed = np.array(model(ids))
    for layer in model.layers:
        layer.self_attn.sliding_window = None
    full = np.array(model(ids))
    assert np.abs(windowed[:, :5] - full[:, :5]).max() < 1e-5  # inside the window: same
    assert np.abs(windowed[:, 10:] - full[:, 10:]).max() > 1e-2


def test_sliding_layers_follow_max_window_layers():
    """transformers' dense Qwen2 slides on layers i >= max_window_layers."""
    config = ModelConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=16,
                         use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2


def test_attention_mask_is_bottom_right_aligned_with_window():
    mask = np.array(attention_mask(3, 10, sliding_window=4))
    # Queries are positions 7, 8, 9; each sees itself and the 3 keys before it.
    assert mask.tolist() == [[j in range(4, 8) for j in range(10)],
                             [j in range(5, 9) for j in range(10)],
                             [j in range(6, 10) for j in range(10)]]


def test_bfloat16_logits_as_close_as_torch_bfloat16(checkpoint_factory):
    """bf16 tolerance, justified: our bf16 error vs the float32 reference must be no larger
    than 1.5x PyTorch's own bf16 error on the same bf16 weights (rounding differs in order,
    not in amount), and top-1 must agree on at least 95% of positions."""
    path = checkpoint_factory(**GQA_SHAPES["gqa7x2"], dtype="bfloat16", tie=False)
    ids = np.random.RandomState(2).randint(0, 509, size=(2, 32))
    ref32 = torch_logits(path, ids, dtype="float32")
    ref16 = torch_logits(path, ids)  # bf16 as stored
    model = load_model(path)
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16  # bf16 on disk stays bf16
    ours = np.array(model(mx.array(ids)).astype(mx.float32))
    torch_err = np.abs(ref16 - ref32).max()
    assert np.abs(ours - ref32).max() <= 1.5 * torch_err
    assert (ours.argmax(-1) == ref16.argmax(-1)).mean() >= 0.95


@pytest.mark.parametrize("shape", ["gqa7", "mha"])
def test_cached_decoding_equals_full_forward(checkpoint_factory, shape):
    """Token-by-token decoding through the cache, past its 256-slot growth step."""
    path = checkpoint_factory(**GQA_SHAPES[shape], **VARIANTS["sliding"])
    model = load_model(path)
    ids = mx.array(np.random.RandomState(3).randint(0, 509, size=(1, 300)))
    full = np.array(model(ids))
    cache = model.make_cache()
    prefix = 250
    steps = [np.array(model(ids[:, :prefix], cache=cache))]
    for t in range(prefix, 300):
        steps.append(np.array(model(ids[:, t : t + 1], cache=cache)))
    assert cache[0].offset == 300
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4, rtol=0)


def test_chunked_prefill_equals_full_forward(checkpoint_factory):
    path = checkpoint_factory(**GQA_SHAPES["gqa6"])
    model = load_model(path)
    ids = mx.array(np.random.RandomState(4).randint(0, 509, size=(1, 40)))
    full = np.array(model(ids))
    cache = model.make_cache()
    chunks = [np.array(model(ids[:, i : i + 7], cache=cache)) for i in range(0, 40, 7)]
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "shape,variant,penalty",
    [("gqa7", "tied", 1.0), ("gqa8", "untied", 1.0), ("mha", "sliding", 1.0),
     ("gqa7", "tied", 1.3)],
)
def test_greedy_tokens_match_transformers_generate(checkpoint_factory, shape, variant, penalty):
    """32 greedy tokens equal `transformers.generate(do_sample=False)`, with and without a
    repetition penalty (the window covers the whole sequence, as transformers' does)."""
    path = checkpoint_factory(**GQA_SHAPES[shape], **VARIANTS[variant])
    prompt = np.random.RandomState(5).randint(0, 509, size=(1, 9))
    ref = load_torch_model(path)
    with torch.no_grad():
        out = ref.generate(torch.tensor(prompt), max_new_tokens=32, do_sample=False,
                           repetition_penalty=penalty, eos_token_id=None, pad_token_id=0)
    expected = out[0, 9:].tolist()
    model = load_model(path)
    sampling = SamplingParams(repetition_penalty=penalty, repetition_context_size=64)
    ours = [t for t, _ in generate_step(mx.array(prompt[0]), model, sampling=sampling,
                                        max_tokens=32, prefill_step_size=4)]
    assert ours == expected


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(model_type="llama"), "unsupported model_type"),
        (dict(num_attention_heads=5), "must divide hidden_size"),
        (dict(num_key_value_heads=3), "must divide num_attention_heads"),
        (dict(use_sliding_window=True), "sliding_window is not set"),
        (dict(layer_types=["full_attention"]), "layer_types has 1 entries"),
        (dict(hidden_size=0), "hidden_size must be positive"),
    ],
)
def test_bad_config_raises_clear_error(changes, message):
    base = dict(model_type="qwen2", hidden_size=64, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=16)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**base, **changes})


def test_config_reads_both_transformers_spellings():
    common = dict(model_type="qwen2", hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=16)
    v4 = ModelConfig.from_dict({**common, "rope_theta": 1e6,
                                "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 32768}})
    v5 = ModelConfig.from_dict({**common, "rope_parameters": {
        "rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": 32768}})
    assert v4.rope_theta == v5.rope_theta == 1e6
    assert v4.rope_scaling["factor"] == v5.rope_scaling["factor"] == 4.0
    plain = ModelConfig.from_dict({**common, "rope_parameters": {"rope_theta": 5e5,
                                                                  "rope_type": "default"}})
    assert plain.rope_theta == 5e5 and plain.rope_scaling is None


def test_missing_required_config_field():
    with pytest.raises(ValueError, match="lacks required fields: vocab_size"):
        ModelConfig.from_dict(dict(model_type="qwen2", hidden_size=64, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2))
