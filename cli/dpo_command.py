"""`qwen2-mlx dpo`: preference-tune LoRA adapters with DPO (or IPO / hinge) on JSONL pairs."""

from __future__ import annotations

import sys

import click

from qwen2_mlx.cli.training_options import (
    base_metadata,
    check_adapter_dir,
    echo_truncation_warnings,
    load_base_model,
    model_and_data_options,
    one_line_errors,
    training_options,
    training_settings,
)
from qwen2_mlx.train.progress import ProgressPrinter, progress_bar


class DPOProgressPrinter(ProgressPrinter):
    """`qwen2-mlx lora`'s progress lines, with TRL's DPO metrics on step and validation."""

    def step_line(self, p) -> str:
        m = p.metrics
        return (f"Step {p.step}/{p.iters} {progress_bar(p.step, p.iters)} loss {m['loss']:.4f} | "
                f"rewards chosen {m['rewards/chosen']:.3f} rejected "
                f"{m['rewards/rejected']:.3f} margin {m['rewards/margins']:.3f} "
                f"acc {m['rewards/accuracies']:.3f} | lr {p.learning_rate:.2e} | "
                f"{p.tokens_per_second:.1f} tok/s | peak {p.peak_memory_gb:.2f} GB")

    def validation_line(self, p) -> str:
        m = p.metrics
        return (f"Step {p.step}: val loss {m['loss']:.4f}, rewards/accuracies "
                f"{m['rewards/accuracies']:.3f}, rewards/margins {m['rewards/margins']:.3f}")

    def __call__(self, p) -> None:
        if p.event == "reference":
            how = "read from" if p.metrics.get("cached") else "computed, cached in"
            click.echo(f"Reference log-probs of {int(p.metrics['pairs'])} {p.split} pairs "
                       f"{how} {p.checkpoint}")
        else:
            super().__call__(p)


def _report_validation(model, tokenizer, datasets, dpo, config, o) -> None:
    """--iters 0: the validation metrics of the adapters in --adapter-path."""
    from qwen2_mlx.dpo import evaluate_dpo, precompute_reference_logps
    from qwen2_mlx.lora import load_adapter

    valid = datasets.get("valid")
    if valid is None:
        raise click.ClickException(f"--iters 0 reports validation metrics and needs "
                                   f"{o['data']}/valid.jsonl")
    load_adapter(model, o["resume_adapter_file"] or o["adapter_path"])
    pad_id = tokenizer.pad_token_id or 0
    if dpo.precompute_ref:
        precompute_reference_logps(model, valid, batch_size=config.batch_size,
                                   cache_dir=dpo.ref_cache_dir or o["adapter_path"],
                                   pad_id=pad_id)
    m = evaluate_dpo(model, valid, dpo, config.batch_size, config.val_batches, pad_id)
    click.echo("Validation: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))


@click.command("dpo")
@model_and_data_options("Directory with train.jsonl (and valid.jsonl) of preference pairs: "
                        "{prompt or messages, chosen, rejected, system?}.")
@click.option("--beta", default=0.1, show_default=True, type=float,
              help="KL strength of DPO (IPO's tau); higher keeps closer to the base model.")
@click.option("--loss-type", type=click.Choice(["sigmoid", "ipo", "hinge"]), default="sigmoid",
              show_default=True, help="sigmoid: DPO; ipo: IPO (length-normalised); hinge: SLiC.")
@click.option("--label-smoothing", default=0.0, show_default=True, type=float,
              help="Assumed share of flipped labels, in [0, 0.5): conservative DPO (sigmoid).")
@click.option("--precompute-ref", is_flag=True,
              help="Compute the reference log-probs once per dataset before training and cache "
                   "them (no reference forward pass per step).")
@click.option("--ref-cache-dir", default=None, type=click.Path(file_okay=False),
              help="Directory of the reference cache (default: --adapter-path).")
# DPO moves a tuned model a little; mlx-lm-lora and TRL's LoRA recipes use 1e-6..5e-5.
@training_options(learning_rate=1e-5,
                  iters_help="Optimizer steps to train for (0: only report the validation "
                             "metrics of the adapters already in --adapter-path).",
                  batch_size_help="Preference pairs per batch (2x as many sequences).")
def dpo_command(beta, loss_type, label_smoothing, precompute_ref, ref_cache_dir,
                **options) -> None:
    """Preference-tune LoRA adapters with Direct Preference Optimization.

    Each line of DATA/train.jsonl is {"prompt": ..., "chosen": ..., "rejected": ...} (optional
    "system"), or {"messages": [...], "chosen": ..., "rejected": ...}. Pairs are rendered with
    the Qwen2 chat template; the loss scores the replies only. The reference model is the base
    model with the adapters switched off (no second copy in memory). Adapters are written like
    `qwen2-mlx lora`'s: use them with `generate --adapter-path` or merge them with `fuse`.

    \b
    Examples:
      qwen2-mlx dpo --model Qwen/Qwen2-0.5B-Instruct --data examples/dpo/data --iters 100
      qwen2-mlx dpo -m ./qwen2-1.5b --data ./prefs --beta 0.2 --precompute-ref
      qwen2-mlx dpo -m ./qwen2-1.5b --data ./prefs --loss-type ipo --beta 0.5
      qwen2-mlx dpo -m ./qwen2-7b --data ./prefs --q-bits 4 --grad-checkpoint   # QLoRA base
      qwen2-mlx dpo -m ./q05b --data ./prefs --resume-adapter-file adapters/adapters.safetensors
    """
    from qwen2_mlx.dpo import DPOConfig, load_preference_datasets, train_dpo

    o = options
    with one_line_errors():
        dpo = DPOConfig(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                        precompute_ref=precompute_ref, ref_cache_dir=ref_cache_dir)
        lora, config = training_settings(o)
        if o["iters"] > 0:
            check_adapter_dir(o)
        model, tokenizer = load_base_model(o)
        datasets = echo_truncation_warnings(lambda: load_preference_datasets(
            o["data"], tokenizer, max_seq_length=o["max_seq_length"]))
        if o["iters"] == 0:
            _report_validation(model, tokenizer, datasets, dpo, config, o)
            return
        if datasets.get("valid") is None:
            click.echo(f"No valid.jsonl in {o['data']}: training without validation metrics.")
        train_dpo(model, tokenizer, datasets, adapter_path=o["adapter_path"],
                  lora=None if o["resume_adapter_file"] else lora, config=config, dpo=dpo,
                  resume_adapter_file=o["resume_adapter_file"], overwrite=o["overwrite"],
                  callback=DPOProgressPrinter(live=sys.stdout.isatty()),
                  metadata=base_metadata(o))
