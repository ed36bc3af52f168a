"""Teach Qwen2 to answer without filler, with DPO on LoRA adapters.

The bundled preference pairs (examples/dpo/data) share one taste: the chosen reply answers in
a few words, the rejected reply wraps a correct answer in filler ("Great question! ... I hope
this helps!"). train.jsonl has 18 pairs (plain prompts, one with a system prompt, one
multi-turn conversation and one in TRL's conversational form); valid.jsonl has 6 pairs on
questions training never shows, so its accuracy is measured on held-out prompts.

    python examples/dpo/train_dpo.py                                 # Qwen2-0.5B-Instruct
    python examples/dpo/train_dpo.py --precompute-ref --iters 200    # cache the reference
    python examples/dpo/train_dpo.py --loss-type ipo --beta 0.5

The same run from the command line:

    qwen2-mlx dpo --model Qwen/Qwen2-0.5B-Instruct --data examples/dpo/data \\
        --iters 100 --lr 2e-5 --batch-size 2 --beta 0.1 --steps-per-eval 25
    qwen2-mlx generate --model Qwen/Qwen2-0.5B-Instruct --adapter-path adapters \\
        --prompt "What is the capital of Canada?" --temp 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from qwen2_mlx import generate, load
from qwen2_mlx.convert import quantize_base
from qwen2_mlx.dpo import (
    DPOConfig,
    evaluate_dpo,
    load_preference_datasets,
    make_preference_batch,
    sequence_logps,
    train_dpo,
)
from qwen2_mlx.lora import LoRAConfig, adapters_disabled, apply_lora
from qwen2_mlx.train import TrainingConfig

DATA = Path(__file__).parent / "data"
QUESTIONS = ["What is the capital of Canada?", "Who painted the Mona Lisa?"]  # valid.jsonl's


def show_progress(p) -> None:
    if p.event == "step" and p.report:
        m = p.metrics
        print(f"step {p.step:4d}/{p.iters}  loss {m['loss']:.3f}  margin "
              f"{m['rewards/margins']:+.3f}  acc {m['rewards/accuracies']:.2f}  "
              f"peak {p.peak_memory_gb:.2f} GB")
    elif p.event == "validation":
        print(f"step {p.step:4d}  held-out: loss {p.metrics['loss']:.3f}, accuracy "
              f"{p.metrics['rewards/accuracies']:.2f}")


def prefers_chosen(model, dataset) -> int:
    """Pairs where the model itself gives the chosen reply the higher log-probability."""
    batch = make_preference_batch(dataset, range(len(dataset)))
    logps = np.array(sequence_logps(model, batch.sequences))
    return int((logps[:len(dataset)] > logps[len(dataset):]).sum())


def summary(model, dataset, dpo) -> str:
    m = evaluate_dpo(model, dataset, dpo)
    return (f"loss {m['loss']:.3f}, reward accuracy {m['rewards/accuracies']:.2f}, margin "
            f"{m['rewards/margins']:+.3f}; the model prefers the chosen reply in "
            f"{prefers_chosen(model, dataset)} of {len(dataset)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen/Qwen2-0.5B-Instruct")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--loss-type", default="sigmoid", choices=["sigmoid", "ipo", "hinge"])
    parser.add_argument("--precompute-ref", action="store_true")
    parser.add_argument("--dtype", default=None, help="e.g. float16 or float32")
    parser.add_argument("--q-bits", type=int, default=None, help="quantize the base (QLoRA)")
    parser.add_argument("--adapter-path", type=Path, default=Path("adapters"))
    args = parser.parse_args()

    model, tokenizer = load(args.model, dtype=args.dtype)
    if args.q_bits:
        quantize_base(model, bits=args.q_bits)
    data = load_preference_datasets(args.data, tokenizer)
    dpo = DPOConfig(beta=args.beta, loss_type=args.loss_type, precompute_ref=args.precompute_ref)
    apply_lora(model, LoRAConfig(rank=8, alpha=16, targets=["all-linear"]))
    print(f"held-out pairs before: {summary(model, data['valid'], dpo)}")

    train_dpo(model, tokenizer, data, adapter_path=args.adapter_path, dpo=dpo,
              config=TrainingConfig(iters=args.iters, batch_size=2, learning_rate=2e-5,
                                    warmup_steps=min(10, args.iters), steps_per_report=10,
                                    steps_per_eval=25),
              callback=show_progress)

    print(f"held-out pairs after:  {summary(model, data['valid'], dpo)}")
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        with adapters_disabled(model):  # the reference: same weights, adapters off
            before = generate(model, tokenizer, messages, max_tokens=40)
        after = generate(model, tokenizer, messages, max_tokens=40)
        print(f"\nQ: {question}\n  base:  {before}\n  tuned: {after}")


if __name__ == "__main__":
    main()
