"""Benchmark LoRA training speed and memory of qwen2-mlx side by side with mlx-lm.

Both engines train rank-8 LoRA adapters on every linear projection of every layer (scale 2,
AdamW, no dropout) over the same random token sequences, on the same checkpoint and backend,
and report training tokens/s (the median of the steps after a warm-up step) and peak memory.

    python examples/bench_lora.py --random-preset Qwen2-0.5B                # float16 and q4
    python examples/bench_lora.py --random-preset Qwen2-0.5B --precisions q4 --steps 4
    python examples/bench_lora.py --model ./Qwen2-0.5B-Instruct --seq-len 256 --batch-size 4

`--random-preset` writes a random checkpoint with a published model's exact shapes. The q4
variant is made with `qwen2-mlx convert` (group size 64); with `--q4-dtype float32` (the
default on a machine without Metal) its scales, and so the activations of both engines, are
float32, which MLX's CPU backend needs for usable quantized matmul speed. mlx-lm is optional.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import write_random_checkpoint  # noqa: E402

from qwen2_mlx.loader import load_config, load_model  # noqa: E402
from qwen2_mlx.lora import LoRAConfig, apply_lora  # noqa: E402
from qwen2_mlx.train import TrainingConfig, train  # noqa: E402
from qwen2_mlx.train.data import Example  # noqa: E402
from qwen2_mlx.train.text_data import Dataset  # noqa: E402

WARMUP_STEPS = 2
TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def random_sequences(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab - 300, length).tolist() for _ in range(n)]


def summarise(per_step: list[tuple[float, float]]) -> tuple[float, float]:
    """(median tokens/s after the warm-up steps, peak GB) from [(tokens/s, peak GB)].

    mlx-lm compiles its step function (`mx.compile`) on the first call and again on the
    second (the accumulated-gradient input changes from None to arrays), so two steps warm up.
    """
    measured = per_step[WARMUP_STEPS:] or per_step
    return statistics.median(t for t, _ in measured), max(m for _, m in per_step)


def bench_config(args, **settings) -> TrainingConfig:
    """`args.steps` updates of `args.batch_size` examples, a report every step, no checkpoint
    before the end (also for bench_dpo.py)."""
    return TrainingConfig(iters=args.steps, batch_size=args.batch_size, learning_rate=1e-5,
                          steps_per_report=1, save_every=10**9,
                          grad_checkpoint=args.grad_checkpoint, **settings)


def step_recorder(per_step: list[tuple[float, float]], label: str = "") -> Callable:
    """A training callback that appends (tokens/s, peak GB) of every step to `per_step` and
    prints it (also for bench_dpo.py)."""

    def record(p) -> None:
        if p.event == "step":
            per_step.append((p.tokens_per_second, p.peak_memory_gb))
            print(f"    {label}step {p.step}: {p.tokens_per_second:.2f} tok/s, "
                  f"peak {p.peak_memory_gb:.2f} GB", flush=True)

    return record


def ours(path: Path, sequences, args, out: Path) -> tuple[float, float]:
    model = load_model(path)
    mx.random.seed(0)
    apply_lora(model, LoRAConfig(rank=8, alpha=16, targets=TARGETS))
    data = Dataset([Example(s, [True] * len(s)) for s in sequences])
    per_step: list[tuple[float, float]] = []
    train(model, None, {"train": data}, adapter_path=out,
          config=bench_config(args, max_seq_length=args.seq_len + 1),
          callback=step_recorder(per_step, "qwen2-mlx "))
    return summarise(per_step)


def mlx_lm(path: Path, sequences, args, out: Path) -> tuple[float, float]:
    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback
    from mlx_lm.tuner.trainer import train as lm_train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model as lm_load_model

    model, _ = lm_load_model(path)
    model.freeze()
    mx.random.seed(0)
    linear_to_lora_layers(model, len(model.layers),
                          {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": TARGETS})
    per_step: list[tuple[float, float]] = []

    class Record(TrainingCallback):
        def on_train_loss_report(self, info):
            per_step.append((info["tokens_per_second"], info["peak_memory"]))
            print(f"    mlx-lm    step {info['iteration']}: {info['tokens_per_second']:.2f} "
                  f"tok/s, peak {info['peak_memory']:.2f} GB", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    mx.reset_peak_memory()
    lm_train(model, optim.AdamW(learning_rate=1e-5), [(s, 0) for s in sequences], None,
             TrainingArgs(batch_size=args.batch_size, iters=args.steps, steps_per_report=1,
                          steps_per_save=10**9, max_seq_length=args.seq_len + 1,
                          adapter_file=str(out / "adapters.safetensors"),
                          grad_checkpoint=args.grad_checkpoint),
             training_callback=Record())
    return summarise(per_step)


def checkpoint_for(precision: str, args, tmp: Path) -> Path:
    float_dir = args.model or tmp / "float16"
    if args.model is None and not float_dir.exists():
        write_random_checkpoint(args.random_preset, "float16", float_dir)
    if precision == "float16":
        return float_dir
    from qwen2_mlx.convert import convert

    q4 = tmp / "q4"
    if not q4.exists():
        convert(float_dir, q4, quantize=True, q_bits=4, q_group_size=64, dtype=args.q4_dtype,
                log=None)
    return q4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="local float checkpoint directory")
    source.add_argument("--random-preset", help="e.g. Qwen2-0.5B (random weights)")
    parser.add_argument("--precisions", default="float16,q4")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per example")
    parser.add_argument("--steps", type=int, default=4,
                        help=f"training steps per engine; the first {WARMUP_STEPS} warm up")
    parser.add_argument("--grad-checkpoint", action="store_true")
    parser.add_argument("--q4-dtype", default=None if mx.metal.is_available() else "float32")
    parser.add_argument("--no-mlx-lm", action="store_true", help="measure qwen2-mlx only")
    args = parser.parse_args()

    results: dict[tuple[str, str], tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for precision in args.precisions.split(","):
            path = checkpoint_for(precision, args, tmp)
            vocab = load_config(path)["vocab_size"]
            sequences = random_sequences(args.batch_size * args.steps, args.seq_len + 1, vocab)
            engines = {"qwen2-mlx": ours} if args.no_mlx_lm else {"qwen2-mlx": ours,
                                                                  "mlx-lm": mlx_lm}
            for name, engine in engines.items():
                print(f"{precision} / {name}:", flush=True)
                gc.collect()
                mx.clear_cache()
                results[precision, name] = engine(path, sequences, args,
                                                  tmp / f"{precision}-{name}")
    print(f"\nbackend: {mx.default_device()}, batch {args.batch_size} x {args.seq_len} tokens, "
          f"LoRA rank 8 on all linear layers, median of steps {WARMUP_STEPS + 1}-{args.steps}")
    for (precision, name), (tps, peak) in results.items():
        print(f"{precision:>8} {name:>10}: {tps:8.2f} tok/s | peak {peak:.2f} GB")
        theirs = results.get((precision, "mlx-lm"))
        if name == "mlx-lm" and theirs:
            ratio_tps = results[precision, "qwen2-mlx"][0] / tps
            ratio_mem = results[precision, "qwen2-mlx"][1] / peak
            print(f"{precision:>8} {'ratio':>10}: {ratio_tps:.2f}x tok/s, {ratio_mem:.2f}x peak "
                  "memory (qwen2-mlx / mlx-lm)")


if __name__ == "__main__":
    main()
