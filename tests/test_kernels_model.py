"""The model on the kernel path (QWEN2_MLX_KERNELS=1: Metal on a Mac, the emulator elsewhere).

* Parity with transformers: a tiny Qwen2 with Qwen2-0.5B's head geometry ratio (7 query heads
  per KV head, head_dim 64) decodes a few tokens through the GQA decode kernel; logits match
  transformers within tests/test_model.py's tolerance and greedy tokens are equal.
* Quantized weights (nn.quantize + use_kernel_linears: every projection and the tied LM head
  miss qmv_fast, so they run the matvec kernel), with and without an 8-bit KV cache: the
  kernel path equals the reference path (QWEN2_MLX_KERNELS=0).
* Dual Chunk Attention: prefill tiles and decode kernels equal the reference path.
Spies confirm the kernels really ran.
"""

from __future__ import annotations

import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from qwen2_mlx.generate import generate_step
from qwen2_mlx.loader import load_model
from qwen2_mlx.metal_kernels import attention as attention_module
from qwen2_mlx.metal_kernels import dispatch
from qwen2_mlx.metal_kernels import dual_chunk_attention as dca_module
from qwen2_mlx.metal_kernels import quantized as quantized_module
from qwen2_mlx.metal_kernels.dispatch import metal_available
from qwen2_mlx.metal_kernels.quantized import use_kernel_linears
from qwen2_mlx.sampling import SamplingParams

from conftest import load_torch_model

BACKEND = "metal" if metal_available() else "emulator"
pytestmark = pytest.mark.skipif(
    BACKEND == "emulator" and shutil.which("g++") is None, reason="the emulator needs g++"
)
# head_dim 64 (the kernels need a multiple of 32), GQA 7:1 like Qwen2-0.5B/7B.
GQA7_D64 = dict(hidden_size=448, num_heads=7, num_kv_heads=1, intermediate_size=320)
DCA_CONFIG = {"chunk_size": 16, "local_size": 4, "original_max_position_embeddings": 8}
PROMPT = np.random.RandomState(21).randint(0, 509, size=(1, 9))
NEW_TOKENS = 6


def rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture
def kernel_calls(monkeypatch, use_kernels):
    """Kernels forced on; counts the calls of each kernel launcher the model reaches."""
    use_kernels("1")
    # Spies count launcher calls: keep the (separately tested) self-check out of them.
    monkeypatch.setattr(dispatch, "SELF_CHECK_BACKENDS", set())
    calls: dict[str, int] = {}
    targets = [(attention_module, "gqa_decode"), (dca_module, "dual_chunk_attention_kernel"),
               (quantized_module, "quantized_matvec")]
    for module, name in targets:
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


def decode_logits(model, ids: np.ndarray, prompt_len: int, **cache_kwargs) -> np.ndarray:
    """Prefill `prompt_len` tokens in steps of 4, then feed the rest one token at a time."""
    cache = model.make_cache(**cache_kwargs)
    for layer_cache in cache:
        layer_cache.prompt_length = prompt_len
    steps = [np.array(model(mx.array(ids[:, i : min(i + 4, prompt_len)]), cache=cache))
             for i in range(0, prompt_len, 4)]
    for t in range(prompt_len, ids.shape[1]):
        steps.append(np.array(model(mx.array(ids[:, t : t + 1]), cache=cache)))
    return np.concatenate(steps, axis=1).astype(np.float32)


def greedy(model, max_tokens: int = NEW_TOKENS) -> list[int]:
    return [t for t, _ in generate_step(mx.array(PROMPT[0]), model, sampling=SamplingParams(),
                                        max_tokens=max_tokens, prefill_step_size=4)]


def test_decode_kernel_matches_transformers(checkpoint_factory, kernel_calls):
    path = checkpoint_factory(**GQA7_D64)
    ref = load_torch_model(path)
    with torch.no_grad():
        generated = ref.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        expected_logits = ref(generated).logits.float().numpy()
    expected_tokens = generated[0, PROMPT.shape[1]:].tolist()
    model = load_model(path)
    ours = decode_logits(model, generated.numpy(), PROMPT.shape[1])
    # 2 layers x (6 decode steps + the 9-token prompt's last 1-token prefill step).
    assert kernel_calls.get("gqa_decode", 0) == 2 * (NEW_TOKENS + 1)
    assert rel_error(ours, expected_logits) <= 1e-4
    assert greedy(model) == expected_tokens


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_quantized_model_kernel_path_equals_reference(checkpoint_factory, monkeypatch,
                                                      kernel_calls, kv_bits):
    model = load_model(checkpoint_factory(**GQA7_D64))
    nn.quantize(model, group_size=64, bits=4)
    use_kernel_linears(model)
    ids = np.concatenate([PROMPT, np.random.RandomState(22).randint(0, 509, (1, 4))], axis=1)
    ours = decode_logits(model, ids, PROMPT.shape[1], kv_bits=kv_bits)
    tokens = greedy(model)
    # 7 projections per layer x 2 layers + the tied LM head, per decode step.
    assert kernel_calls["quantized_matvec"] >= 4 * 15
    assert kernel_calls["gqa_decode"] >= 4 * 2
    dispatch.set_kernel_backend("0")  # the fixture restores it
    reference = decode_logits(model, ids, PROMPT.shape[1], kv_bits=kv_bits)
    assert rel_error(ours, reference) <= 1e-4
    assert tokens == greedy(model)


def test_dual_chunk_attention_kernels_equal_reference(checkpoint_factory, monkeypatch,
                                                      kernel_calls):
    """30 tokens over chunks of L = 12: prefill tiles cross chunk boundaries, decode steps
    see intra, successive and inter-chunk keys."""
    path = checkpoint_factory(**GQA7_D64, extra_config={"dual_chunk_attention_config":
                                                        DCA_CONFIG})
    model = load_model(path)
    assert model.config.long_context.mode == "dca"
    ids = np.random.RandomState(23).randint(0, 509, size=(1, 30))
    ours = decode_logits(model, ids, 26)
    assert kernel_calls["dual_chunk_attention_kernel"] == (7 + 4) * 2  # 7 prefill steps, 4 decode
    dispatch.set_kernel_backend("0")  # the fixture restores it
    reference = decode_logits(model, ids, 26)
    assert rel_error(ours, reference) <= 1e-4


# Qwen2-0.5B's real head geometry: 14 query heads over 2 KV heads (G = 7), head_dim 64.
REAL_0_5B = dict(hidden_size=896, num_heads=14, num_kv_heads=2, intermediate_size=128)


@pytest.fixture
def self_checked_kernels(monkeypatch, use_kernels):
    """Kernels on with self-checks on this backend (as on a Mac); counts the DCA kernel's
    quantized launches."""
    use_kernels("1")
    monkeypatch.setattr(dispatch, "SELF_CHECK_BACKENDS", {"metal", "emulator"})
    dispatch.reset_kernel_state()
    quantized_launches = []
    real = dca_module.dual_chunk_attention_kernel

    def spy(*args, **kwargs):
        if kwargs.get("bits"):
            quantized_launches.append(kwargs["bits"])
        return real(*args, **kwargs)

    monkeypatch.setattr(dca_module, "dual_chunk_attention_kernel", spy)
    yield quantized_launches
    dispatch.reset_kernel_state()


def test_real_geometry_decodes_like_transformers_with_self_checks_on(checkpoint_factory,
                                                                     self_checked_kernels):
    path = checkpoint_factory(**REAL_0_5B)
    ref = load_torch_model(path)
    with torch.no_grad():
        generated = ref.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        expected_logits = ref(generated).logits.float().numpy()
    model = load_model(path)
    ours = decode_logits(model, generated.numpy(), PROMPT.shape[1])
    assert rel_error(ours, expected_logits) <= 1e-4
    assert greedy(model) == generated[0, PROMPT.shape[1]:].tolist()
    (variant,) = dispatch.kernel_status().variants
    assert variant.kernel == "gqa_decode" and variant.shape["group"] == 7
    assert variant.self_check == "passed" and variant.enabled


def test_dca_decode_reads_the_quantized_cache_as_stored(checkpoint_factory,
                                                        self_checked_kernels):
    """DCA with an 8-bit KV cache: decode runs the DCA kernel on the packed cache (no
    dequantized copy), prefill on the dequantized one; both equal the reference path."""
    path = checkpoint_factory(**REAL_0_5B, extra_config={"dual_chunk_attention_config":
                                                         DCA_CONFIG})
    model = load_model(path)
    ids = np.random.RandomState(24).randint(0, 509, size=(1, 30))
    ours = decode_logits(model, ids, 26, kv_bits=8)
    # 4 decode steps x 2 layers on the 8-bit cache (plus the self-check's own launches).
    assert len(self_checked_kernels) >= 4 * 2 and set(self_checked_kernels) == {8}
    names = {(v.kernel, v.self_check, v.enabled) for v in dispatch.kernel_status().variants}
    assert ("dca_decode_quantized", "passed", True) in names
    dispatch.set_kernel_backend("0")  # the fixture restores it
    reference = decode_logits(model, ids, 26, kv_bits=8)
    assert rel_error(ours, reference) <= 1e-4
