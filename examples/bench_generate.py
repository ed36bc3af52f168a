"""Benchmark prefill and decode speed of qwen2-mlx side by side with mlx-lm.

Both engines run the same checkpoint, on the same backend, with the same prompt ids and greedy
decoding; the script prints tokens/s, peak memory, and qwen2-mlx / mlx-lm ratios.

    python examples/bench_generate.py --random-preset Qwen2-0.5B --dtype bfloat16
    python examples/bench_generate.py --model ./Qwen2-0.5B-Instruct --prompt-tokens 512

`--random-preset` writes a random checkpoint with a published model's exact shapes (in
Hugging Face layout) so no download is needed. mlx-lm is optional: without it only qwen2-mlx is
measured.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from qwen2_mlx.generate import generate_step
from qwen2_mlx.loader import load_model
from qwen2_mlx.model import Model
from qwen2_mlx.presets import preset
from qwen2_mlx.sampling import SamplingParams


def write_random_checkpoint(name: str, dtype: str, out_dir: Path) -> Path:
    """A random checkpoint with the shapes of preset `name`, saved like a Hub checkpoint."""
    import json
    from dataclasses import asdict

    config = preset(name)
    mx.random.seed(0)
    model = Model(config)
    weights = {k: (v * 0.5).astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "pt"})
    fields = asdict(config)
    fields.pop("layer_types")
    fields["architectures"] = ["Qwen2ForCausalLM"]
    fields["torch_dtype"] = dtype
    (out_dir / "config.json").write_text(json.dumps(fields, indent=2))
    return out_dir


def time_engine(step_fn, prompt: mx.array, gen_tokens: int) -> tuple[float, float, float]:
    """(prefill tok/s, decode tok/s, working GB) for one run of a generate_step-like iterator.

    Both engines' weights live in this process, so memory is measured as the peak above
    what was allocated before the run (cache and activations); the caller adds the
    engine's own weights.
    """
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    n = 0
    for n, _ in enumerate(step_fn(prompt, gen_tokens), start=1):
        if n == 1:
            prefill = time.perf_counter() - tic
            tic = time.perf_counter()
    decode = time.perf_counter() - tic
    return prompt.size / prefill, (n - 1) / decode, (mx.get_peak_memory() - before) / 1e9


def weight_gb(model) -> float:
    return sum(p.nbytes for _, p in tree_flatten(model.parameters())) / 1e9


def ours(model, prefill_step_size: int):
    def run(prompt, n):
        return generate_step(prompt, model, sampling=SamplingParams(), max_tokens=n,
                             prefill_step_size=prefill_step_size)
    return run, weight_gb(model)


def mlx_lm_engine(path: Path, dtype: str | None, prefill_step_size: int):
    from mlx_lm.generate import generate_step as lm_generate_step
    from mlx_lm.utils import load_model as lm_load_model

    model, _ = lm_load_model(path)
    if dtype is not None:
        model.set_dtype(getattr(mx, dtype))

    def run(prompt, n):
        return lm_generate_step(prompt, model, max_tokens=n, prefill_step_size=prefill_step_size)
    return run, weight_gb(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="local checkpoint directory")
    source.add_argument("--random-preset", help="e.g. Qwen2-0.5B (random weights)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3, help="median over this many runs")
    parser.add_argument("--prefill-step-size", type=int, default=512)
    parser.add_argument("--no-mlx-lm", action="store_true", help="measure qwen2-mlx only")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or write_random_checkpoint(
            args.random_preset, args.dtype or "bfloat16", Path(tmp) / "ckpt")
        model = load_model(path, dtype=args.dtype)
        vocab = model.config.vocab_size
        prompt = mx.array([(i * 7919) % (vocab - 300) for i in range(args.prompt_tokens)],
                          dtype=mx.uint32)
        engines = {"qwen2-mlx": ours(model, args.prefill_step_size)}
        if not args.no_mlx_lm:
            engines["mlx-lm"] = mlx_lm_engine(path, args.dtype, args.prefill_step_size)
        print(f"backend: {mx.default_device()}, dtype: {args.dtype or 'as stored'}, "
              f"prompt {args.prompt_tokens} tokens, {args.gen_tokens} generated, "
              f"median of {args.runs}")
        for engine, _ in engines.values():
            time_engine(engine, prompt[:8], 2)  # warm-up
        # Runs alternate between the engines so that drift in machine load hits both alike.
        runs = {name: [] for name in engines}
        for _ in range(args.runs):
            for name, (engine, weights) in engines.items():
                p, d, working = time_engine(engine, prompt, args.gen_tokens)
                runs[name].append((p, d, weights + working))
        results = {}
        for name, measured in runs.items():
            results[name] = tuple(statistics.median(r[i] for r in measured) for i in range(3))
            p, d, m = results[name]
            print(f"{name:>10}: prefill {p:8.2f} tok/s | decode {d:7.2f} tok/s | peak {m:.2f} GB")
        if "mlx-lm" in results:
            (p1, d1, m1), (p2, d2, m2) = results["qwen2-mlx"], results["mlx-lm"]
            print(f"{'ratio':>10}: prefill {p1 / p2:.2f}x | decode {d1 / d2:.2f}x | "
                  f"peak memory {m1 / m2:.2f}x  (qwen2-mlx / mlx-lm)")


if __name__ == "__main__":
    main()
