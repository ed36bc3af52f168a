"""The parity cases: Qwen2-shaped random checkpoints rebuilt bit-for-bit from a seed.

Shared by `make_goldens.py` (PyTorch, on CUDA or the CPU) and `tests/test_cuda_parity.py`
(qwen2-mlx), so both sides read the same weights without carrying them. Imports only
numpy and torch: the GPU machine has no MLX.

Weights. Every tensor is drawn from its own `torch.Generator`, seeded from (case seed,
tensor name), as integers: `value = (centre + randint(-k, k + 1)) * 2**-e`, with every
integer at most 256 in magnitude. Such values are exact in bfloat16 (8 significant bits), so
the checkpoint is stored in bfloat16 and loading it in float32 changes nothing: the bf16 and
fp32 runs use identical weights, and PyTorch's bf16-vs-fp32 difference is compute rounding
only. Integer draws involve no floating-point arithmetic in the generator, so the bytes are
the same on any CPU; the SHA-256 of the written file is recorded in each golden and checked
when a test rebuilds it. Scales: linear weights 1/sqrt(fan_in), so activations keep unit
scale through the blocks (the o/down projections 4x that, see RESIDUAL_GAIN); norms 1 +- 0.25;
biases 0.25; the output embedding sized for logits with a standard deviation of about 4.

Logit summaries (`summarize`): for a row of V logits, the top-64 ids and values, the log-sum-
exp, the standard deviation, and a 16-number random projection ("sketch") of the whole row.
A hash of the row could only test bit-equality, which no two backends give; the sketch
instead measures the full row's error: with R a fixed +-1 matrix, (R e) / sqrt(V) has
components of mean square mean(e**2), so `sketch_rms_error` estimates the rms error over all
V logits from 16 numbers per position.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

TOP_K = 64  # logits kept per selected position
SKETCH_SIZE = 16  # random projections of the whole row per selected position
N_POSITIONS = 4  # the last prompt positions whose logits are compared
N_GREEDY = 16  # greedy tokens generated after the prompt
LOGIT_STD = 4.0  # target standard deviation of the logits
# Blocks write to the residual stream at 4x unit scale: with unit scale the (tied) input
# embedding dominates the stream and greedy decoding repeats one token from the first step
# (measured: 1 distinct token in 16 for the sliding-window case, 6 and 14 with gain 4 for
# Qwen2-0.5B and the YaRN case), which would leave the KV-cache path barely tested.
RESIDUAL_GAIN = 4.0
FIRST_SPECIAL_ID = 151_643  # Qwen2's <|endoftext|>; prompts use ordinary tokens only


@dataclass(frozen=True)
class Case:
    """One checkpoint: a Hugging Face config, a seed and a prompt length."""

    name: str
    config: dict
    seed: int
    prompt_length: int = 8
    big: bool = False  # needs more than a minute on the 2-core CI machine: marked `big`
    about: str = ""
    reductions: list[str] = field(default_factory=list)


def _dense(hidden, intermediate, layers, heads, kv_heads, vocab, tie, max_pos, **extra) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "tie_word_embeddings": tie, "max_position_embeddings": max_pos,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
        "attention_dropout": 0.0, "initializer_range": 0.02,
        "use_sliding_window": False, "sliding_window": max_pos, "max_window_layers": layers,
        "bos_token_id": FIRST_SPECIAL_ID, "eos_token_id": FIRST_SPECIAL_ID,
        "use_cache": True, "torch_dtype": "bfloat16", **extra,
    }


_MOE = _dense(3584, 18944, 2, 28, 4, 151936, False, 131072)
_MOE.update({
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
    "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False,
    "moe_intermediate_size": 2560 // 8, "shared_expert_intermediate_size": 20480 // 8,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 0.001,
    "output_router_logits": False,
})

CASES: dict[str, Case] = {c.name: c for c in [
    Case("qwen2-0.5b", _dense(896, 4864, 24, 14, 2, 151936, True, 32768), seed=500,
         about="Qwen2-0.5B, all 24 layers (GQA 7:1, head_dim 64, tied)"),
    Case("qwen2-1.5b", _dense(1536, 8960, 28, 12, 2, 151936, True, 32768), seed=1500,
         big=True, about="Qwen2-1.5B, all 28 layers (GQA 6:1, head_dim 128, tied)"),
    Case("qwen2-7b-2l", _dense(3584, 18944, 2, 28, 4, 152064, False, 131072), seed=7000,
         big=True, about="Qwen2-7B widths, 2 of 28 layers (GQA 7:1, head_dim 128, untied)",
         reductions=["2 of 28 layers"]),
    Case("qwen2-72b-2l", _dense(8192, 29568, 2, 64, 8, 152064, False, 131072), seed=72000,
         big=True, about="Qwen2-72B widths, 2 of 80 layers (GQA 8:1, head_dim 128, untied)",
         reductions=["2 of 80 layers"]),
    Case("qwen2-57b-a14b-2l", _MOE, seed=57014,
         about="Qwen2-57B-A14B's MoE layout: 64 experts, top-8, shared expert, "
               "norm_topk_prob false, at width 3584 with 28/4 heads, 2 of 28 layers",
         reductions=["2 of 28 layers",
                     "expert width 2560 -> 320 and shared-expert width 20480 -> 2560 (1/8): "
                     "the real widths hold 3.5 G expert weights in 2 layers (14 GB in float32), "
                     "more than the CI machine's memory allows next to the float32 copy"]),
    Case("sliding-window",
         _dense(896, 4864, 4, 14, 2, 151936, True, 32768, use_sliding_window=True,
                sliding_window=6, max_window_layers=2),
         seed=4096, prompt_length=12,
         about="Qwen2-0.5B widths, 4 layers; layers 2-3 attend over a window of 6 "
               "(prompt 12 + 16 generated tokens run past it)",
         reductions=["4 of 24 layers", "window 6 instead of 32768, so a short prompt slides"]),
    Case("yarn",
         _dense(1536, 8960, 2, 12, 2, 151936, True, 131072,
                rope_scaling={"type": "yarn", "rope_type": "yarn", "factor": 4.0,
                              "original_max_position_embeddings": 32768}),
         seed=32768,
         about="Qwen2-1.5B widths, 2 layers, YaRN factor 4 over 32768 positions (as Qwen2 "
               "and Qwen2.5 recommend for 128K context): scaled frequencies and attention",
         reductions=["2 of 28 layers"]),
]}


# ------------------------------------------------------------------------------ weights


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face tensor names and shapes of a Qwen2 / Qwen2-MoE config, in a fixed order."""
    d, v = config["hidden_size"], config["vocab_size"]
    hd = d // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = [("model.embed_tokens.weight", (v, d))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (d,)),
            (p + "self_attn.q_proj.weight", (q, d)), (p + "self_attn.q_proj.bias", (q,)),
            (p + "self_attn.k_proj.weight", (kv, d)), (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.o_proj.weight", (d, q)),
            (p + "post_attention_layernorm.weight", (d,)),
        ]
        if config["model_type"] == "qwen2_moe":
            shapes += _moe_shapes(p + "mlp.", config)
        else:
            shapes += _mlp_shapes(p + "mlp.", d, config["intermediate_size"])
    shapes.append(("model.norm.weight", (d,)))
    if not config["tie_word_embeddings"]:
        shapes.append(("lm_head.weight", (v, d)))
    return shapes


def _mlp_shapes(prefix: str, d: int, width: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(prefix + "gate_proj.weight", (width, d)), (prefix + "up_proj.weight", (width, d)),
            (prefix + "down_proj.weight", (d, width))]


def _moe_shapes(prefix: str, config: dict) -> list[tuple[str, tuple[int, ...]]]:
    d = config["hidden_size"]
    shapes = [(prefix + "gate.weight", (config["num_experts"], d))]
    for e in range(config["num_experts"]):
        shapes += _mlp_shapes(f"{prefix}experts.{e}.", d, config["moe_intermediate_size"])
    shapes += _mlp_shapes(prefix + "shared_expert.", d, config["shared_expert_intermediate_size"])
    shapes.append((prefix + "shared_expert_gate.weight", (1, d)))
    return shapes


def _init_scale(name: str, shape: tuple[int, ...], config: dict) -> tuple[float, float]:
    """(centre, standard deviation) of a tensor's uniform draw."""
    if "norm" in name:
        return 1.0, 0.25 / math.sqrt(3)  # uniform on 1 +- 0.25
    if name.endswith("bias"):
        return 0.0, 0.25
    output_embedding = name == "lm_head.weight" or (
        name == "model.embed_tokens.weight" and config["tie_word_embeddings"])
    if output_embedding:
        return 0.0, LOGIT_STD / math.sqrt(shape[1])  # final norm output has unit rms
    if name == "model.embed_tokens.weight":
        return 0.0, 1.0
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return 0.0, RESIDUAL_GAIN / math.sqrt(shape[1])
    return 0.0, 1.0 / math.sqrt(shape[1])  # (out, in): keep unit-scale activations


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def draw_tensor(seed: int, name: str, shape: tuple[int, ...], config: dict) -> torch.Tensor:
    """One tensor, bfloat16, exactly representable (see the module docstring)."""
    centre, std = _init_scale(name, shape, config)
    # Largest exponent e with half-width k = std * sqrt(3) * 2**e at most 128 and every
    # integer centre +- k at most 256 in magnitude (exact in bfloat16).
    half = std * math.sqrt(3)
    e = math.floor(math.log2(min(128 / half, 256 / (abs(centre) + half))))
    k = round(half * 2**e)
    c = round(centre * 2**e)
    assert c == centre * 2**e and abs(c) + k <= 256, (name, centre, std)
    g = torch.Generator().manual_seed(_tensor_seed(seed, name))
    ints = torch.randint(-k, k + 1, shape, generator=g, dtype=torch.int16)
    if c:
        ints += c
    return ints.to(torch.bfloat16).mul_(2.0**-e)  # exact: small integers times a power of 2


def iter_tensors(case: Case) -> Iterator[tuple[str, torch.Tensor]]:
    for name, shape in tensor_shapes(case.config):
        yield name, draw_tensor(case.seed, name, shape, case.config)


def parameter_count(case: Case) -> int:
    return sum(math.prod(s) for _, s in tensor_shapes(case.config))


def build_checkpoint(
    case: Case, out_dir: Path, progress: Callable[[str], None] | None = None
) -> str:
    """Write config.json and model.safetensors for `case`; return the file's SHA-256.

    The safetensors file is written tensor by tensor (its header is known from the shapes),
    so memory peaks at one tensor, not the whole model.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(case.config, indent=2) + "\n")
    shapes = tensor_shapes(case.config)
    header, offset = {}, 0
    for name, shape in shapes:
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    digest = hashlib.sha256()
    tmp = out_dir / "model.safetensors.partial"
    with open(tmp, "wb") as f:
        for chunk in (struct.pack("<Q", len(text)), text):
            f.write(chunk)
            digest.update(chunk)
        total, done = offset, 0
        for name, tensor in iter_tensors(case):
            data = tensor.view(torch.int16).numpy().data  # little-endian bf16 bits, no copy
            f.write(data)
            digest.update(data)
            done += 2 * tensor.numel()
            if progress and (done == total or tensor.numel() > 50_000_000):
                progress(f"  weights {done / 2**30:.1f}/{total / 2**30:.1f} GiB ({name})")
    os.replace(tmp, out_dir / "model.safetensors")
    return digest.hexdigest()


def prompt_ids(case: Case) -> list[int]:
    g = torch.Generator().manual_seed(_tensor_seed(case.seed, "prompt"))
    high = min(FIRST_SPECIAL_ID, case.config["vocab_size"])
    return torch.randint(0, high, (case.prompt_length,), generator=g).tolist()


def selected_positions(case: Case) -> list[int]:
    return list(range(case.prompt_length - N_POSITIONS, case.prompt_length))


# ---------------------------------------------------------------------- logit summaries


def sketch_matrix(vocab_size: int) -> np.ndarray:
    """(SKETCH_SIZE, vocab) of +-1, the same for every case with this vocabulary."""
    g = torch.Generator().manual_seed(_tensor_seed(vocab_size, "sketch"))
    bits = torch.randint(0, 2, (SKETCH_SIZE, vocab_size), generator=g, dtype=torch.int8)
    return bits.numpy().astype(np.float64) * 2 - 1


def sketch(row: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return matrix @ np.asarray(row, np.float64) / math.sqrt(row.shape[-1])


def logsumexp(row: np.ndarray) -> float:
    row = np.asarray(row, np.float64)
    m = row.max()
    return float(m + np.log(np.exp(row - m).sum()))


def summarize(row: np.ndarray, matrix: np.ndarray) -> dict:
    """Top-k ids and values, sketch, log-sum-exp and std of one row of logits."""
    row = np.asarray(row, np.float64)
    ids = np.argsort(-row, kind="stable")[:TOP_K]
    return {"top_ids": ids.tolist(), "top_values": row[ids].tolist(),
            "sketch": sketch(row, matrix).tolist(), "logsumexp": logsumexp(row),
            "std": float(row.std())}


def margin(row: np.ndarray) -> float:
    """Gap between the two largest logits: how firmly greedy decoding picked its token."""
    top2 = np.sort(np.asarray(row, np.float64))[-2:]
    return float(top2[1] - top2[0])


def sketch_rms_error(a: list, b: list) -> float:
    """Estimated rms difference of two full rows (or lists of rows) from their sketches."""
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def available_memory() -> int | None:
    """Bytes of memory available now (Linux's MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def golden_path(directory: Path, case: str, device: str) -> Path:
    return Path(directory) / f"{case}.{device}.json"
