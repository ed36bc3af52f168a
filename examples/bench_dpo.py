"""Peak memory and speed of DPO training, with the reference on the fly or precomputed.

Trains rank-8 LoRA adapters on every linear projection of a Qwen2-shaped model for a few
steps on random preference pairs (a prompt and two different replies of fixed lengths), once
with a reference forward pass every step (adapters disabled on the same weights) and once
with the reference log-probs precomputed in one pass before training. Reports the peak
memory of the training steps, of the precompute pass, the model's weight bytes (what a second
reference copy, as mlx-lm-lora loads, would add) and training tokens/s.

    python examples/bench_dpo.py --random-preset Qwen2-0.5B              # float16, random
    python examples/bench_dpo.py --model ./Qwen2-0.5B-Instruct --prompt-len 128 --reply-len 64
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import write_random_checkpoint  # noqa: E402
from bench_lora import bench_config, step_recorder  # noqa: E402

from qwen2_mlx.dpo import DPOConfig, PreferenceDataset, PreferencePair, train_dpo  # noqa: E402
from qwen2_mlx.loader import load_config, load_model  # noqa: E402
from qwen2_mlx.lora import LoRAConfig, apply_lora  # noqa: E402
from qwen2_mlx.train.data import Example  # noqa: E402


def random_pairs(n: int, prompt_len: int, reply_len: int, vocab: int,
                 seed: int = 0) -> PreferenceDataset:
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        prompt = rng.integers(0, vocab - 300, prompt_len).tolist()
        replies = [rng.integers(0, vocab - 300, reply_len).tolist() for _ in range(2)]
        mask = [False] * prompt_len + [True] * reply_len
        chosen, rejected = (Example(prompt + r, mask) for r in replies)
        pairs.append(PreferencePair(chosen, rejected, prompt_len))
    return PreferenceDataset(pairs)


def run(path: Path, data: PreferenceDataset, precompute: bool, args, out: Path) -> dict:
    model = load_model(path)
    weights_gb = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9
    mx.random.seed(0)
    apply_lora(model, LoRAConfig(rank=8, alpha=16, targets=["all-linear"]))
    per_step: list[tuple[float, float]] = []
    result = train_dpo(model, None, {"train": data}, adapter_path=out, config=bench_config(args),
                       dpo=DPOConfig(precompute_ref=precompute), callback=step_recorder(per_step))
    measured = per_step[1:] or per_step
    return {"weights_gb": weights_gb, "peak_gb": max(m for _, m in per_step),
            "tokens_per_second": statistics.median(t for t, _ in measured),
            "reference_peak_gb": result.reference_peak_memory_gb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="local float checkpoint directory")
    source.add_argument("--random-preset", help="e.g. Qwen2-0.5B (random weights)")
    parser.add_argument("--dtype", default="float16", help="of the random checkpoint")
    parser.add_argument("--batch-size", type=int, default=1, help="pairs per step")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--reply-len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="the first one warms up")
    parser.add_argument("--grad-checkpoint", action="store_true")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        path = args.model or write_random_checkpoint(args.random_preset, args.dtype,
                                                     tmp / "model")
        vocab = load_config(path)["vocab_size"]
        data = random_pairs(args.batch_size * args.steps, args.prompt_len, args.reply_len,
                            vocab)
        for precompute in (False, True):
            name = "precomputed" if precompute else "on the fly"
            print(f"reference {name}:", flush=True)
            gc.collect()
            mx.clear_cache()
            results[name] = run(path, data, precompute, args, tmp / name.replace(" ", "_"))
    weights = results["on the fly"]["weights_gb"]
    print(f"\nbackend: {mx.default_device()}, {args.batch_size} pair(s) per step, "
          f"{args.prompt_len}-token prompt + 2 x {args.reply_len}-token replies, LoRA rank 8 "
          f"on all linear layers; model weights {weights:.2f} GB (a second reference copy would "
          "add as much)")
    for name, r in results.items():
        extra = (f", precompute pass peak {r['reference_peak_gb']:.2f} GB" if
                 r["reference_peak_gb"] else "")
        print(f"reference {name:>11}: training peak {r['peak_gb']:.2f} GB{extra}, "
              f"{r['tokens_per_second']:.2f} tok/s (median after step 1)")


if __name__ == "__main__":
    main()
