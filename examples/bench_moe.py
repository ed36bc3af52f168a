"""Benchmark the Qwen2-MoE path: qwen2-mlx against mlx-lm's qwen2_moe on one checkpoint.

A random checkpoint with a scaled-down Qwen2-57B-A14B shape (hidden 1024, 8 layers, 64 experts
top-8, expert width 256, shared expert 2048, vocab 151936) is written in Hugging Face layout
(per-expert tensors, as on the Hub); both engines load that same directory, run the same
prompt ids with greedy decoding on the same backend, and the script prints prefill and decode
tokens/s and the qwen2-mlx / mlx-lm ratios.

    python examples/bench_moe.py                          # float16, float32 and q4
    python examples/bench_moe.py --precisions float16 --prompt-tokens 128 --gen-tokens 32

Notes on the CPU backend (mlx 0.32.4):
- `mx.gather_mm` only supports float32 there, so for "float16" both engines run the experts
  in float32: qwen2-mlx casts the stacked expert weights once at load
  (`moe.cast_experts_for_backend`); mlx-lm cannot run float16 experts at all, so its
  `switch_mlp` weights are set to float32 (the smallest change that makes it run).
- q4 is converted with `qwen2_mlx.convert` (router and shared-expert gate kept in float by
  `moe_quant_predicate`); mlx-lm is measured as it loads that directory and also with its
  float tensors cast to float32 (CPU quantized matmuls are ~9x faster with float32
  activations, which is what qwen2-mlx's loader does on CPU).
- "qwen2-mlx unsorted" is qwen2-mlx with the sort-by-expert step switched off, to measure
  what sorting buys in prefill.
mlx-lm is optional (`--no-mlx-lm`); it is a comparison only, never a dependency.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

import qwen2_mlx.moe as moe
from qwen2_mlx.config import ModelConfig
from qwen2_mlx.generate import generate_step
from qwen2_mlx.loader import load_model
from qwen2_mlx.model import Model
from qwen2_mlx.sampling import SamplingParams

SMALL_MOE = dict(
    model_type="qwen2_moe", hidden_size=1024, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=2, intermediate_size=2816, num_experts=64, num_experts_per_tok=8,
    moe_intermediate_size=256, shared_expert_intermediate_size=2048, vocab_size=151936,
    norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
    rope_theta=1_000_000.0, tie_word_embeddings=False, max_position_embeddings=32768,
)

Engine = Callable[[mx.array, int], Iterator]


def write_moe_checkpoint(out_dir: Path, dtype: str) -> Path:
    """Random weights with SMALL_MOE's shapes, saved with per-expert names like a Hub repo."""
    mx.random.seed(0)
    model = Model(ModelConfig(**SMALL_MOE))
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        value = (value * 0.5).astype(getattr(mx, dtype))
        if ".switch_mlp." in name:
            prefix, proj = name.split(".switch_mlp.")
            proj = proj.removesuffix(".weight")
            for e in range(value.shape[0]):
                weights[f"{prefix}.experts.{e}.{proj}.weight"] = value[e]
        else:
            weights[name] = value
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "pt"})
    config = {**SMALL_MOE, "architectures": ["Qwen2MoeForCausalLM"], "torch_dtype": dtype}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def time_engine(engine: Engine, prompt: mx.array, gen_tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) for one run of a generate_step-like iterator."""
    tic = time.perf_counter()
    n = 0
    for n, _ in enumerate(engine(prompt, gen_tokens), start=1):
        if n == 1:
            prefill = time.perf_counter() - tic
            tic = time.perf_counter()
    decode = time.perf_counter() - tic
    return prompt.size / prefill, (n - 1) / max(decode, 1e-9)


def ours(model, prefill_step_size: int, sort: bool = True) -> Engine:
    def run(prompt, n):
        saved = moe.SORT_MIN_PAIRS
        moe.SORT_MIN_PAIRS = saved if sort else 1 << 62
        try:
            yield from generate_step(prompt, model, sampling=SamplingParams(), max_tokens=n,
                                     prefill_step_size=prefill_step_size)
        finally:
            moe.SORT_MIN_PAIRS = saved
    return run


def mlx_lm_engine(path: Path, dtype: str | None, prefill_step_size: int,
                  float32_experts: bool) -> Engine:
    from mlx_lm.generate import generate_step as lm_generate_step
    from mlx_lm.utils import load_model as lm_load_model

    model, _ = lm_load_model(path)
    if dtype is not None:
        model.set_dtype(getattr(mx, dtype))
    if float32_experts:
        for layer in model.layers:
            layer.mlp.switch_mlp.set_dtype(mx.float32)
    mx.eval(model.parameters())

    def run(prompt, n):
        return lm_generate_step(prompt, model, max_tokens=n, prefill_step_size=prefill_step_size)
    return run


def load_ours(path: Path, dtype: str | None):
    model = load_model(path, dtype=dtype)
    moe.cast_experts_for_backend(model)
    mx.eval(model.parameters())
    return model


def quantize_checkpoint(source: Path, out: Path, bits: int, group_size: int) -> Path:
    from qwen2_mlx.convert import convert

    convert(source, out, quantize=True, q_bits=bits, q_group_size=group_size,
            quant_predicate=moe.moe_quant_predicate, log=None)
    return out


def measure(name: str, engine: Engine, prompt: mx.array, gen_tokens: int,
            results: dict[str, tuple[float, float]]) -> None:
    time_engine(engine, prompt[:8], 2)  # warm-up
    results[name] = time_engine(engine, prompt, gen_tokens)
    p, d = results[name]
    print(f"  {name:<28} prefill {p:8.2f} tok/s | decode {d:7.2f} tok/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", default=["float16", "float32", "q4"],
                        choices=["float16", "bfloat16", "float32", "q4", "q8"])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--gen-tokens", type=int, default=16)
    parser.add_argument("--prefill-step-size", type=int, default=512)
    parser.add_argument("--no-mlx-lm", action="store_true", help="measure qwen2-mlx only")
    args = parser.parse_args()

    print(f"backend: {mx.default_device()}, metal: {mx.metal.is_available()}, "
          f"prompt {args.prompt_tokens} tokens, {args.gen_tokens} generated, one run each; "
          f"experts compute in {moe.experts_compute_dtype(mx.float16)} for float16 weights")
    vocab = SMALL_MOE["vocab_size"]
    prompt = mx.array([(i * 7919) % (vocab - 300) for i in range(args.prompt_tokens)],
                      dtype=mx.uint32)
    with tempfile.TemporaryDirectory() as tmp:
        source = write_moe_checkpoint(Path(tmp) / "float16", "float16")
        for precision in args.precisions:
            print(f"{precision}:", flush=True)
            results: dict[str, tuple[float, float]] = {}
            if precision.startswith("q"):
                path = quantize_checkpoint(source, Path(tmp) / precision, int(precision[1:]), 64)
                dtype = None
            else:
                path, dtype = source, precision
            model = load_ours(path, dtype)
            measure("qwen2-mlx", ours(model, args.prefill_step_size), prompt,
                    args.gen_tokens, results)
            if not precision.startswith("q"):
                measure("qwen2-mlx unsorted", ours(model, args.prefill_step_size, sort=False),
                        prompt, args.gen_tokens, results)
            del model
            gc.collect()
            if not args.no_mlx_lm:
                needs_f32 = (dtype in ("float16", "bfloat16")
                             and moe.experts_compute_dtype(mx.float16) == mx.float32)
                label = "mlx-lm" + (" (experts float32)" if needs_f32 else "")
                measure(label, mlx_lm_engine(path, dtype, args.prefill_step_size, needs_f32),
                        prompt, args.gen_tokens, results)
                if precision.startswith("q") and not mx.metal.is_available():
                    measure("mlx-lm (float32 activations)",
                            mlx_lm_engine(path, "float32", args.prefill_step_size, False),
                            prompt, args.gen_tokens, results)
                gc.collect()
            p1, d1 = results["qwen2-mlx"]
            for name, (p2, d2) in results.items():
                if name.startswith("mlx-lm"):
                    print(f"  ratio vs {name:<19} prefill {p1 / p2:.2f}x | decode {d1 / d2:.2f}x")


if __name__ == "__main__":
    main()
