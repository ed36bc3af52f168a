"""`qwen2-mlx lora` and `qwen2-mlx fuse`, and the bundled LoRA example, on a tiny model."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

from qwen2_mlx import load
from qwen2_mlx.cli.main import cli
from qwen2_mlx.lora import load_adapter

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lora"
IDS = mx.array([[5, 80, 120, 7, 300, 42, 9]])


@pytest.fixture(scope="module")
def tiny(checkpoint_factory):
    return checkpoint_factory()


@pytest.fixture
def runner():
    return CliRunner()


def test_lora_then_fuse_gives_a_model_load_reads(runner, tiny, tmp_path):
    adapters = tmp_path / "adapters"
    result = runner.invoke(cli, ["lora", "--model", str(tiny), "--data", str(EXAMPLE / "data"),
                                 "--iters", "5", "--batch-size", "2", "--rank", "4",
                                 "--lr", "1e-3", "--steps-per-report", "2", "--save-every", "4",
                                 "--adapter-path", str(adapters), "--test"])
    assert result.exit_code == 0, result.output
    for text in ("Trainable parameters: ", "Step 2/5 ", "val loss", "Test loss",
                 "saved adapters to"):
        assert text in result.stdout, text
    assert {"adapters.safetensors", "adapter_config.json", "training_state.safetensors",
            "0000004_adapters.safetensors"} <= {p.name for p in adapters.iterdir()}

    fused = tmp_path / "fused"
    result = runner.invoke(cli, ["fuse", "--model", str(tiny), "--adapter-path", str(adapters),
                                 "--save-path", str(fused)])
    assert result.exit_code == 0, result.output
    model, _ = load(fused)
    with_adapter, _ = load(tiny)
    load_adapter(with_adapter, adapters)
    expected = with_adapter(IDS)
    assert mx.abs(model(IDS) - expected).max().item() <= 1e-5 * mx.abs(expected).max().item()

    again = runner.invoke(cli, ["fuse", "--model", str(tiny), "--adapter-path", str(adapters),
                                "--save-path", str(fused)])
    assert again.exit_code == 1 and "--force" in again.stderr

    # The adapter applied unfused: through load() and through `generate --adapter-path`.
    unfused, tokenizer = load(tiny, adapter_path=adapters)
    assert mx.abs(unfused(IDS) - expected).max().item() <= 1e-5 * mx.abs(expected).max().item()
    args = ["--prompt", "hi", "--max-tokens", "6", "--temp", "0", "--repetition-penalty", "1"]
    via_adapter = runner.invoke(cli, ["generate", "-m", str(tiny), "--adapter-path",
                                      str(adapters), *args])
    via_fused = runner.invoke(cli, ["generate", "-m", str(fused), *args])
    assert via_adapter.exit_code == 0, via_adapter.output
    assert via_adapter.stdout == via_fused.stdout
    missing = runner.invoke(cli, ["generate", "-m", str(tiny), "--adapter-path",
                                  str(tmp_path / "nope"), *args])
    assert missing.exit_code == 1 and "nope" in missing.stderr


def test_qlora_on_a_converted_4bit_model_fuses_to_a_4bit_model(runner, tiny, tmp_path):
    """`convert -q` -> `lora` on the 4-bit model -> `fuse` (re-quantized) -> `load`. The
    re-quantized result is within the base's own quantization error of the adapter model;
    `fuse --dequantize` is exact to float32 rounding."""
    from qwen2_mlx.convert import convert

    q4 = tmp_path / "q4"
    convert(tiny, q4, quantize=True, q_bits=4, q_group_size=32, log=None)
    adapters = tmp_path / "adapters"
    result = runner.invoke(cli, ["lora", "-m", str(q4), "--data", str(EXAMPLE / "data"),
                                 "--iters", "3", "--batch-size", "2", "--lr", "1e-2",
                                 "--adapter-path", str(adapters)])
    assert result.exit_code == 0, result.output
    adapted, _ = load(q4)
    load_adapter(adapted, adapters)
    expected = adapted(IDS)
    quantization_error = mx.abs(load(q4)[0](IDS) - load(tiny)[0](IDS)).max().item()
    for flags, tolerance in (([], quantization_error),
                             (["--dequantize"], 1e-5 * mx.abs(expected).max().item())):
        out = tmp_path / f"fused{len(flags)}"
        result = runner.invoke(cli, ["fuse", "-m", str(q4), "--adapter-path", str(adapters),
                                     "--save-path", str(out), *flags])
        assert result.exit_code == 0, result.output
        fused, _ = load(out)
        assert ("quantization" in (out / "config.json").read_text()) == (not flags)
        assert mx.abs(fused(IDS) - expected).max().item() <= tolerance, flags


def test_lora_errors_are_one_line(runner, tiny, tmp_path):
    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"oops": 1}\n')
    result = runner.invoke(cli, ["lora", "-m", str(tiny), "--data", str(bad), "--iters", "1"])
    assert result.exit_code == 1
    assert "train.jsonl:2: no 'messages'" in result.stderr
    result = runner.invoke(cli, ["lora", "-m", str(tiny), "--data", str(EXAMPLE / "data"),
                                 "--targets", "qproj"])
    assert result.exit_code == 1 and "'qproj' match no layer" in result.stderr


def test_bundled_example_runs(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train_lora.py", "--model", str(tiny), "--iters", "3",
                                      "--adapter-path", str(tmp_path / "a"),
                                      "--fuse", str(tmp_path / "fused")])
    runpy.run_path(str(EXAMPLE / "train_lora.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "test loss: base" in out and "fused model written to" in out
