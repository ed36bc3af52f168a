"""Long context in the model: DCA and YaRN wired into attention, the quantized KV cache, and
memory that grows linearly with the prompt."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from qwen2_mlx import cache as cache_module
from qwen2_mlx import load
from qwen2_mlx.cache import kv_cache_bytes_per_token
from qwen2_mlx.generate import generate_step, stream_generate
from qwen2_mlx.loader import load_model
from qwen2_mlx.model import Model, ModelConfig
from qwen2_mlx.rope import rope_inv_freq
from qwen2_mlx.sampling import SamplingParams

import dca_reference as ref
from conftest import load_torch_model

TINY = dict(hidden_size=64, num_heads=4, num_kv_heads=2)


def with_config(path, tmp_path, **changes):
    """A copy of a checkpoint directory with config.json fields changed."""
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(path, out)
    config = json.loads((out / "config.json").read_text())
    config.update(changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


def logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array(ids)).astype(mx.float32))


def test_dca_reduces_to_standard_attention_within_range(tiny_checkpoint, tmp_path):
    """C=16, W=4: DCA equals causal attention for n <= min(C+1, 2L) = 17 (spec T1)."""
    dca = with_config(tiny_checkpoint, tmp_path, dual_chunk_attention_config={
        "chunk_size": 16, "local_size": 4, "original_max_position_embeddings": 0})
    plain, chunked = load_model(tiny_checkpoint), load_model(dca)
    assert chunked.config.long_context.mode == "dca"
    ids = np.random.RandomState(0).randint(0, 509, size=(1, 30))
    a, b = logits(plain, ids[:, :17]), logits(chunked, ids[:, :17])
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
    a, b = logits(plain, ids), logits(chunked, ids)
    assert np.abs(a[:, 17:] - b[:, 17:]).max() > 1e-2  # past the range the positions differ


def layer0_inputs(model, ids):
    layer = model.layers[0]
    x = layer.input_layernorm(model.model.embed_tokens(mx.array(ids)))
    return layer.self_attn, x


def numpy_attention(attn, x: mx.array, C: int, W: int, s_q: float, s_k) -> np.ndarray:
    """Layer-0 attention in float64 numpy from the layer's own weights and the spec's
    reference DCA (tests/dca_reference.py), independent of the MLX implementation."""
    def proj(linear, heads):
        w = np.array(linear.weight, dtype=np.float64)
        b = np.array(linear.bias, dtype=np.float64) if "bias" in linear else 0.0
        y = np.array(x, dtype=np.float64) @ w.T + b
        B, T, _ = y.shape
        return y.reshape(B, T, heads, -1).transpose(0, 2, 1, 3)

    q = proj(attn.q_proj, attn.n_heads)
    k = proj(attn.k_proj, attn.n_kv_heads)
    v = proj(attn.v_proj, attn.n_kv_heads)
    inv = ref.inv_freq(attn.head_dim, attn.rope_theta_for_tests)
    out = ref.dca_attention_three_logits(q, k, v, inv, attn.head_dim**-0.5, C, W,
                                         s_q=s_q, s_k=s_k)
    B, H, T, D = out.shape
    flat = out.transpose(0, 2, 1, 3).reshape(B, T, H * D)
    return flat @ np.array(attn.o_proj.weight, dtype=np.float64).T


@pytest.mark.parametrize("original", [0, 8])
def test_dca_layer_output_matches_float64_reference(tiny_checkpoint, tmp_path, original):
    """Beyond the reduction range (n = 45 > 4 chunks), with and without the temperature."""
    C, W = 16, 4
    dca = with_config(tiny_checkpoint, tmp_path, dual_chunk_attention_config={
        "chunk_size": C, "local_size": W, "original_max_position_embeddings": original})
    model = load_model(dca)
    ids = np.random.RandomState(1).randint(0, 509, size=(1, 45))
    attn, x = layer0_inputs(model, ids)
    attn.rope_theta_for_tests = model.config.rope_theta
    ours = np.array(attn(x))
    s = ref.length_temperature(45, original)
    expected = numpy_attention(attn, x, C, W, s_q=s, s_k=np.full(45, s))
    assert np.abs(ours - expected).max() <= 1e-4 * np.abs(expected).max()


def test_dca_chunked_prefill_and_decode_match_one_shot(tiny_checkpoint, tmp_path):
    """Stepwise prefill takes the temperature from the whole prompt (cache.prompt_length);
    decoding then writes each new key with the temperature of the current length."""
    C, W, T = 16, 4, 8
    dca = with_config(tiny_checkpoint, tmp_path, dual_chunk_attention_config={
        "chunk_size": C, "local_size": W, "original_max_position_embeddings": T})
    model = load_model(dca)
    ids = np.random.RandomState(2).randint(0, 509, size=(1, 40))
    full = logits(model, ids[:, :37])
    cache = model.make_cache()
    for c in cache:
        c.prompt_length = 37
    steps = [logits_with(model, ids[:, i : min(i + 5, 37)], cache) for i in range(0, 37, 5)]
    assert np.abs(np.concatenate(steps, 1) - full).max() <= 1e-4 * np.abs(full).max()
    # Decode token 37: the reference caches keys 0..36 with s(37) and key 37 with s(38).
    attn, x = layer0_inputs(model, ids[:, :38])
    attn.rope_theta_for_tests = model.config.rope_theta
    layer_cache = model.make_cache()[0]
    layer_cache.prompt_length = 37
    attn(x[:, :37], cache=layer_cache)
    decoded = np.array(attn(x[:, 37:38], cache=layer_cache))
    s_k = np.array([ref.length_temperature(37, T)] * 37 + [ref.length_temperature(38, T)])
    expected = numpy_attention(attn, x, C, W, s_q=ref.length_temperature(38, T), s_k=s_k)
    assert np.abs(decoded[0, 0] - expected[0, -1]).max() <= 1e-4 * np.abs(expected).max()


def logits_with(model, ids, cache) -> np.ndarray:
    return np.array(model(mx.array(ids), cache=cache))


def test_mode_selection_dca_wins_over_yarn():
    """Spec T10: with both configs DCA runs on plain theta frequencies."""
    common = dict(model_type="qwen2", hidden_size=64, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=16, rope_theta=1e4, max_position_embeddings=32)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    both = ModelConfig.from_dict({**common, "rope_scaling": yarn,
                                  "dual_chunk_attention_config": {"chunk_size": 16,
                                                                  "local_size": 4}})
    attn = Model(both).layers[0].self_attn
    assert both.long_context.mode == "dca" and attn.rope.attention_scale == 1.0
    np.testing.assert_array_equal(np.array(attn.rope.inv_freq), np.array(rope_inv_freq(16, 1e4)))
    only_yarn = ModelConfig.from_dict({**common, "rope_scaling": yarn})
    assert only_yarn.long_context.mode == "yarn" and only_yarn.context_length == 128
    assert Model(only_yarn).layers[0].self_attn.rope.attention_scale > 1.0


def test_yarn_model_matches_transformers(checkpoint_factory):
    """Static YaRN (factor 4 over 16 original positions) at every length, vs transformers."""
    path = checkpoint_factory(**TINY, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "rope_theta": 10000.0})
    model = load_model(path)
    assert model.config.long_context.mode == "yarn"
    ids = np.random.RandomState(3).randint(0, 509, size=(1, 40))
    with torch.no_grad():
        expected = load_torch_model(path)(torch.tensor(ids)).logits.numpy()
    ours = logits(model, ids)
    assert np.abs(ours - expected).max() <= 1e-4 * np.abs(expected).max()
    plain = load_model(checkpoint_factory(**TINY))
    assert np.abs(logits(plain, ids) - ours).max() > 1e-2  # YaRN really changed something


def test_set_long_context_switches_mode_and_guards_caches(tiny_checkpoint):
    model, tokenizer = load(tiny_checkpoint)
    stale = model.make_cache()
    model(mx.array([[1, 2, 3]]), cache=stale)
    model.set_long_context(dca=True, chunk_size=16, local_size=4)
    assert model.config.long_context.mode == "dca"
    assert model.config.dual_chunk_attention_config["original_max_position_embeddings"] == 4096
    with pytest.raises(ValueError, match="mode is fixed per sequence"):
        model(mx.array([[4]]), cache=stale)
    model.set_long_context(yarn_factor=4.0)
    assert model.config.long_context.mode == "yarn" and model.config.context_length == 16384
    with pytest.raises(ValueError, match="not both"):
        model.set_long_context(dca=True, yarn_factor=2.0)
    with pytest.raises(ValueError, match="local_size .* must be smaller"):
        model.set_long_context(dca=True, chunk_size=8, local_size=8)


def test_quantized_kv_cache_generation(checkpoint_factory):
    """8-bit KV cache: each cached value lies within one quantization step of the exact one
    (step = group range / 255; MLX rounds the bias to a multiple of the scale, so the error
    can exceed half a step), greedy tokens equal full precision on the test prompt,
    the logits error shrinks from 4 to 8 bits as the step does (16x finer: require 8x), and
    the cache holds under half the bytes of a float32 one."""
    model, tokenizer = load(checkpoint_factory(hidden_size=128, num_heads=4, num_kv_heads=2))
    assert model.config.head_dim == 32
    prompt = tokenizer.encode("a quantized cache should not change the answer")
    exact = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=16)]
    quant = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=16, kv_bits=8)]
    assert exact == quant

    ids = mx.array([prompt])
    full = model.make_cache()
    a = np.array(model(ids, cache=full))
    errors = {}
    for bits in (8, 4):
        cache = model.make_cache(kv_bits=bits)
        errors[bits] = np.sqrt(((np.array(model(ids, cache=cache)) - a) ** 2).mean())
        if bits == 8:
            assert cache[0].nbytes < 0.5 * full[0].nbytes
            keys = np.array(full[0].state[0])
            fetched = np.array(cache[0]._dequantize(cache[0].keys, cache[0].offset))
            groups = keys.reshape(*keys.shape[:-1], -1, 32)
            step = (groups.max(-1) - groups.min(-1)) / 255
            err = np.abs(fetched - keys).reshape(groups.shape).max(-1)
            assert (err <= step * 1.001 + 1e-6).all()
    assert errors[8] * 8 <= errors[4]


def test_kv_cache_bytes_per_token_table():
    # Qwen2-7B: 28 layers x (K and V) x 4 KV heads x 128 dims x 2 bytes = 57,344 bytes;
    # with 28 KV heads (no GQA) it would be 7x that.
    assert kv_cache_bytes_per_token(28, 4, 128) == 57344
    assert kv_cache_bytes_per_token(28, 28, 128) / kv_cache_bytes_per_token(28, 4, 128) == 7
    assert kv_cache_bytes_per_token(28, 4, 128, bits=8) == 28 * 2 * 4 * 128 * (1 + 4 / 64)


def _long_prompt_model(mode: str) -> Model:
    config = ModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         max_position_embeddings=65536, rope_theta=1e4)
    if mode == "dca":
        config.dual_chunk_attention_config = {"chunk_size": 512, "local_size": 32,
                                              "original_max_position_embeddings": 512}
    model = Model(config)
    mx.eval(model.parameters())
    return model


def _prefill_peaks(model: Model, sizes, prefill_step_size: int | None) -> list[int]:
    """Peak memory above the start of generate_step's prefill of `sizes` tokens (None: the
    whole prompt in one forward pass)."""
    peaks = []
    for n in sizes:
        cache = model.make_cache()
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        steps = generate_step(mx.array(np.arange(n) % 256), model, sampling=SamplingParams(),
                              cache=cache, max_tokens=1, prefill_step_size=prefill_step_size or n)
        next(steps)
        steps.close()
        peaks.append(mx.get_peak_memory() - base)
        del cache, steps
    return peaks


@pytest.mark.parametrize("mode", ["standard", "dca"])
def test_prefill_memory_grows_linearly(mode):
    """Peak memory of a prefill at 1K, 2K and 4K tokens: doubling the prompt must not
    quadruple the peak (a full score matrix would), on a tiny random model. Standard
    attention through generate_step's default 512-token steps; Dual Chunk Attention in one
    forward pass over the whole prompt (its own query and key tiling is what bounds it).
    examples/bench_long_context.py measures the same at 16K-64K tokens."""
    model = _long_prompt_model(mode)
    peaks = _prefill_peaks(model, (1024, 2048, 4096), 512 if mode == "standard" else None)
    assert peaks[2] / peaks[1] < 2.6 and peaks[1] / peaks[0] < 2.6, peaks


def _full_matrix_attention(queries, keys, values, *, scale, **_):
    """A planted DCA stand-in that builds the whole (Tq, Tk) score matrix."""
    group = queries.shape[1] // keys.shape[1]
    scores = (queries * scale) @ mx.repeat(keys, group, axis=1).swapaxes(-1, -2)
    return mx.softmax(scores, axis=-1) @ mx.repeat(values, group, axis=1)


@pytest.mark.parametrize("mode", ["standard", "dca"])
def test_the_linear_memory_check_catches_a_full_score_matrix(mode, monkeypatch):
    """The negative control of the test above: a prompt prefilled in one pass through MLX's
    fused attention (which builds the scores on this backend), and a planted full-matrix DCA,
    both roughly quadruple the peak when the prompt doubles, and fail its bound."""
    if mode == "dca":
        monkeypatch.setattr(cache_module, "dual_chunk_attention", _full_matrix_attention)
    peaks = _prefill_peaks(_long_prompt_model(mode), (1024, 2048), None)
    assert peaks[1] / peaks[0] > 2.6, peaks


def test_cli_and_api_long_context_options_agree(checkpoint_factory):
    from click.testing import CliRunner

    from qwen2_mlx import generate
    from qwen2_mlx.cli.main import cli

    tiny_checkpoint = checkpoint_factory(hidden_size=128, num_heads=4, num_kv_heads=2)
    model, tokenizer = load(tiny_checkpoint, dca=True, chunk_size=8, local_size=2)
    assert model.config.long_context.dca.chunk_size == 8
    prompt = "a prompt long enough to span several dual chunks of eight tokens each"
    expected = generate(model, tokenizer, prompt, max_tokens=6, kv_bits=8)
    result = CliRunner().invoke(cli, ["generate", "-m", str(tiny_checkpoint), "--no-chat",
                                      "-p", prompt, "--max-tokens", "6", "--temp", "0",
                                      "--repetition-penalty", "1", "--dca", "--chunk-size", "8",
                                      "--local-size", "2", "--kv-bits", "8"])
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"
    bad = CliRunner().invoke(cli, ["generate", "-m", str(tiny_checkpoint), "--dca",
                                   "--yarn-factor", "4"])
    assert bad.exit_code == 1 and "not both" in bad.stderr
