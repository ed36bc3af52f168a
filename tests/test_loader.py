"""Loading checkpoints: layouts, dtypes and every promised error."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np
import pytest

from qwen2_mlx import load
from qwen2_mlx.loader import ModelNotFoundError, load_model, resolve_model_path

from conftest import load_torch_model


def test_load_returns_model_and_tokenizer(tiny_checkpoint):
    model, tokenizer = load(tiny_checkpoint)
    assert model.config.hidden_size == 64
    assert tokenizer.eos_token_ids  # from the checkpoint's generation/tokenizer configs
    logits = model(mx.array([tokenizer.encode("hello world")]))
    assert logits.shape[-1] == model.config.vocab_size


def test_sharded_checkpoint_loads_like_single_file(tmp_path, tiny_checkpoint):
    import torch

    ref = load_torch_model(tiny_checkpoint)
    ref.save_pretrained(tmp_path, max_shard_size="60KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    ids = np.arange(12)[None]
    sharded = np.array(load_model(tmp_path)(mx.array(ids)))
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits.numpy()
    assert np.abs(sharded - expected).max() <= 1e-4 * np.abs(expected).max()


def test_bfloat16_stays_bfloat16_unless_dtype_given(checkpoint_factory):
    path = checkpoint_factory(dtype="bfloat16")
    assert load_model(path).model.norm.weight.dtype == mx.bfloat16
    assert load_model(path, dtype="float32").model.norm.weight.dtype == mx.float32
    assert load_model(path, dtype=mx.float16).model.norm.weight.dtype == mx.float16


def test_bad_dtype(tiny_checkpoint):
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model(tiny_checkpoint, dtype="int8")


def test_missing_directory():
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_path("./no/such/model/dir")


def test_missing_config(tiny_checkpoint_copy):
    (tiny_checkpoint_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tiny_checkpoint_copy)


def test_missing_weights(tiny_checkpoint_copy):
    (tiny_checkpoint_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
        load_model(tiny_checkpoint_copy)


def test_missing_shard_is_named(tmp_path, tiny_checkpoint):
    load_torch_model(tiny_checkpoint).save_pretrained(tmp_path, max_shard_size="60KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_model(tmp_path)


def test_truncated_weights_file_is_named(tiny_checkpoint_copy):
    file = tiny_checkpoint_copy / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupt"):
        load_model(tiny_checkpoint_copy)


def _rewrite_weights(path, edit):
    weights = dict(mx.load(str(path / "model.safetensors")))
    edit(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights)


def test_missing_tensor_is_named(tiny_checkpoint_copy):
    _rewrite_weights(tiny_checkpoint_copy,
                     lambda w: w.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match="missing tensors: model.layers.1.self_attn.k_proj.bias"):
        load_model(tiny_checkpoint_copy)


def test_unexpected_tensor_is_named(tiny_checkpoint_copy):
    _rewrite_weights(tiny_checkpoint_copy,
                     lambda w: w.__setitem__("model.layers.0.extra.weight", mx.zeros((2,))))
    with pytest.raises(ValueError, match="unexpected tensors: model.layers.0.extra.weight"):
        load_model(tiny_checkpoint_copy)


def test_wrong_shape_is_named(tiny_checkpoint_copy):
    _rewrite_weights(tiny_checkpoint_copy,
                     lambda w: w.__setitem__("model.norm.weight", mx.ones((63,))))
    with pytest.raises(ValueError, match=r"model.norm.weight: checkpoint \(63,\), model \(64,\)"):
        load_model(tiny_checkpoint_copy)


def test_config_of_unknown_shape(tiny_checkpoint_copy):
    file = tiny_checkpoint_copy / "config.json"
    config = json.loads(file.read_text())
    config["num_key_value_heads"] = 3
    file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="must divide num_attention_heads"):
        load_model(tiny_checkpoint_copy)


def test_malformed_config(tiny_checkpoint_copy):
    (tiny_checkpoint_copy / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_model(tiny_checkpoint_copy)


def test_unreachable_hub_gives_clear_error(tmp_path, monkeypatch):
    # A closed port on loopback stands in for a machine without network.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "2")
    with pytest.raises(ModelNotFoundError, match="local directory"):
        resolve_model_path("Qwen/Qwen2-0.5B-Instruct")


@pytest.mark.parametrize("edit,message", [
    ({"hidden_size": "96"}, "config field hidden_size must be an integer, got '96' (str)"),
    ({"rms_norm_eps": None}, "config field rms_norm_eps must be a number, got null"),
    ({"tie_word_embeddings": "yes"}, "config field tie_word_embeddings must be true or false"),
    ({"eos_token_id": "x"}, "config field eos_token_id must be an integer, a list of integers"),
    ({"rope_scaling": [1]}, "config field rope_scaling must be an object or null"),
])
def test_config_fields_of_the_wrong_type_are_named(tiny_checkpoint_copy, edit, message):
    from click.testing import CliRunner

    from qwen2_mlx.cli.main import cli

    file = tiny_checkpoint_copy / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **edit}))
    with pytest.raises(ValueError, match=re.escape(message)):
        load(tiny_checkpoint_copy)
    result = CliRunner().invoke(cli, ["generate", "-m", str(tiny_checkpoint_copy), "-p", "hi"])
    assert result.exit_code == 1 and message in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_config_that_is_not_an_object(tiny_checkpoint_copy):
    (tiny_checkpoint_copy / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json must hold a JSON object, got a JSON list"):
        load(tiny_checkpoint_copy)


def test_model_that_is_a_file_says_so(tiny_checkpoint):
    with pytest.raises(FileNotFoundError, match="is a file, not a model: give the directory"):
        load(tiny_checkpoint / "model.safetensors")


def test_loader_and_converter_read_the_same_weight_files(tiny_checkpoint_copy, tmp_path):
    """One rule: the index when there is one, else every *.safetensors (the converter
    accepted "weights.safetensors" that the loader then could not find)."""
    from qwen2_mlx.convert import convert

    (tiny_checkpoint_copy / "model.safetensors").rename(tiny_checkpoint_copy /
                                                        "weights.safetensors")
    model, _ = load(tiny_checkpoint_copy)
    convert(tiny_checkpoint_copy, tmp_path / "out", log=None)
    converted, _ = load(tmp_path / "out")
    ids = mx.array([[1, 2, 3]])
    np.testing.assert_array_equal(np.array(model(ids)), np.array(converted(ids)))
