"""Teach Qwen2 facts about a made-up town with LoRA, then compare, fuse and reload.

The bundled data (examples/lora/data) describes "Larkspur Cove", a town no model knows:
train.jsonl holds 16 chat question/answer pairs plus one prompt/completion and one plain text
line (the three formats mix freely); valid.jsonl and test.jsonl ask about the same facts in
wordings that training never shows.

    python examples/lora/train_lora.py                      # Qwen2-0.5B-Instruct, float16
    python examples/lora/train_lora.py --q-bits 4           # QLoRA on a 4-bit base
    python examples/lora/train_lora.py --model ./my-qwen2 --iters 300 --fuse fused_model

The same run from the command line:

    qwen2-mlx lora --model Qwen/Qwen2-0.5B-Instruct --data examples/lora/data \\
        --iters 200 --lr 2e-4 --batch-size 4 --test
    qwen2-mlx generate --model Qwen/Qwen2-0.5B-Instruct --adapter-path adapters \\
        --prompt "Who is the mayor of Larkspur Cove?" --temp 0
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from qwen2_mlx import generate, load
from qwen2_mlx.convert import quantize_base, save_model
from qwen2_mlx.lora import LoRAConfig, adapters_disabled, fuse_adapters
from qwen2_mlx.train import TrainingConfig, evaluate, load_datasets, train

DATA = Path(__file__).parent / "data"
QUESTIONS = [
    "Who is the mayor of Larkspur Cove?",
    "How frequent is the Heron Island ferry?",  # a wording only test.jsonl uses
]


def show_progress(p) -> None:
    if p.event == "start":
        print(f"trainable parameters: {p.trainable_parameters:,} of {p.total_parameters:,}")
    elif p.event == "step" and p.report:
        print(f"step {p.step:4d}/{p.iters}  loss {p.train_loss:.3f}  lr {p.learning_rate:.1e}  "
              f"{p.tokens_per_second:.0f} tok/s  peak {p.peak_memory_gb:.2f} GB")
    elif p.event == "validation":
        print(f"step {p.step:4d}  validation loss {p.val_loss:.3f}")


def answers(model, tokenizer) -> list[str]:
    return [generate(model, tokenizer, [{"role": "user", "content": q}], max_tokens=40)
            for q in QUESTIONS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen/Qwen2-0.5B-Instruct")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--dtype", default=None, help="e.g. float16 or float32 (CPU QLoRA)")
    parser.add_argument("--q-bits", type=int, default=None, help="quantize the base (QLoRA)")
    parser.add_argument("--adapter-path", type=Path, default=Path("adapters"))
    parser.add_argument("--fuse", type=Path, default=None, help="write a fused model here")
    args = parser.parse_args()

    model, tokenizer = load(args.model, dtype=args.dtype)
    if args.q_bits:
        quantize_base(model, bits=args.q_bits)
    data = load_datasets(args.data, tokenizer)

    train(model, tokenizer, data, adapter_path=args.adapter_path,
          lora=LoRAConfig(rank=8, alpha=16, targets=["all-linear"]),
          config=TrainingConfig(iters=args.iters, batch_size=4, learning_rate=2e-4,
                                warmup_steps=10, steps_per_report=10, steps_per_eval=50),
          callback=show_progress)

    test_loss = evaluate(model, data["test"])
    with adapters_disabled(model):  # the same weights, adapters off: the base model
        base_loss = evaluate(model, data["test"])
        before = answers(model, tokenizer)
    print(f"test loss: base {base_loss:.3f} (ppl {math.exp(base_loss):.1f}), "
          f"with adapters {test_loss:.3f} (ppl {math.exp(test_loss):.1f})")
    for question, old, new in zip(QUESTIONS, before, answers(model, tokenizer), strict=True):
        print(f"\nQ: {question}\n  base:    {old}\n  adapted: {new}")

    if args.fuse:
        from qwen2_mlx.loader import load_config, resolve_model_path

        fuse_adapters(model)
        save_model(model, args.fuse, load_config(resolve_model_path(args.model)), tokenizer,
                   force=True)
        fused, _ = load(args.fuse)
        print(f"\nfused model written to {args.fuse}; it answers: {answers(fused, tokenizer)[0]}")


if __name__ == "__main__":
    main()
