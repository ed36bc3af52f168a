"""Qwen2-MoE (qwen2_mlx.moe) against transformers' Qwen2MoeForCausalLM on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import qwen2_mlx.moe as moe
from qwen2_mlx.generate import generate_step
from qwen2_mlx.loader import load_model
from qwen2_mlx.model import MLP, Model, ModelConfig
from qwen2_mlx.moe import (
    QuantizedSwitchLinear,
    SparseMoeBlock,
    SwitchGLU,
    cast_experts_for_backend,
    forward_with_aux_loss,
    is_moe_layer,
    load_balancing_loss,
    moe_quant_predicate,
    recording_router_logits,
    stack_expert_weights,
)
from qwen2_mlx.sampling import SamplingParams

from conftest import save_reference_model
from tokenizer_fixture import build_tiny_tokenizer_files

VOCAB = 512

# Tiny random Qwen2-MoE configurations; every one has the shared expert on.
VARIANTS = {
    "e8k2": dict(num_experts=8, num_experts_per_tok=2),
    "e16k4_norm": dict(num_experts=16, num_experts_per_tok=4, norm_topk_prob=True),
    "sparse_step2": dict(num_experts=8, num_experts_per_tok=2, num_layers=3,
                         decoder_sparse_step=2),
    "mlp_only": dict(num_experts=8, num_experts_per_tok=2, num_layers=3, mlp_only_layers=[2],
                     norm_topk_prob=True, tie=True),
}


def make_hf_moe_checkpoint(
    out_dir: Path,
    *,
    num_experts: int = 8,
    num_experts_per_tok: int = 2,
    norm_topk_prob: bool = False,
    decoder_sparse_step: int = 1,
    mlp_only_layers: list[int] | None = None,
    num_layers: int = 2,
    tie: bool = False,
    dtype: str = "float32",
    fused_layout: bool = False,
    seed: int = 0,
) -> Path:
    """Save a random `Qwen2MoeForCausalLM` (hidden 64) plus a tiny tokenizer, Hub layout.

    As conftest's `make_hf_checkpoint`: weights wider than the default init, random norm
    weights and biases. `fused_layout` writes transformers 5's in-memory tensors
    (`experts.gate_up_proj`, `experts.down_proj`) instead of what `save_pretrained` writes.
    """
    from safetensors.torch import save_file
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen2MoeConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
        num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
        moe_intermediate_size=32, shared_expert_intermediate_size=96,
        norm_topk_prob=norm_topk_prob, decoder_sparse_step=decoder_sparse_step,
        mlp_only_layers=mlp_only_layers or [], tie_word_embeddings=tie,
        rope_theta=10000.0, max_position_embeddings=4096, initializer_range=0.2,
        router_aux_loss_coef=0.02, eos_token_id=VOCAB - 1,
    )
    model = Qwen2MoeForCausalLM(config)
    out_dir = save_reference_model(model, out_dir, dtype)
    if fused_layout:  # save_reference_model randomised and cast `model` in place
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if tie:
            state.pop("lm_head.weight")
        assert any(k.endswith("experts.gate_up_proj") for k in state)
        (out_dir / "model.safetensors").unlink()
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    build_tiny_tokenizer_files(out_dir, vocab_size=VOCAB)
    return out_dir


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    built: dict[str, Path] = {}

    def factory(**kwargs) -> Path:
        key = json.dumps(kwargs, sort_keys=True)
        if key not in built:
            built[key] = make_hf_moe_checkpoint(tmp_path_factory.mktemp("moe"), **kwargs)
        return built[key]

    return factory


def load_torch_moe(path: Path, dtype: str | None = None):
    from transformers import Qwen2MoeForCausalLM

    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    return Qwen2MoeForCausalLM.from_pretrained(path, **kwargs).eval()


def rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """Max abs error relative to the logits' scale (their max magnitude)."""
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def prompt_ids(seed: int, shape: tuple[int, int]) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, VOCAB - 3, size=shape)


# --- Parity with transformers ---------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_logits_match_transformers(moe_checkpoint, variant):
    path = moe_checkpoint(**VARIANTS[variant])
    ids = prompt_ids(1, (2, 23))
    with torch.no_grad():
        ref = load_torch_moe(path)(torch.tensor(ids)).logits.numpy()
    model = load_model(path)
    assert rel_error(np.array(model(mx.array(ids))), ref) <= 1e-4


def test_layer_kinds_follow_transformers(moe_checkpoint):
    """MoE or dense per layer, exactly where transformers put them."""
    for variant in ("sparse_step2", "mlp_only"):
        path = moe_checkpoint(**VARIANTS[variant])
        theirs = [type(layer.mlp).__name__ == "Qwen2MoeSparseMoeBlock"
                  for layer in load_torch_moe(path).model.layers]
        ours = [isinstance(layer.mlp, SparseMoeBlock) for layer in load_model(path).layers]
        assert ours == theirs and any(ours) and not all(ours)


def test_fused_transformers5_layout_loads(moe_checkpoint):
    """transformers 5's fused `experts.gate_up_proj` / `experts.down_proj` tensors."""
    path = moe_checkpoint(**VARIANTS["e8k2"], fused_layout=True)
    ids = prompt_ids(1, (1, 17))
    with torch.no_grad():
        ref = load_torch_moe(path)(torch.tensor(ids)).logits.numpy()
    assert rel_error(np.array(load_model(path)(mx.array(ids))), ref) <= 1e-4


@pytest.mark.parametrize("sort_min_pairs", [1, 10**9])
def test_sorted_and_unsorted_expert_paths_agree(moe_checkpoint, monkeypatch, sort_min_pairs):
    """Prefill with tokens sorted by expert and without, both against transformers."""
    monkeypatch.setattr(moe, "SORT_MIN_PAIRS", sort_min_pairs)
    path = moe_checkpoint(**VARIANTS["e16k4_norm"])
    ids = prompt_ids(2, (2, 19))
    with torch.no_grad():
        ref = load_torch_moe(path)(torch.tensor(ids)).logits.numpy()
    assert rel_error(np.array(load_model(path)(mx.array(ids))), ref) <= 1e-4


@pytest.mark.parametrize("variant", ["e16k4_norm", "sparse_step2"])
def test_cached_decoding_equals_full_forward(moe_checkpoint, variant):
    model = load_model(moe_checkpoint(**VARIANTS[variant]))
    ids = mx.array(prompt_ids(3, (1, 40)))
    full = np.array(model(ids))
    cache = model.make_cache()
    steps = [np.array(model(ids[:, :24], cache=cache))]
    for t in range(24, 40):
        steps.append(np.array(model(ids[:, t : t + 1], cache=cache)))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["e8k2", "e16k4_norm", "mlp_only"])
def test_greedy_tokens_match_transformers_generate(moe_checkpoint, variant):
    path = moe_checkpoint(**VARIANTS[variant])
    prompt = prompt_ids(5, (1, 9))
    with torch.no_grad():
        out = load_torch_moe(path).generate(
            torch.tensor(prompt), max_new_tokens=32, do_sample=False, repetition_penalty=1.0,
            eos_token_id=None, pad_token_id=0)
    expected = out[0, 9:].tolist()
    ours = [t for t, _ in generate_step(mx.array(prompt[0]), load_model(path),
                                        sampling=SamplingParams(), max_tokens=32,
                                        prefill_step_size=4)]
    assert ours == expected


def test_bfloat16_logits_as_close_as_torch_bfloat16(moe_checkpoint):
    """bf16 weights: experts run in float32 on the CPU backend (gather_mm is float32-only
    there). Our error against the float32 reference may be at most 1.5x PyTorch's own bf16
    error on the same weights, and top-1 agrees with PyTorch bf16 on >= 95% of positions."""
    path = moe_checkpoint(**VARIANTS["e8k2"], dtype="bfloat16")
    ids = prompt_ids(6, (2, 24))
    with torch.no_grad():
        ref32 = load_torch_moe(path, "float32")(torch.tensor(ids)).logits.numpy()
        ref16 = load_torch_moe(path)(torch.tensor(ids)).logits.float().numpy()
    model = load_model(path)
    # The loader stores the experts once in their compute dtype (float32 on the CPU backend,
    # where gather_mm is float32-only); everything else stays bf16 as on disk.
    compute = moe.experts_compute_dtype(mx.bfloat16)
    assert model.layers[0].mlp.switch_mlp.gate_proj.weight.dtype == compute
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    assert cast_experts_for_backend(model) == 0  # already done, nothing left to cast
    ours = np.array(model(mx.array(ids)).astype(mx.float32))
    assert np.abs(ours - ref32).max() <= 1.5 * np.abs(ref16 - ref32).max()
    assert (ours.argmax(-1) == ref16.argmax(-1)).mean() >= 0.95


# --- Router auxiliary loss ------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["e8k2", "sparse_step2"])
@pytest.mark.parametrize("padded", [False, True])
def test_aux_loss_equals_transformers(moe_checkpoint, variant, padded):
    """transformers' `output_router_logits=True` aux_loss, padding excluded by the mask.
    Right padding: the real tokens' router logits do not depend on the pads (causal)."""
    path = moe_checkpoint(**VARIANTS[variant])
    ids = prompt_ids(7, (2, 15))
    mask = np.ones_like(ids)
    if padded:
        mask[1, 9:] = 0
    ref_model = load_torch_moe(path)
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                        output_router_logits=True)
    model = load_model(path)
    logits, aux = forward_with_aux_loss(model, mx.array(ids), mx.array(mask) if padded else None)
    assert abs(aux.item() - ref.aux_loss.item()) <= 1e-5 * abs(ref.aux_loss.item())
    assert model.config.router_aux_loss_coef == ref_model.config.router_aux_loss_coef == 0.02
    real = mask.astype(bool)
    assert rel_error(np.array(logits)[real], ref.logits.numpy()[real]) <= 1e-4


def test_aux_loss_counts_and_gradient():
    """Hand-checked case: 2 tokens, 2 experts, top-1, one token masked out."""
    logits = mx.array([[[2.0, 0.0], [0.0, 5.0]]])
    p = np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum()
    # Only token 0 counts: it picks expert 0, so f = (1, 0) and P = p.
    expected = 2 * (1 * p[0] + 0 * p[1])
    got = load_balancing_loss([logits], 2, 1, attention_mask=mx.array([[1, 0]]))
    assert abs(got.item() - expected) < 1e-6
    grad = mx.grad(lambda x: load_balancing_loss([x], 2, 1))(logits)
    assert np.all(np.isfinite(np.array(grad))) and np.abs(np.array(grad)).max() > 0


def test_router_logits_recorded_per_moe_layer(moe_checkpoint):
    model = load_model(moe_checkpoint(**VARIANTS["sparse_step2"]))
    with recording_router_logits(model) as router_logits:
        model(mx.array(prompt_ids(8, (1, 5))))
    assert [r.shape for r in router_logits] == [(1, 5, 8)]  # only layer 1 of 3 is MoE
    model(mx.array(prompt_ids(8, (1, 5))))
    assert len(router_logits) == 1  # recording stops when the block exits


# --- Exact block maths, independent of transformers ------------------------------------------


def moe_config(**changes) -> ModelConfig:
    base = dict(model_type="qwen2_moe", hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=32, num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=32, shared_expert_intermediate_size=96)
    return ModelConfig(**{**base, **changes})


def numpy_moe_block(block: SparseMoeBlock, x: np.ndarray) -> np.ndarray:
    """The block in float64 numpy, one expert at a time (transformers' loop)."""
    def w(m):
        return np.array(m.weight, dtype=np.float64)

    def swiglu(h, g, u, d):
        a = h @ g.T
        return ((a / (1 + np.exp(-a))) * (h @ u.T)) @ d.T

    logits = x @ w(block.gate).T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[:, : block.top_k]
    weights = np.take_along_axis(probs, top, -1)
    if block.norm_topk_prob:
        weights /= weights.sum(-1, keepdims=True)
    sm = block.switch_mlp
    gates, ups, downs = (np.array(p.weight, dtype=np.float64)
                         for p in (sm.gate_proj, sm.up_proj, sm.down_proj))
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j, e in enumerate(top[t]):
            out[t] += weights[t, j] * swiglu(x[t], gates[e], ups[e], downs[e])
    se = block.shared_expert
    shared = swiglu(x, w(se.gate_proj), w(se.up_proj), w(se.down_proj))
    return out + shared / (1 + np.exp(-(x @ w(block.shared_expert_gate).T)))


@pytest.mark.parametrize("norm", [False, True])
def test_block_matches_float64_reference(norm):
    mx.random.seed(0)
    config = moe_config(norm_topk_prob=norm)
    block = SparseMoeBlock(config, shared_expert=MLP(64, 96))
    block.gate.weight = block.gate.weight * 8  # spread the router out
    x = np.random.RandomState(0).randn(11, 64).astype(np.float32)
    ours = np.array(block(mx.array(x)[None]))[0]
    ref = numpy_moe_block(block, x.astype(np.float64))
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


def test_decode_uses_gather_mm_on_the_selected_experts_only(monkeypatch):
    """A decode step multiplies only by the k chosen experts' matrices: every expert matmul
    goes through mx.gather_mm with k indices, and half-precision weights on the CPU backend
    are cast only for those k experts (never the whole stack)."""
    calls = []
    real = mx.gather_mm

    def spy(a, b, rhs_indices=None, **kwargs):
        calls.append((b.shape, rhs_indices.size))
        return real(a, b, rhs_indices=rhs_indices, **kwargs)

    monkeypatch.setattr(moe.mx, "gather_mm", spy)
    mx.random.seed(1)
    config = moe_config(num_experts=16, num_experts_per_tok=4)
    for dtype in (mx.float32, mx.float16):
        calls.clear()
        glu = SwitchGLU(64, 64, 16)
        glu.set_dtype(dtype)
        y = glu(mx.random.normal((1, 1, 64)).astype(dtype), mx.array([[[3, 7, 0, 12]]]))
        assert y.shape == (1, 1, 4, 64)
        assert len(calls) == 3 and all(n == 4 for _, n in calls)
        if moe.experts_compute_dtype(dtype) != dtype:
            assert all(shape[0] == 4 for shape, _ in calls)  # 4 experts cast, not 16
    block = SparseMoeBlock(config, shared_expert=MLP(64, 96))
    calls.clear()
    block(mx.random.normal((1, 1, 64)))
    assert len(calls) == 3


def test_half_precision_experts_equal_float32_experts():
    """The CPU float32 compute path for half weights gives the float32 result on the same
    (rounded) weights, for decode (gathered cast) and prefill (whole-stack cast)."""
    mx.random.seed(2)
    glu = SwitchGLU(64, 64, 8)
    glu.set_dtype(mx.float16)
    ref = SwitchGLU(64, 64, 8)
    ref.update(glu.parameters())
    ref.set_dtype(mx.float32)
    for n_tokens in (1, 40):
        x = mx.random.normal((n_tokens, 64)).astype(mx.float16)
        idx = mx.random.randint(0, 8, (n_tokens, 2))
        got = glu(x, idx)
        want = ref(x.astype(mx.float32), idx)
        np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want), atol=2e-3)


# --- Checkpoint layouts ---------------------------------------------------------------------


def test_stacking_per_expert_and_fused_layouts_agree():
    rng = np.random.RandomState(0)
    gate, up, down = (rng.randn(*shape).astype(np.float32)
                      for shape in ((4, 6, 5), (4, 6, 5), (4, 5, 6)))
    per_expert = {"model.layers.0.mlp.gate.weight": mx.zeros((4, 5))}
    for e in range(4):
        for name, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
            per_expert[f"model.layers.0.mlp.experts.{e}.{name}.weight"] = mx.array(w[e])
    fused = {"model.layers.0.mlp.gate.weight": mx.zeros((4, 5)),
             "model.layers.0.mlp.experts.gate_up_proj": mx.array(np.concatenate([gate, up], 1)),
             "model.layers.0.mlp.experts.down_proj": mx.array(down)}
    a, b = stack_expert_weights(per_expert, 4), stack_expert_weights(fused, 4)
    assert sorted(a) == sorted(b) == [
        "model.layers.0.mlp.gate.weight", "model.layers.0.mlp.switch_mlp.down_proj.weight",
        "model.layers.0.mlp.switch_mlp.gate_proj.weight",
        "model.layers.0.mlp.switch_mlp.up_proj.weight"]
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]))
    np.testing.assert_array_equal(np.array(a["model.layers.0.mlp.switch_mlp.up_proj.weight"]), up)
    # Already stacked (mlx-lm layout): unchanged.
    assert stack_expert_weights(a, 4).keys() == a.keys()


def test_incomplete_expert_group_is_left_for_the_next_shard(moe_checkpoint, tmp_path):
    """The converter streams shards: a group missing experts stays under its own names; the
    loader then names the leftovers."""
    weights = {f"model.layers.3.mlp.experts.{e}.up_proj.weight": mx.zeros((2, 2))
               for e in (0, 1, 3)}
    assert stack_expert_weights(weights, 4).keys() == weights.keys()
    with pytest.raises(ValueError, match="stacks 3 experts but the config has 4"):
        stack_expert_weights({"model.layers.0.mlp.experts.down_proj": mx.zeros((3, 2, 2))}, 4)

    import shutil

    from safetensors.numpy import load_file, save_file

    path = Path(shutil.copytree(moe_checkpoint(**VARIANTS["e8k2"]), tmp_path / "ckpt"))
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.5.gate_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors: model.layers.1.mlp.switch_mlp"
                                         r".gate_proj.weight \| unexpected tensors: "
                                         r"model.layers.1.mlp.experts.0.gate_proj.weight"):
        load_model(path)


# --- Config ---------------------------------------------------------------------------------


def test_moe_layer_rule():
    config = moe_config(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    assert [is_moe_layer(config, i) for i in range(6)] == [False, True, False, False,
                                                           False, True]
    assert not any(is_moe_layer(moe_config(num_experts=0), i) for i in range(2))


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(num_experts_per_tok=9), "num_experts_per_tok must be in 1..num_experts"),
        (dict(num_experts_per_tok=0), "num_experts_per_tok must be in 1..num_experts"),
        (dict(decoder_sparse_step=0), "decoder_sparse_step must be >= 1"),
        (dict(mlp_only_layers=[2]), r"mlp_only_layers \[2\] are not layer indices 0..1"),
        (dict(moe_intermediate_size=0), "moe_intermediate_size must be positive"),
        (dict(qkv_bias=False), "qkv_bias=false is not supported"),
    ],
)
def test_bad_moe_config_raises_clear_error(changes, message):
    with pytest.raises(ValueError, match=message):
        moe_config(**changes)


def test_moe_config_reads_transformers_defaults():
    config = ModelConfig.from_dict(dict(
        model_type="qwen2_moe", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=32, mlp_only_layers=None))
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
            config.shared_expert_intermediate_size) == (60, 4, 1408, 5632)
    assert config.mlp_only_layers == [] and config.norm_topk_prob is False


# --- Quantization ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_switch_linear_equals_dequantized_gather(bits):
    mx.random.seed(3)
    glu = SwitchGLU(64, 64, 8)
    quantized = glu.gate_proj.to_quantized(group_size=32, bits=bits)
    assert isinstance(quantized, QuantizedSwitchLinear)
    dequantized = mx.dequantize(quantized.weight, quantized.scales, quantized.biases,
                                group_size=32, bits=bits)
    x = mx.random.normal((5, 1, 1, 64))
    idx = mx.array([[0, 1], [7, 7], [2, 5], [3, 4], [6, 0]])
    got = np.array(quantized(x, idx))
    want = np.array(mx.gather_mm(x, dequantized.swapaxes(-1, -2), rhs_indices=idx))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def dequantized_reference(float_path: Path, quantized: nn.Module, group_size: int) -> nn.Module:
    """A float model (from `float_path`) holding `quantized`'s weights, dequantized: the
    quantized model must compute exactly what this one computes."""
    reference = load_model(float_path)
    flat = dict(tree_flatten(quantized.parameters()))
    dequantized = {}
    for name, scales in flat.items():
        if name.endswith(".scales"):
            prefix = name[: -len(".scales")]
            packed = flat[prefix + ".weight"]
            in_dims = scales.shape[-1] * group_size
            bits = packed.shape[-1] * 32 // in_dims
            dequantized[prefix + ".weight"] = mx.dequantize(
                packed, scales, flat[prefix + ".biases"], group_size=group_size, bits=bits)
    assert any("switch_mlp" in k for k in dequantized)
    reference.load_weights(list(dequantized.items()), strict=False)
    return reference


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_model_equals_float_model_on_dequantized_weights(moe_checkpoint, bits):
    """Quantized with `moe_quant_predicate`: router and shared-expert gate stay float, the rest
    is quantized, and the logits equal a float model holding the dequantized weights."""
    path = moe_checkpoint(**VARIANTS["mlp_only"])
    model = load_model(path)
    nn.quantize(model, group_size=32, bits=bits, class_predicate=moe_quant_predicate)
    block = model.layers[0].mlp
    assert type(block.gate) is nn.Linear and type(block.shared_expert_gate) is nn.Linear
    assert isinstance(block.switch_mlp.down_proj, QuantizedSwitchLinear)
    assert isinstance(block.shared_expert.up_proj, nn.QuantizedLinear)
    assert isinstance(model.layers[2].mlp.gate_proj, nn.QuantizedLinear)  # the dense layer
    ids = mx.array(prompt_ids(9, (1, 20)))
    reference = dequantized_reference(path, model, 32)
    assert rel_error(np.array(model(ids)), np.array(reference(ids))) <= 1e-4


@pytest.fixture(scope="module")
def interop_source(moe_checkpoint, tmp_path_factory) -> Path:
    """The e8k2 checkpoint with a top-level `rope_theta` too, as transformers 4.x writes it:
    mlx-lm reads only that spelling (without it, it silently uses theta 1e6)."""
    import shutil

    path = Path(shutil.copytree(moe_checkpoint(**VARIANTS["e8k2"]),
                                tmp_path_factory.mktemp("interop") / "src"))
    config = json.loads((path / "config.json").read_text())
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    (path / "config.json").write_text(json.dumps(config))
    return path


def mlx_lm_logits(path: Path, ids: mx.array) -> np.ndarray:
    from mlx_lm.utils import load_model as lm_load_model

    model, _ = lm_load_model(path)
    return np.array(model(ids))


@pytest.mark.parametrize("bits", [4, 8])
def test_converted_quantized_moe_round_trip(interop_source, tmp_path, bits):
    """`qwen2_mlx.convert` a MoE checkpoint with the default settings: the model's own
    `quant_predicate` keeps the router and shared-expert gate in float; it loads with exactly
    the dequantized weights' logits, and mlx-lm loads the same directory to the same logits."""
    from qwen2_mlx.convert import convert

    out = tmp_path / f"q{bits}"
    convert(interop_source, out, quantize=True, q_bits=bits, q_group_size=32, log=None)
    model = load_model(out)
    block = model.layers[0].mlp
    assert type(block.gate) is nn.Linear and type(block.shared_expert_gate) is nn.Linear
    assert isinstance(block.switch_mlp.up_proj, QuantizedSwitchLinear)
    ids = mx.array(prompt_ids(10, (1, 16)))
    ours = np.array(model(ids))
    reference = dequantized_reference(interop_source, model, 32)
    assert rel_error(ours, np.array(reference(ids))) <= 1e-4
    assert rel_error(ours, mlx_lm_logits(out, ids)) <= 1e-4


def test_mlx_lm_quantized_moe_checkpoint_loads(interop_source, tmp_path):
    """mlx-lm's own q4 conversion (it quantizes the router too) loads and computes as mlx-lm."""
    import mlx_lm

    out = tmp_path / "mlx_lm_q4"
    mlx_lm.convert(str(interop_source), str(out), quantize=True, q_group_size=32, q_bits=4)
    model = load_model(out)
    assert isinstance(model.layers[0].mlp.gate, nn.QuantizedLinear)
    ids = mx.array(prompt_ids(11, (1, 16)))
    assert rel_error(np.array(model(ids)), mlx_lm_logits(out, ids)) <= 1e-4


def test_model_parameter_names_are_mlx_lm_layout():
    """Stacked experts under mlx-lm's names, so its converted checkpoints load unchanged."""
    names = {k for k, _ in tree_flatten(Model(moe_config()).parameters())}
    layer = "model.layers.0.mlp."
    assert {layer + n for n in ("gate.weight", "shared_expert_gate.weight",
                                "switch_mlp.gate_proj.weight", "switch_mlp.up_proj.weight",
                                "switch_mlp.down_proj.weight",
                                "shared_expert.down_proj.weight")} <= names


def test_moe_sliding_layers_follow_qwen2_moe_config():
    """Qwen2MoeConfig's own sliding rule (not the dense one), checked against transformers."""
    from transformers import Qwen2MoeConfig

    kwargs = dict(num_hidden_layers=5, use_sliding_window=True, sliding_window=8,
                  max_window_layers=3)
    ours = moe_config(**kwargs).layer_types
    assert ours == Qwen2MoeConfig(**kwargs).layer_types
    assert "sliding_attention" in ours and "full_attention" in ours
