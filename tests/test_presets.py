"""Published sizes: a lazily built preset has the published parameter count."""

from __future__ import annotations

import pytest
from mlx.utils import tree_flatten

from qwen2_mlx.model import Model
from qwen2_mlx.moe import activated_parameter_count
from qwen2_mlx.presets import PRESETS, preset

# Parameter counts shown for the released checkpoints on the Hugging Face Hub. For 0.5B the
# Hub shows 494M; the "0.49B" of the release table is that figure cut to two digits, which
# would be 0.8% off and cannot serve a 0.5% check.
# Qwen2-57B-A14B: 57.4B total, "A14B" = 14.2B activated per token (Qwen2 release notes).
PUBLISHED = {"Qwen2-0.5B": 0.494e9, "Qwen2-1.5B": 1.54e9, "Qwen2-7B": 7.62e9, "Qwen2-72B": 72.7e9,
             "Qwen2-57B-A14B": 57.4e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count_matches_published(name):
    # MLX is lazy: building the module records shapes but materialises no weights.
    model = Model(preset(name))
    count = sum(p.size for _, p in tree_flatten(model.parameters()))
    assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 0.005


def test_moe_preset_activated_parameters():
    """Per token: attention, norms, router, shared expert and its gate, 8 of the 64 routed
    experts, plus the embedding and LM head (Qwen counts both): ~14.2B.

    By hand, per layer: attention 2*3584^2 + 2*3584*512 + biases (3584 + 2*512) = 29.36M;
    shared expert 3*3584*20480 = 220.2M; 8 experts 8*3*3584*2560 = 220.2M; router 64*3584;
    x 28 layers = 13.16B, plus 2*151936*3584 = 1.09B of embedding and LM head: 14.25B.
    """
    model = Model(preset("Qwen2-57B-A14B"))
    activated = activated_parameter_count(model)
    assert abs(activated - 14.2e9) / 14.2e9 < 0.01
    per_layer = (2 * 3584**2 + 2 * 3584 * 512 + 3584 + 2 * 512 + 2 * 3584  # attn + norms
                 + 3 * 3584 * 20480 + 3584 + 8 * 3 * 3584 * 2560 + 64 * 3584)
    assert activated == 28 * per_layer + 2 * 151936 * 3584 + 3584
    assert activated_parameter_count(Model(preset("Qwen2-7B"))) == sum(
        p.size for _, p in tree_flatten(Model(preset("Qwen2-7B")).parameters()))


def test_presets_are_consistent():
    for name, config in PRESETS.items():
        assert config.head_dim in (64, 128), name


def test_unknown_preset():
    with pytest.raises(KeyError, match="unknown preset"):
        preset("Qwen2-3B")


# Parameter counts of the qwen2-family checkpoints as leaderboards publish them: the "params"
# field (billions) of their eval-request files, which the Hugging Face leaderboards compute from
# the checkpoint's safetensors. A lazily built preset must round to the same figure.
# Sources (request files under huggingface.co/datasets/.../requests):
#   Qwen2.5-0.5B: 0.494 (the card says "0.49B"; same shapes as Qwen2-0.5B, whose
#     open-llm-leaderboard request says 0.494)  Qwen2.5-1.5B-Instruct: 1.544 (silma-ai)
#   Qwen2.5-3B-Instruct: 3.086 (OALL, ThaiLLM)  Qwen2.5-7B: 7.616 (OALL)
#   Qwen2.5-14B-Instruct: 14.77 (OALL)  Qwen2.5-32B-Instruct: 32.764 (OALL)
#   Qwen2.5-72B-Instruct: 72.706 (ThaiLLM, hallucinations-leaderboard)
#   QwQ-32B: 32.764 (openlifescienceai)  DeepSeek-R1-Distill-Qwen-1.5B/7B/14B: 1.777, 7.616,
#   14.77 (mii-llm). DeepSeek-R1-Distill-Qwen-32B: no request file found; its config.json (Hub
#   history mirrored at github.com/Evilcarbon/DeepSeek-R1-Distill-Qwen-32B) has Qwen2.5-32B's
#   shapes, so Qwen2.5-32B's 32.764. The model cards' own figures are coarser and for 32B off
#   ("32.5B" for 32.76B).
PUBLISHED_BILLIONS = {
    "Qwen2.5-0.5B": "0.494", "Qwen2.5-1.5B": "1.544", "Qwen2.5-3B": "3.086",
    "Qwen2.5-7B": "7.616", "Qwen2.5-14B": "14.77", "Qwen2.5-32B": "32.764",
    "Qwen2.5-72B": "72.706", "QwQ-32B": "32.764", "DeepSeek-R1-Distill-Qwen-1.5B": "1.777",
    "DeepSeek-R1-Distill-Qwen-7B": "7.616", "DeepSeek-R1-Distill-Qwen-14B": "14.77",
    "DeepSeek-R1-Distill-Qwen-32B": "32.764",
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_family_preset_rounds_to_the_published_count(name):
    published = PUBLISHED_BILLIONS[name]
    decimals = len(published.split(".")[1])
    count = sum(p.size for _, p in tree_flatten(Model(preset(name)).parameters()))
    assert f"{count / 1e9:.{decimals}f}" == published


def test_family_presets_context_and_rope():
    # The fields a parameter count cannot see, from the same config.json files.
    assert {n: preset(n).rope_theta for n in PUBLISHED_BILLIONS
            if preset(n).rope_theta != 1e6} == {"DeepSeek-R1-Distill-Qwen-1.5B": 10000.0,
                                                "DeepSeek-R1-Distill-Qwen-7B": 10000.0}
    assert preset("Qwen2.5-7B").context_length == 32768
    assert preset("QwQ-32B").context_length == preset("DeepSeek-R1-Distill-Qwen-32B").context_length
    assert preset("QwQ-32B").context_length == 131072
    assert all(not preset(n).use_sliding_window for n in PUBLISHED_BILLIONS)
