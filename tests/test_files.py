"""Outputs get the permissions of the user's umask (e.g. 0755 / 0644 under umask 022), not the
0700 / 0600 of mkdtemp and mkstemp: converted and fused models, adapters, prompt caches."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import mlx.core as mx
import pytest

from qwen2_mlx import load, save_cache
from qwen2_mlx.convert import convert, save_model
from qwen2_mlx.lora import LoRAConfig, apply_lora, fuse_adapters, save_adapter


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of `root` and of everything under it, by relative name."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return found


def assert_default_modes(root: Path) -> None:
    for name, mode in modes(root).items():
        expected = 0o755 if (root / name).is_dir() else 0o644
        assert mode == expected, f"{name}: {oct(mode)} != {oct(expected)}"


def test_converted_and_fused_models_follow_the_umask(tiny_checkpoint, tmp_path, umask_022):
    convert(tiny_checkpoint, tmp_path / "converted", quantize=True, q_group_size=32, log=None)
    assert_default_modes(tmp_path / "converted")
    model, tokenizer = load(tiny_checkpoint)
    apply_lora(model, LoRAConfig(rank=4))
    fuse_adapters(model)
    save_model(model, tmp_path / "fused", {"model_type": "qwen2"}, tokenizer)
    assert_default_modes(tmp_path / "fused")


def test_adapters_and_caches_follow_the_umask(tiny_checkpoint, tmp_path, umask_022):
    model, _ = load(tiny_checkpoint)
    apply_lora(model, LoRAConfig(rank=4))
    save_adapter(model, tmp_path / "adapters", LoRAConfig(rank=4))
    assert_default_modes(tmp_path / "adapters")
    cache = model.make_cache()
    model(mx.array([[1, 2, 3]]), cache=cache)
    (tmp_path / "caches").mkdir()
    save_cache(tmp_path / "caches" / "prompt.cache", cache)
    assert_default_modes(tmp_path / "caches")
