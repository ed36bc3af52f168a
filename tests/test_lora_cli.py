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


# --- adapter directories: never silently replaced, checked before the first step ----------

DPO_DATA = Path(__file__).resolve().parents[1] / "examples" / "dpo" / "data"
QUICK = ["--iters", "2", "--batch-size", "2", "--rank", "4", "--save-every", "1"]


@pytest.mark.parametrize("command,data", [("lora", EXAMPLE / "data"), ("dpo", DPO_DATA)])
def test_retraining_into_an_adapter_directory_needs_overwrite(runner, tiny, tmp_path, command,
                                                              data):
    adapters = tmp_path / "ad1"
    args = [command, "-m", str(tiny), "--data", str(data), *QUICK, "--adapter-path",
            str(adapters)]
    assert runner.invoke(cli, args).exit_code == 0
    before = (adapters / "adapters.safetensors").read_bytes()
    assert (adapters / "0000001_adapters.safetensors").is_file()

    again = runner.invoke(cli, [*args, "--rank", "8"])
    assert again.exit_code == 1
    assert f"the adapter directory {adapters} already holds" in again.stderr
    assert "--resume-adapter-file" in again.stderr and "--overwrite" in again.stderr
    assert "Trainable parameters" not in again.stdout  # refused before any work
    assert (adapters / "adapters.safetensors").read_bytes() == before

    (adapters / "notes.txt").write_text("mine")
    replaced = runner.invoke(cli, [*args, "--rank", "8", "--overwrite", "--save-every", "5"])
    assert replaced.exit_code == 0, replaced.output
    names = {p.name for p in adapters.iterdir()}
    assert "0000001_adapters.safetensors" not in names  # the old run's checkpoints went
    assert (adapters / "notes.txt").read_text() == "mine"  # other files stay
    assert (adapters / "adapters.safetensors").read_bytes() != before


@pytest.mark.parametrize("command,data", [("lora", EXAMPLE / "data"), ("dpo", DPO_DATA)])
@pytest.mark.parametrize("where", ["is a file", "under a file"])
def test_bad_adapter_path_fails_before_training(runner, tiny, tmp_path, command, data, where):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    path = blocker if where == "is a file" else blocker / "adapters"
    result = runner.invoke(cli, [command, "-m", str(tiny), "--data", str(data), *QUICK,
                                 "--adapter-path", str(path)])
    assert result.exit_code == 1
    assert "Trainable parameters" not in result.stdout and "Step 1" not in result.stdout
    assert "is a file" in result.stderr
    assert blocker.read_text() == "x"


def test_lora_with_zero_iterations_and_no_test_says_it_did_nothing(runner, tiny, tmp_path):
    result = runner.invoke(cli, ["lora", "-m", str(tiny), "--data", str(EXAMPLE / "data"),
                                 "--iters", "0", "--adapter-path", str(tmp_path / "a")])
    assert result.exit_code == 0
    assert "Nothing to do: --iters 0 trains nothing; add --test" in result.stdout
    assert not (tmp_path / "a").exists()


def test_fuse_never_replaces_the_base_model(runner, tiny, tmp_path):
    import shutil

    base = Path(shutil.copytree(tiny, tmp_path / "base"))
    adapters = tmp_path / "adapters"
    assert runner.invoke(cli, ["lora", "-m", str(base), "--data", str(EXAMPLE / "data"),
                               *QUICK, "--adapter-path", str(adapters)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    for target in (base, tmp_path):
        result = runner.invoke(cli, ["fuse", "-m", str(base), "--adapter-path", str(adapters),
                                     "--save-path", str(target), "--force"])
        assert result.exit_code == 1
        assert f"would overwrite the base model {base}" in result.stderr
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before


def test_qlora_that_cannot_quantize_says_so(runner, checkpoint_factory, tmp_path):
    """--q-bits on a model no layer of which can be quantized: an error, not a float run;
    partly quantizable: one warning line, then training."""
    nothing = checkpoint_factory(hidden_size=96, intermediate_size=96, num_heads=4)
    result = runner.invoke(cli, ["lora", "-m", str(nothing), "--data", str(EXAMPLE / "data"),
                                 *QUICK, "--q-bits", "4", "--adapter-path", str(tmp_path / "a")])
    assert result.exit_code == 1
    assert "nothing can be quantized with group size 64" in result.stderr
    assert "Trainable parameters" not in result.stdout
    partly = checkpoint_factory(hidden_size=64, intermediate_size=96)
    result = runner.invoke(cli, ["lora", "-m", str(partly), "--data", str(EXAMPLE / "data"),
                                 *QUICK, "--q-bits", "4", "--adapter-path", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert result.stderr.count("stay in float") == 1
    assert "Warning: 2 of 15 quantizable layers stay in float" in result.stderr


def test_an_adapter_for_another_base_says_it_does_not_fit(runner, checkpoint_factory, tmp_path):
    """Trained on a 3-layer model, applied to a 2-layer one (and the other way round): one
    line saying the adapter does not fit, naming the base it was trained on; the model that
    load_adapter was given is left as it was."""
    from qwen2_mlx.lora import lora_layers

    two, three = checkpoint_factory(), checkpoint_factory(num_layers=3)
    for base, other, name in ((three, two, "a3"), (two, three, "a2")):
        adapters = tmp_path / name
        assert runner.invoke(cli, ["lora", "-m", str(base), "--data", str(EXAMPLE / "data"),
                                   *QUICK, "--adapter-path", str(adapters)]).exit_code == 0
        result = runner.invoke(cli, ["generate", "-m", str(other), "--adapter-path",
                                     str(adapters), "-p", "hi"])
        assert result.exit_code == 1
        assert "does not fit this model" in result.stderr
        assert f"it was trained on {base}" in result.stderr
        assert result.stderr.strip().count("\n") == 0
        model, _ = load(other)
        with pytest.raises(ValueError, match="does not fit this model"):
            load_adapter(model, adapters)
        assert not lora_layers(model)
