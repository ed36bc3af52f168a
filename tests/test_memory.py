"""wired_limit: a no-op that says so on the CPU backend; on Metal (simulated here: the three MLX
calls it makes are replaced by recorders) it wires the model's bytes, capped at the recommended
working set, warns near it, and restores the previous limit once the last block ends."""

from __future__ import annotations

import warnings

import mlx.core as mx
import pytest

from qwen2_mlx import wired_limit
from qwen2_mlx.memory import model_bytes

GB = 2**30


class FakeMetal:
    def __init__(self, monkeypatch, recommended: int, before: int = 123):
        self.limit, self.calls = before, []
        monkeypatch.setattr("qwen2_mlx.memory._metal", lambda: True)
        monkeypatch.setattr(mx, "device_info",
                            lambda: {"max_recommended_working_set_size": recommended})
        monkeypatch.setattr(mx, "set_wired_limit", self.set)
        monkeypatch.setattr(mx, "synchronize", lambda *a: None)

    def set(self, limit: int) -> int:
        previous, self.limit = self.limit, limit
        self.calls.append(limit)
        return previous


def test_cpu_backend_is_a_no_op_that_says_so(tiny_vocab_model, monkeypatch):
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: pytest.fail("set on CPU"))
    lines = []
    with wired_limit(tiny_vocab_model, log=lines.append) as info:
        assert not info.active
    assert lines == ["Wired memory: not used on the CPU backend (no-op)"]


def test_model_bytes_counts_every_weight(tiny_vocab_model):
    # 151,936 x 32 embedding (tied) + one layer; float32.
    layer = (32 * 32 + 32) + 2 * (32 * 16 + 16) + 32 * 32 + 3 * 32 * 64 + 2 * 32
    assert model_bytes(tiny_vocab_model) == 4 * (151936 * 32 + layer + 32)


def test_metal_wires_the_model_and_restores(tiny_vocab_model, monkeypatch):
    metal = FakeMetal(monkeypatch, recommended=8 * GB)
    weights = model_bytes(tiny_vocab_model)
    lines = []
    with wired_limit(tiny_vocab_model, extra_bytes=1000, log=lines.append) as info:
        assert info.active and info.limit == weights + 1000 == metal.limit
    assert metal.limit == 123  # restored
    assert lines[0].startswith("Wired memory limit: ")


def test_the_limit_is_capped_at_the_recommended_set_and_warns(tiny_vocab_model, monkeypatch):
    weights = model_bytes(tiny_vocab_model)
    metal = FakeMetal(monkeypatch, recommended=int(weights / 0.95))
    with pytest.warns(RuntimeWarning, match="recommended working set"):
        with wired_limit(tiny_vocab_model, extra_bytes=10 * GB):
            assert metal.limit == int(weights / 0.95)
    metal = FakeMetal(monkeypatch, recommended=weights * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with wired_limit(tiny_vocab_model):
            pass


def test_nested_blocks_restore_once_and_survive_errors(tiny_vocab_model, monkeypatch):
    metal = FakeMetal(monkeypatch, recommended=100 * GB)
    weights = model_bytes(tiny_vocab_model)
    with pytest.raises(KeyError):
        with wired_limit(tiny_vocab_model):
            with wired_limit(tiny_vocab_model, extra_bytes=GB):
                assert metal.limit == weights + GB
            assert metal.limit == weights
            raise KeyError("boom")
    assert metal.limit == 123
    assert metal.calls == [weights, weights + GB, weights, 123]
