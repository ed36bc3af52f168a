"""Benchmark speculative decoding: algorithmic gain, wall-clock gain, and mlx-lm side by side.

A draft whose agreement with the target is controllable: the target is the draft plus extra
layers whose output projections (`o_proj`, `down_proj`) are scaled by eps, so with eps = 0
the target computes exactly what the draft does and agreement falls as eps grows. The target
has the random Qwen2-0.5B shape (24 layers, but an untied LM head); the draft is its first
`--draft-layers` layers with the same embedding, final norm and LM head.

For each eps and temperature (0 = greedy, 0.7), the script runs, alternating run by run:
  plain        qwen2-mlx without speculation (`generate_step`)
  ours k=K     qwen2-mlx speculative, K drafted tokens every round (as mlx-lm drafts)
  ours adapt   qwen2-mlx speculative with the default adaptive k in 1..K
  mlx-lm       mlx_lm.generate.speculative_generate_step with the same pair, K and temperature
and prints acceptance (accepted / drafted), tokens per target forward pass (the algorithmic
gain: what a bandwidth-bound Mac turns into speed, less the draft's cost) and end-to-end
tokens/s with the ratio to plain decoding (medians over --runs; sampled runs use seeds
0..runs-1).

    python examples/bench_speculative.py                      # the README's table
    python examples/bench_speculative.py --eps 0.05 --runs 1 --target-layers 8   # quick look

On the CPU backend a pass over k+1 tokens costs about k+1 single-token passes (the reference
BLAS is compute-bound), so wall-clock gains here are far below tokens per pass; see README.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from qwen2_mlx.generate import generate_step
from qwen2_mlx.loader import load_model
from qwen2_mlx.model import Model
from qwen2_mlx.presets import preset
from qwen2_mlx.sampling import SamplingParams
from qwen2_mlx.speculative import SpeculativeStats, speculative_generate_step


def save_checkpoint(model: Model, out_dir: Path) -> Path:
    """Save a model in Hugging Face layout (config.json + model.safetensors), float32."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "pt"})
    fields = asdict(model.config)
    fields.pop("layer_types")
    fields.update(architectures=["Qwen2ForCausalLM"], torch_dtype="float32")
    (out_dir / "config.json").write_text(json.dumps(fields, indent=2))
    return out_dir


def build_pair(name: str, target_layers: int, draft_layers: int, eps: float, logit_scale: float,
               out: Path) -> tuple[Path, Path]:
    """Draft = the first `draft_layers` layers; target = draft + extra layers scaled by eps."""
    def config(layers):
        # Untied: with a random tied LM head the model mostly predicts its input token again.
        c = preset(name)
        c.num_hidden_layers, c.tie_word_embeddings, c.layer_types = layers, False, []
        c.__post_init__()
        return c

    mx.random.seed(0)
    target = Model(config(target_layers))
    # A random LM head gives a nearly uniform next-token distribution; scaled up, its logits
    # spread (std about 0.6 * logit_scale) and the distribution is peaked like a trained
    # model's, so that temperature matters.
    target.lm_head.weight = target.lm_head.weight * logit_scale
    for layer in target.layers[draft_layers:]:
        layer.self_attn.o_proj.weight = layer.self_attn.o_proj.weight * eps
        layer.mlp.down_proj.weight = layer.mlp.down_proj.weight * eps
    draft = Model(config(draft_layers))
    draft.model.embed_tokens = target.model.embed_tokens
    draft.model.norm = target.model.norm
    draft.model.layers = target.model.layers[:draft_layers]
    draft.lm_head = target.lm_head
    return save_checkpoint(target, out / "target"), save_checkpoint(draft, out / "draft")


def run_ours(target, draft, prompt, n, temp, seed, k, adaptive):
    stats = SpeculativeStats()
    sampling = SamplingParams(temperature=temp, seed=seed)
    steps = speculative_generate_step(prompt, target, draft_model=draft, sampling=sampling,
                                      num_draft_tokens=k, adaptive=adaptive, max_tokens=n,
                                      stats=stats)
    return timed(steps), (stats.drafted, stats.accepted, stats.target_passes)


def run_plain(target, prompt, n, temp, seed):
    sampling = SamplingParams(temperature=temp, seed=seed)
    return timed(generate_step(prompt, target, sampling=sampling, max_tokens=n)), (0, 0, n)


def run_mlx_lm(target, draft, prompt, n, temp, seed, k):
    from mlx_lm.generate import speculative_generate_step as lm_speculative
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(seed)
    flags = []
    steps = lm_speculative(prompt, target, draft, num_draft_tokens=k, max_tokens=n,
                           sampler=make_sampler(temp=temp))
    elapsed = timed(steps, flags)
    # mlx-lm drafts min(K, tokens left) per round; each round ends with one target token.
    drafted = accepted = passes = 0
    made = 0
    i = 0
    while i < len(flags):
        drafted += min(k, n - made)
        run = 0
        while i < len(flags) and flags[i]:
            run, i = run + 1, i + 1
        accepted += run
        made += run + (1 if i < len(flags) else 0)
        passes += 1
        i += 1
    return elapsed, (drafted, accepted, passes)


def make_engines(target, draft, lm_pair, prompt, k) -> dict:
    """name -> run(temperature, seed, max_tokens) -> (seconds, (drafted, accepted, passes))."""
    engines = {
        "plain": lambda t, s, m: run_plain(target, prompt, m, t, s),
        f"ours k={k}": lambda t, s, m: run_ours(target, draft, prompt, m, t, s, k, False),
        "ours adapt": lambda t, s, m: run_ours(target, draft, prompt, m, t, s, k, True),
    }
    if lm_pair is not None:
        engines["mlx-lm"] = lambda t, s, m: run_mlx_lm(*lm_pair, prompt, m, t, s, k)
    return engines


def timed(steps, flags: list | None = None) -> float:
    """Seconds from the call to the last token (prefill included)."""
    tic = time.perf_counter()
    last = tic
    for item in steps:
        last = time.perf_counter()
        if flags is not None:
            flags.append(bool(item[2]))
    return last - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="Qwen2-0.5B")
    parser.add_argument("--target-layers", type=int, default=None,
                        help="default: the preset's (24 for Qwen2-0.5B)")
    parser.add_argument("--draft-layers", type=int, default=4)
    parser.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.04, 0.1])
    parser.add_argument("--temps", type=float, nargs="+", default=[0.0, 0.7])
    parser.add_argument("--logit-scale", type=float, default=10.0)
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--gen-tokens", type=int, default=24)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-mlx-lm", action="store_true")
    args = parser.parse_args()
    layers = args.target_layers or preset(args.preset).num_hidden_layers
    k, n = args.num_draft_tokens, args.gen_tokens

    print(f"backend {mx.default_device()}, target {args.preset} shape with {layers} layers, "
          f"draft = its first {args.draft_layers}; K={k}, {args.prompt_tokens} prompt tokens, "
          f"{n} generated, median of {args.runs} alternating runs")
    print("| eps | temp | engine | acceptance | tokens / target pass | tok/s | vs plain |")
    print("|---|---|---|---|---|---|---|")
    for eps in args.eps:
        # One pair at a time: the 0.5B-shape pair is ~4 GB in float32 per engine.
        measure(args, eps, layers)
        gc.collect()
        mx.clear_cache()


def measure(args, eps: float, layers: int) -> None:
    """Build the pair for `eps`, run every engine at every temperature, print the rows."""
    k, n = args.num_draft_tokens, args.gen_tokens
    with tempfile.TemporaryDirectory() as tmp:
        target_path, draft_path = build_pair(args.preset, layers, args.draft_layers, eps,
                                             args.logit_scale, Path(tmp))
        target, draft = load_model(target_path), load_model(draft_path)
        vocab = target.config.vocab_size
        prompt = mx.array([(i * 7919) % (vocab - 300) for i in range(args.prompt_tokens)],
                          dtype=mx.uint32)
        lm_pair = None
        if not args.no_mlx_lm:
            from mlx_lm.utils import load_model as lm_load_model

            lm_pair = lm_load_model(target_path)[0], lm_load_model(draft_path)[0]
        engines = make_engines(target, draft, lm_pair, prompt, k)
        for temp in args.temps:
            for engine in engines.values():
                engine(temp, 0, k + 2)  # warm-up (also compiles the samplers)
            times: dict[str, list[float]] = {name: [] for name in engines}
            counts = {name: [0, 0, 0] for name in engines}
            for run in range(args.runs):  # alternate engines run by run
                for name, engine in engines.items():
                    elapsed, (drafted, accepted, passes) = engine(temp, run, n)
                    times[name].append(elapsed)
                    for i, v in enumerate((drafted, accepted, passes)):
                        counts[name][i] += v
            plain = statistics.median(times["plain"])
            for name in engines:
                drafted, accepted, passes = counts[name]
                median = statistics.median(times[name])
                acceptance = f"{accepted / drafted:.1%}" if drafted else "-"
                print(f"| {eps} | {temp} | {name} | {acceptance} | "
                      f"{n * args.runs / passes:.2f} | {n / median:.2f} | "
                      f"{plain / median:.2f}x |", flush=True)

if __name__ == "__main__":
    main()
