"""`qwen2-mlx convert`: downloads, float and quantized round trips, mlx-lm interoperability,
atomic output, streaming memory and every promised error."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from qwen2_mlx import load
from qwen2_mlx.cli.main import cli
from qwen2_mlx.convert import DiskFullError, convert
from qwen2_mlx.convert import save as save_module
from qwen2_mlx.convert.convert import check_source_config
from qwen2_mlx.convert.save import PAUSE_AFTER_SHARD_ENV
from qwen2_mlx.loader import compute_dtype_for_backend, load_model

from conftest import load_torch_model

PROMPT_IDS = list(range(3, 200, 7))  # 29 tokens of the 512-token tiny vocabulary


def logits(model, ids=PROMPT_IDS) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))


def relative_rms(x: np.ndarray, reference: np.ndarray) -> float:
    """rms(x - reference) / std(reference): the error measure of mlx-cpu-performance.md."""
    return float(np.sqrt(((x - reference) ** 2).mean()) / reference.std())


def greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full forward passes (independent of the generation module)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1])))
    return ids[len(prompt):]


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a model directory, through the safetensors package (not MLX)."""
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def safetensors_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# ------------------------------------------------------------ independent dequantization
def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """MLX packs 32 // bits values per uint32 word, the first in the lowest bits."""
    per_word = 32 // bits
    shifts = np.arange(per_word, dtype=np.uint32) * bits
    values = (packed[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * per_word)


def dequantize(packed, scales, biases, bits: int, group_size: int) -> np.ndarray:
    """w = scale * q + bias per group of `group_size` inputs (MLX affine quantization)."""
    q = unpack(packed, bits).astype(np.float64)
    q = q.reshape(*q.shape[:-1], -1, group_size)
    w = q * scales[..., None].astype(np.float64) + biases[..., None].astype(np.float64)
    return w.reshape(*w.shape[:-2], -1)


def dequantized_checkpoint(quantized: Path, out: Path) -> dict[str, np.ndarray]:
    """Write a float32 checkpoint of `quantized`'s weights dequantized in numpy."""
    from safetensors.numpy import save_file

    config = json.loads((quantized / "config.json").read_text())
    block = config.pop("quantization")
    config.pop("quantization_config")
    tensors = read_tensors(quantized)
    weights: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        layer = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and f"{layer}.scales" in tensors:
            settings = block.get(layer) or block
            value = dequantize(value, tensors[f"{layer}.scales"], tensors[f"{layer}.biases"],
                               settings["bits"], settings["group_size"])
        weights[name] = value.astype(np.float32)
    out.mkdir()
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    return weights


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def source(checkpoint_factory) -> Path:
    """The tiny float32 checkpoint with RoPE theta in both transformers spellings, so mlx-lm
    (which reads only the 4.x top-level `rope_theta`) reads it right too."""
    return checkpoint_factory(extra_config={"rope_theta": 10000.0})


@pytest.fixture(scope="module")
def trained_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny model after 40 Adam steps on a 40-token cycle: a model with confident
    predictions, as real language models have, unlike a random one whose top-2 logits are
    often closer than any quantization error. Returns (path, cycle)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        cycle = rng.permutation(np.arange(3, 500))[:40]
        model = load_torch_model(tiny_checkpoint).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(40):
            starts = rng.integers(0, len(cycle), size=16)
            batch = torch.tensor(np.stack(
                [np.take(cycle, np.arange(s, s + 25), mode="wrap") for s in starts]))
            out = model(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]),
                                                     batch[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        path = tmp_path_factory.mktemp("trained")
        model.eval().save_pretrained(path)
    finally:
        torch.set_num_threads(threads)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny_checkpoint / name, path / name)
    return path, cycle


@pytest.fixture(scope="module")
def sharded_source(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint saved by transformers in several shards."""
    path = tmp_path_factory.mktemp("sharded")
    load_torch_model(tiny_checkpoint).save_pretrained(path, max_shard_size="60KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny_checkpoint / name, path / name)
    assert len(list(path.glob("model-*.safetensors"))) >= 4
    return path


def run_cli(*args: str):
    return CliRunner().invoke(cli, ["convert", *args])


# ----------------------------------------------------------------- download (local hub)
def test_load_and_convert_a_hub_repo(hub_server, tiny_checkpoint, tmp_path):
    served = Path(shutil.copytree(tiny_checkpoint, tmp_path / "served"))
    # Files a conversion must not fetch.
    (served / "pytorch_model.bin").write_bytes(b"\0" * 1000)
    (served / "README.md").write_text("# tiny")
    (served / "onnx").mkdir()
    (served / "onnx" / "model.onnx").write_bytes(b"\0" * 1000)
    hub_server.add("tiny-org/tiny-qwen2", served)

    model, tokenizer = load("tiny-org/tiny-qwen2")
    local_model, local_tokenizer = load(tiny_checkpoint)
    np.testing.assert_array_equal(logits(model), logits(local_model))
    assert tokenizer.encode("hello") == local_tokenizer.encode("hello")

    result = run_cli("--hf-path", "tiny-org/tiny-qwen2", "--mlx-path", str(tmp_path / "q8"),
                     "-q", "--q-bits", "8")
    assert result.exit_code == 0, result.output
    assert "[1/1] model.safetensors" in result.stderr
    fetched = set(hub_server.downloaded())
    assert fetched == {"config.json", "generation_config.json", "model.safetensors",
                       "tokenizer.json", "tokenizer_config.json"}
    converted, _ = load(tmp_path / "q8")
    assert converted.layers[0].mlp.up_proj.bits == 8


@pytest.mark.parametrize("case", ["missing", "private", "gated", "gated-wrong-token"])
def test_hub_errors_say_what_to_do(hub_server, tiny_checkpoint, tmp_path, monkeypatch,
                                   case):
    hub_server.add("org/private", tiny_checkpoint, private=True, token="hf_granted")
    hub_server.add("org/gated", tiny_checkpoint, gated=True, token="hf_granted")
    repo, expected = {
        "missing": ("org/missing", "neither a local directory nor a repository on the Hub"),
        "private": ("org/private", "a private repository needs HF_TOKEN"),
        "gated": ("org/gated", "is gated: accept its licence on the Hub and set HF_TOKEN"),
        "gated-wrong-token": ("org/gated", "is gated"),
    }[case]
    if case == "gated-wrong-token":
        monkeypatch.setenv("HF_TOKEN", "hf_not_granted")  # the Hub answers 403 GatedRepo
    out = tmp_path / "out"
    result = run_cli("--hf-path", repo, "--mlx-path", str(out))
    assert result.exit_code == 1
    assert expected in result.output
    assert not out.exists()


def test_hub_repo_with_the_right_token_converts(hub_server, tiny_checkpoint, tmp_path,
                                                monkeypatch):
    hub_server.add("org/gated", tiny_checkpoint, gated=True, token="hf_granted")
    monkeypatch.setenv("HF_TOKEN", "hf_granted")
    convert("org/gated", tmp_path / "out", log=None)
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ---------------------------------------------------------------------- float round trips
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_float_conversion_casts_every_tensor_exactly(tiny_checkpoint, tmp_path, dtype):
    import torch
    from safetensors.torch import load_file

    result = convert(tiny_checkpoint, tmp_path / "out", dtype=dtype, log=None)
    out = tmp_path / "out"
    source = load_file(tiny_checkpoint / "model.safetensors")
    written = {}
    for file in out.glob("*.safetensors"):
        written.update(load_file(file))
    source.pop("lm_head.weight", None)  # tied: the embedding is the head
    assert set(written) == set(source)
    for name, tensor in source.items():
        expected = tensor.to(getattr(torch, dtype))  # torch's cast is the reference
        assert written[name].dtype == expected.dtype, name
        assert torch.equal(written[name], expected), name

    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == dtype and "quantization" not in config
    assert config["rope_theta"] == 10000.0  # 4.x spelling added for mlx-lm
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_checkpoint / name).read_bytes()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    assert index["metadata"]["total_size"] == result.total_size

    model, _ = load(out)
    assert model.model.norm.weight.dtype == getattr(mx, dtype)
    reference = logits(load_model(tiny_checkpoint))
    # float16/bfloat16 weights and activations: ~1e-3 / ~1e-2 relative rounding per op.
    tolerance = {"float32": 1e-6, "float16": 1e-2, "bfloat16": 6e-2}[dtype]
    assert relative_rms(logits(model), reference) <= tolerance


# ------------------------------------------------------------------ quantized round trips
QUANT_CASES = [(8, 32, 64), (8, 64, 64), (8, 128, 64), (4, 32, 64), (4, 64, 64), (4, 128, 64),
               (4, 128, 128), (8, 128, 128)]


@pytest.mark.parametrize("bits,group_size,hidden", QUANT_CASES)
def test_quantized_model_computes_with_the_stored_weights(checkpoint_factory, tmp_path, bits,
                                                          group_size, hidden):
    """The quantized model equals a float model built from its weights dequantized in numpy,
    and every dequantized weight is within one quantization step of the source weight."""
    from safetensors.numpy import load_file

    src = checkpoint_factory(hidden_size=hidden, intermediate_size=2 * hidden)
    out = tmp_path / "q"
    result = convert(src, out, quantize=True, q_bits=bits, q_group_size=group_size, log=None)

    # Which layers stay in float follows from the source shapes alone.
    source = load_file(src / "model.safetensors")
    quantizable = {k.rsplit(".", 1)[0]: v.shape[-1] for k, v in source.items()
                   if k.endswith(".weight") and v.ndim == 2 and k != "lm_head.weight"}
    expected_float = sorted(p for p, d in quantizable.items() if d % group_size)
    assert sorted(result.left_in_float) == expected_float
    block = json.loads((out / "config.json").read_text())["quantization"]
    assert block == {"group_size": group_size, "bits": bits, "mode": "affine",
                     **{p: False for p in expected_float}}

    stored = read_tensors(out)
    for layer in set(quantizable) - set(expected_float):
        scales = stored[f"{layer}.scales"]
        w = dequantize(stored[f"{layer}.weight"], scales, stored[f"{layer}.biases"], bits,
                       group_size)
        error = np.abs(w - source[f"{layer}.weight"]).reshape(*scales.shape, group_size)
        # MLX rounds to a grid of step |scale| that it shifts so one group edge is exact:
        # the error is at most one step (half a step for plain round-to-nearest).
        assert (error <= np.abs(scales)[..., None] * (1 + 1e-5) + 1e-7).all(), layer

    dequantized_checkpoint(out, tmp_path / "dequantized")
    quantized_logits = logits(load_model(out))
    reference = logits(load_model(tmp_path / "dequantized"))
    # Same weights, both float32: only summation order differs.
    np.testing.assert_allclose(quantized_logits, reference, rtol=0,
                               atol=1e-5 * np.abs(reference).max())


def test_quantization_error_and_greedy_tokens(trained_checkpoint, tmp_path):
    """q8 and q4 against the float32 model.

    Affine b-bit quantization has a step of range / (2^b - 1) per group, so its rms weight
    error is ~step/sqrt(12): ~0.6% of a Gaussian group's std at 8 bits and 17x that
    (255/15) at 4 bits. Through the 2-layer network the logits' relative rms error measured
    0.020 (q8) and 0.35 (q4) at group size 64; the bounds below leave ~2.5x headroom, and the
    q4/q8 ratio must be near the 17 the step sizes predict.
    """
    path, cycle = trained_checkpoint
    float_model = load_model(path)
    ids = np.take(cycle, np.arange(32), mode="wrap").tolist()
    reference = logits(float_model, ids)
    errors = {}
    for bits in (8, 4):
        out = tmp_path / f"q{bits}"
        convert(path, out, quantize=True, q_bits=bits, q_group_size=64, log=None)
        model = load_model(out)
        errors[bits] = relative_rms(logits(model, ids), reference)
        if bits == 8:
            prompt = cycle[5:11].tolist()
            expected = greedy(float_model, prompt, 24)
            assert expected == np.take(cycle, np.arange(11, 35), mode="wrap").tolist()
            assert greedy(model, prompt, 24) == expected
    assert errors[8] <= 0.05, errors
    assert errors[4] <= 0.8, errors
    assert 17 / 2 <= errors[4] / errors[8] <= 17 * 2, errors


def test_quantized_model_runs_in_float32_on_cpu_unless_told(source, tmp_path):
    out = tmp_path / "q4"
    convert(source, out, quantize=True, dtype="bfloat16", log=None)
    model, _ = load(out)
    q_proj = model.layers[0].self_attn.q_proj
    expected = mx.float32 if mx.default_device().type == mx.cpu else mx.bfloat16
    assert q_proj.scales.dtype == expected and model.model.norm.weight.dtype == expected
    assert model(mx.array([[1, 2, 3]])).dtype == expected
    with mx.stream(mx.cpu):  # the policy follows the device MLX computes on
        assert compute_dtype_for_backend() == mx.float32
    model16, _ = load(out, dtype="float16")
    assert model16.layers[0].self_attn.q_proj.scales.dtype == mx.float16
    assert model16(mx.array([[1, 2, 3]])).dtype == mx.float16


# ------------------------------------------------------------------------- mixed recipes
def test_embeddings_8_recipe(checkpoint_factory, tmp_path):
    src = checkpoint_factory(tie=False)
    out = tmp_path / "mixed"
    result = run_cli("--hf-path", str(src), "--mlx-path", str(out), "-q",
                     "--quant-predicate", "embeddings_8")
    assert result.exit_code == 0, result.output
    block = json.loads((out / "config.json").read_text())["quantization"]
    eight = {"group_size": 64, "bits": 8, "mode": "affine"}
    four = {"group_size": 64, "bits": 4, "mode": "affine"}
    assert block["model.embed_tokens"] == eight and block["lm_head"] == eight
    assert block["model.layers.0.self_attn.q_proj"] == four
    assert block["model.layers.1.mlp.down_proj"] == four
    model, _ = load(out)
    assert model.lm_head.bits == 8 and model.model.embed_tokens.bits == 8
    assert model.layers[1].mlp.down_proj.bits == 4


def test_quantize_model_in_memory(tiny_checkpoint):
    from qwen2_mlx.convert import quantize_model

    model = load_model(tiny_checkpoint)
    _, config = quantize_model(model, {"model_type": "qwen2"}, group_size=32, bits=8)
    assert config["quantization"] == config["quantization_config"] == {
        "group_size": 32, "bits": 8, "mode": "affine"}
    assert model.layers[0].mlp.up_proj.bits == 8


# --------------------------------------------------------------- mlx-lm interoperability
INTEROP = {"float16": {}, "q4": {"quantize": True, "q_bits": 4},
           "q8": {"quantize": True, "q_bits": 8}}


@pytest.fixture(scope="module")
def interop_pair(source, tmp_path_factory):
    """kind -> (our conversion, mlx-lm's conversion) of `source`, both in float16."""
    mlx_lm_convert = pytest.importorskip("mlx_lm.convert")
    root = tmp_path_factory.mktemp("interop")
    pairs = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in pairs:
            ours, theirs = root / f"ours-{kind}", root / f"mlx-lm-{kind}"
            settings = dict(INTEROP[kind], q_group_size=64 if kind != "float16" else None)
            convert(source, ours, dtype="float16", log=None, **settings)
            mlx_lm_convert.convert(str(source), str(theirs), dtype="float16", **settings)
            pairs[kind] = (ours, theirs)
        return pairs[kind]

    return get


def mlx_lm_logits(path: Path, dtype=None) -> np.ndarray:
    from mlx_lm.utils import load_model as mlx_lm_load_model

    model, _ = mlx_lm_load_model(path)
    if dtype is not None:
        model.set_dtype(dtype)
    return logits(model)


def assert_same_logits(ours: np.ndarray, theirs: np.ndarray, half: bool) -> None:
    # Same weights and the same MLX kernels: float32 runs agree to summation-order noise;
    # float16 runs to one or two float16 ulps (2^-10 relative) of the largest logit.
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=(2e-3 if half else 1e-5) * scale)


@pytest.mark.parametrize("kind", list(INTEROP))
def test_mlx_lm_conversion_loads_in_qwen2_mlx(interop_pair, kind):
    _, theirs = interop_pair(kind)
    # Both in float16, mlx-lm's default for this checkpoint.
    ours16, _ = load(theirs, dtype="float16")
    assert_same_logits(logits(ours16), mlx_lm_logits(theirs), half=True)
    # Both in float32 (our default for a quantized model on CPU).
    ours32 = load_model(theirs, dtype=None if kind != "float16" else "float32")
    assert_same_logits(logits(ours32), mlx_lm_logits(theirs, mx.float32), half=False)


@pytest.mark.parametrize("kind", list(INTEROP))
def test_qwen2_mlx_conversion_loads_in_mlx_lm(interop_pair, kind):
    from mlx_lm import load as mlx_lm_load

    ours, _ = interop_pair(kind)
    model, tokenizer = mlx_lm_load(str(ours))  # with mlx-lm's tokenizer loading too
    assert tokenizer.encode("hello world") == load(ours)[1].encode("hello world")
    assert_same_logits(logits(load_model(ours, dtype="float16")), logits(model), half=True)
    model.set_dtype(mx.float32)
    assert_same_logits(logits(load_model(ours, dtype="float32")), logits(model), half=False)


@pytest.mark.parametrize("kind", list(INTEROP))
def test_same_tensors_and_size_as_mlx_lm(interop_pair, kind):
    ours, theirs = interop_pair(kind)
    a, b = read_tensors(ours), read_tensors(theirs)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    assert safetensors_bytes(ours) == safetensors_bytes(theirs)
    ours_block = json.loads((ours / "config.json").read_text()).get("quantization")
    theirs_block = json.loads((theirs / "config.json").read_text()).get("quantization")
    assert ours_block == theirs_block


@pytest.mark.parametrize("kind", list(INTEROP))
def test_files_are_byte_identical_to_mlx_lm(interop_pair, kind):
    """MLX lays tensors out in the order they are handed over (the model's parameter order),
    and a different order changes the header's offsets, hence its length, by a few bytes on
    real sizes (e.g. 16-22 bytes on Qwen2-0.5B). With the same order the files are equal."""
    ours, theirs = interop_pair(kind)
    files = sorted(p.name for p in theirs.glob("*.safetensors"))
    assert sorted(p.name for p in ours.glob("*.safetensors")) == files
    for name in files:
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name


def test_transformers_5_config_converts_for_mlx_lm(tiny_checkpoint, tmp_path):
    """A checkpoint with RoPE only under `rope_parameters` still gives mlx-lm the right theta."""
    pytest.importorskip("mlx_lm")
    assert "rope_theta" not in json.loads((tiny_checkpoint / "config.json").read_text())
    convert(tiny_checkpoint, tmp_path / "out", quantize=True, q_bits=8, log=None)
    assert_same_logits(logits(load_model(tmp_path / "out")),
                       mlx_lm_logits(tmp_path / "out", mx.float32), half=False)


def test_mixed_recipe_matches_mlx_lm(source, tmp_path):
    mlx_lm_convert = pytest.importorskip("mlx_lm.convert")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    convert(source, ours, quantize=True, q_group_size=64, quant_predicate="mixed_3_6", log=None)
    mlx_lm_convert.convert(str(source), str(theirs), quantize=True, q_group_size=64,
                           quant_predicate="mixed_3_6")
    ours_block = json.loads((ours / "config.json").read_text())["quantization"]
    theirs_block = json.loads((theirs / "config.json").read_text())["quantization"]
    assert ours_block == theirs_block  # the same bits for every layer
    assert {v["bits"] for v in ours_block.values() if isinstance(v, dict)} == {3, 6}
    a, b = read_tensors(ours), read_tensors(theirs)
    assert all(np.array_equal(a[k], b[k]) for k in b) and sorted(a) == sorted(b)
    # Per-layer 3- and 6-bit entries load in qwen2-mlx like in mlx-lm.
    assert_same_logits(logits(load_model(theirs)), mlx_lm_logits(theirs, mx.float32),
                       half=False)


# ------------------------------------------------------------------ sharding and streaming
def test_sharded_input_and_output(sharded_source, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    result = run_cli("--hf-path", str(sharded_source), "--mlx-path", str(out),
                     "--max-shard-size", "40KB")
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n >= 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    tensors = read_tensors(out)
    for file in out.glob("*.safetensors"):
        from safetensors.numpy import load_file

        shard = load_file(file)
        assert sum(v.nbytes for v in shard.values()) <= 40_000 or len(shard) == 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    assert f"[{len(list(sharded_source.glob('model-*.safetensors')))}/" in result.stderr
    np.testing.assert_array_equal(logits(load_model(out)),
                                  logits(load_model(tiny_checkpoint)))


def write_random_sharded_checkpoint(out: Path, layers_per_shard: int = 2) -> Path:
    """A ~124 MB float32 checkpoint in 5 shards (hidden 512, 8 layers, untied)."""
    from mlx.utils import tree_flatten

    from qwen2_mlx.model import Model, ModelConfig

    config = dict(model_type="qwen2", hidden_size=512, intermediate_size=2048,
                  num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                  vocab_size=512, tie_word_embeddings=False, rope_theta=10000.0,
                  torch_dtype="float32", architectures=["Qwen2ForCausalLM"])
    mx.random.seed(0)
    groups: dict[int, dict[str, mx.array]] = {}
    for name, value in tree_flatten(Model(ModelConfig.from_dict(config)).parameters()):
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -layers_per_shard
        groups.setdefault(layer // layers_per_shard, {})[name] = value
    out.mkdir(parents=True)
    weight_map = {}
    for i, (_, group) in enumerate(sorted(groups.items()), start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        mx.save_safetensors(str(out / name), group, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config))
    return out


PEAK_RSS_CHILD = r"""
import json, sys
from qwen2_mlx.convert import convert

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
before = status("VmRSS")
convert(sys.argv[1], sys.argv[2], log=None, **json.loads(sys.argv[3]))
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


def convert_peak_rss(source: Path, out: Path, **kwargs) -> int:
    """Peak RSS growth (bytes) of a conversion in a fresh process (Linux /proc)."""
    run = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, str(source), str(out),
                          json.dumps(kwargs)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    numbers = json.loads(run.stdout.strip().splitlines()[-1])
    return numbers["peak"] - numbers["before"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_conversion_streams_shard_by_shard(tmp_path):
    source = write_random_sharded_checkpoint(tmp_path / "src")
    shards = [f.stat().st_size for f in source.glob("*.safetensors")]
    out_shard = 40_000_000
    for settings in ({"dtype": "bfloat16"}, {"quantize": True}):
        growth = convert_peak_rss(source, tmp_path / f"out{len(settings)}{settings.get('dtype')}",
                                  max_shard_size=out_shard, **settings)
        # At most one input shard plus one output shard, well under the whole model.
        assert growth < max(shards) + out_shard < 0.6 * sum(shards), (growth, settings)


# ---------------------------------------------------------------------- atomic output
def start_cli_conversion(source: Path, out: Path, pause: float) -> subprocess.Popen:
    env = dict(os.environ, **{PAUSE_AFTER_SHARD_ENV: str(pause)})
    return subprocess.Popen(
        [sys.executable, "-m", "qwen2_mlx.cli.main", "convert", "--hf-path", str(source),
         "--mlx-path", str(out), "--max-shard-size", "40KB"],
        stderr=subprocess.PIPE, text=True, env=env)


def wait_for_line(process: subprocess.Popen, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for line in process.stderr:
        if text in line:
            return
        assert time.monotonic() < deadline, f"no {text!r} in time"
    raise AssertionError(f"process ended without printing {text!r}")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_interrupted_conversion_leaves_no_output(sharded_source, tmp_path, sig):
    out = tmp_path / "out"
    process = start_cli_conversion(sharded_source, out, pause=60)
    try:
        wait_for_line(process, "wrote shard 1")  # one shard on disk, the next not yet
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
        assert len(partial) == 1 and any(partial[0].glob("*.safetensors"))
        process.send_signal(sig)
        process.wait(timeout=30)
    finally:
        process.kill()
        process.stderr.close()
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name != "out"]
    if sig == signal.SIGTERM:
        assert leftovers == []  # cleaned up on the way out
    else:
        assert leftovers == partial  # SIGKILL cannot be caught: the next run cleans it
        convert(sharded_source, out, log=None)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        assert (out / "config.json").is_file()


def test_disk_full_mid_write_removes_partial_output(sharded_source, tmp_path, monkeypatch):
    real_write = save_module.write_safetensors
    calls = []

    def fill_up_on_second_shard(file, tensors, metadata):
        calls.append(file)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        real_write(file, tensors, metadata)

    monkeypatch.setattr(save_module, "write_safetensors", fill_up_on_second_shard)
    out = tmp_path / "out"
    with pytest.raises(DiskFullError, match="no space left on .* while writing shard-00002"):
        convert(sharded_source, out, max_shard_size="40KB", log=None)
    assert list(tmp_path.iterdir()) == []

    calls.clear()
    result = run_cli("--hf-path", str(sharded_source), "--mlx-path", str(out),
                     "--max-shard-size", "40KB")
    assert result.exit_code == 1 and "no space left" in result.output
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    convert(tiny_checkpoint, out, log=None)
    (out / "old.txt").write_text("left from the old model")
    result = run_cli("--hf-path", str(tiny_checkpoint), "--mlx-path", str(out))
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: output {out} already exists; add --force to replace it"
    assert (out / "old.txt").is_file()

    result = run_cli("--hf-path", str(tiny_checkpoint), "--mlx-path", str(out), "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("kind", ["user files", "a file"])
def test_force_never_replaces_what_is_not_a_model(tiny_checkpoint, tmp_path, kind):
    """--force replaces a model directory or an empty one; a directory of a user's files (or a
    file) stays, with a message, and without the [Errno] and force=True of Python."""
    out = tmp_path / "out"
    if kind == "a file":
        out.write_text("important")
    else:
        out.mkdir()
        (out / "important.txt").write_text("important")
    result = run_cli("--hf-path", str(tiny_checkpoint), "--mlx-path", str(out), "--force")
    assert result.exit_code == 1
    assert "is never replaced" in result.output or "holds files that are not a model" in (
        result.output)
    assert "Errno" not in result.output and "force=True" not in result.output
    assert (out.read_text() if kind == "a file" else (out / "important.txt").read_text()) == (
        "important")
    with pytest.raises(FileExistsError):
        convert(tiny_checkpoint, out, force=True, log=None)


def test_force_replaces_an_empty_directory(tiny_checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    assert run_cli("--hf-path", str(tiny_checkpoint), "--mlx-path", str(tmp_path / "out"),
                   "--force").exit_code == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_failed_forced_conversion_keeps_the_old_output(tiny_checkpoint_copy, tmp_path):
    out = tmp_path / "out"
    convert(tiny_checkpoint_copy, out, log=None)
    before = (out / "model.safetensors").read_bytes()
    file = tiny_checkpoint_copy / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupt"):
        convert(tiny_checkpoint_copy, out, force=True, log=None)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("args,message", [
    (["-q", "--q-bits", "7"], "quantization bits must be one of 2, 3, 4, 5, 6, 8, got 7"),
    (["-q", "--q-group-size", "48"], "group size must be one of 32, 64, 128, got 48"),
    (["--q-bits", "4"], "need -q (--quantize)"),
    (["-q", "--quant-predicate", "mixed_9_9"], "'mixed_9_9' is not one of"),
    (["--dtype", "int8"], "'int8' is not one of"),
    (["--max-shard-size", "lots"], "size must look like 5GB"),
])
def test_bad_options(tiny_checkpoint, tmp_path, args, message):
    result = run_cli("--hf-path", str(tiny_checkpoint), "--mlx-path", str(tmp_path / "o"), *args)
    assert result.exit_code != 0 and message in result.output
    assert not (tmp_path / "o").exists()


def test_bad_quantization_through_the_api(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="got 7"):
        convert(tiny_checkpoint, tmp_path / "o", quantize=True, q_bits=7)
    with pytest.raises(ValueError, match="unknown quantization recipe 'nope'"):
        convert(tiny_checkpoint, tmp_path / "o", quantize=True, quant_predicate="nope")


def test_unsupported_model_type(tiny_checkpoint_copy, tmp_path):
    config_file = tiny_checkpoint_copy / "config.json"
    config = json.loads(config_file.read_text())
    config["model_type"] = "llama"
    config_file.write_text(json.dumps(config))
    result = run_cli("--hf-path", str(tiny_checkpoint_copy), "--mlx-path", str(tmp_path / "o"))
    assert result.exit_code == 1
    assert "model_type 'llama' cannot be converted" in result.output
    assert "qwen2 and qwen2_moe" in result.output
    check_source_config({"model_type": "qwen2_moe"}, tiny_checkpoint_copy)  # accepted


def test_already_quantized_source_is_refused(tiny_checkpoint, tmp_path):
    convert(tiny_checkpoint, tmp_path / "q4", quantize=True, log=None)
    with pytest.raises(ValueError, match="already quantized"):
        convert(tmp_path / "q4", tmp_path / "again", quantize=True, log=None)


def test_corrupt_shard_is_named(sharded_source, tmp_path):
    broken = Path(shutil.copytree(sharded_source, tmp_path / "broken"))
    victim = sorted(broken.glob("model-*.safetensors"))[2]
    victim.write_bytes(b"\xff" * 64)
    out = tmp_path / "out"
    result = run_cli("--hf-path", str(broken), "--mlx-path", str(out))
    assert result.exit_code == 1
    assert victim.name in result.output and "truncated or corrupt" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_pytorch_only_checkpoint_gets_a_hint(tmp_path, tiny_checkpoint):
    src = tmp_path / "bin_only"
    src.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", src)
    (src / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match="PyTorch weights pytorch_model.bin"):
        convert(src, tmp_path / "out", log=None)


def test_output_inside_source_is_refused(tiny_checkpoint_copy):
    with pytest.raises(ValueError, match="would overwrite the source"):
        convert(tiny_checkpoint_copy, tiny_checkpoint_copy, force=True, log=None)
    assert (tiny_checkpoint_copy / "model.safetensors").is_file()


def test_foreign_quantization_config_is_refused_by_load(tiny_checkpoint_copy):
    config_file = tiny_checkpoint_copy / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128}
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported quantization_config .quant_method 'awq'"):
        load_model(tiny_checkpoint_copy)


# --- quantization that cannot happen is said, never reported as done ----------------------


def test_nothing_quantizable_is_an_error_not_a_float_model(checkpoint_factory, tmp_path):
    """Every input dimension (96) misses group size 64: convert -q writes nothing and exits
    non-zero; before, it reported success at 32 bits per weight."""
    source = checkpoint_factory(hidden_size=96, intermediate_size=96, num_heads=4)
    result = run_cli("--hf-path", str(source), "--mlx-path", str(tmp_path / "q"), "-q")
    assert result.exit_code == 1
    assert "nothing can be quantized with group size 64" in result.output
    assert "input dimension (96)" in result.output
    assert not (tmp_path / "q").exists()


def test_layers_left_in_float_are_said_in_one_line(checkpoint_factory, tmp_path):
    source = checkpoint_factory(hidden_size=64, intermediate_size=96)
    result = run_cli("--hf-path", str(source), "--mlx-path", str(tmp_path / "q"), "-q")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "stay in float" in line]
    assert len(lines) == 1
    assert lines[0].startswith("warning: 2 of 15 quantizable layers stay in float: input "
                               "dimension 96 is not a multiple of group size 64")
