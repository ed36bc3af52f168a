"""Benchmark 2-rank tensor and pipeline parallelism against one process.

Writes random checkpoints (Qwen2-0.5B's exact shapes in bfloat16, and bench_moe.py's
scaled-down Qwen2-57B-A14B in float16), then, for each model, runs the same greedy generation
(same prompt ids) as one process and as two ranks under `mlx.launch -n 2 --backend ring` on
127.0.0.1 with `parallel="tensor"` and `"pipeline"` (and, for the dense model, mlx-lm's own
tensor parallelism, `Model.shard`, when mlx-lm is installed), alternating run by run, and
prints per configuration the median prefill and decode tokens/s, each rank's peak memory
(weights included), and the ratios to one process.

    python examples/bench_parallel.py                       # both models, 3 rounds
    python examples/bench_parallel.py --models Qwen2-0.5B --rounds 5 --gen-tokens 32

It also prints what each mode sends per generated token. On one machine the two ranks share
its cores and memory bandwidth, so the numbers show the cost of the machinery (extra
processes, collectives over loopback), not the gain of a second Mac; see the README.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

HERE = Path(__file__).resolve().parent


def write_checkpoints(out: Path, names: list[str]) -> dict[str, Path]:
    sys.path.insert(0, str(HERE))
    from bench_generate import write_random_checkpoint
    from bench_moe import write_moe_checkpoint

    paths = {}
    if "Qwen2-0.5B" in names:
        paths["Qwen2-0.5B"] = write_random_checkpoint("Qwen2-0.5B", "bfloat16", out / "dense")
    if "small-MoE" in names:
        paths["small-MoE"] = write_moe_checkpoint(out / "moe", "float16")
    return paths


def traffic_per_token(path: Path) -> dict[str, str]:
    """Bytes one decoded token sends per rank in each mode (activations in the model dtype)."""
    from qwen2_mlx.loader import load_config
    from qwen2_mlx.model import ModelConfig

    config = ModelConfig.from_dict(load_config(path))
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    act = 4 if config.model_type == "qwen2_moe" else 2  # float32 expert sums on CPU
    # Tensor: 2 all_sums of d per layer (attention out, MLP/MoE out) + the embedding all_sum,
    # and the vocab logits all_gather (V/2 per rank). A 2-rank ring all_sum moves d/2 each way
    # twice (reduce-scatter, all-gather) = d values per rank.
    tensor = (2 * layers + 1) * d * act + vocab // 2 * act
    # Pipeline: one send of d to the next stage + the all_gather of the last stage's d.
    pipeline = d * act + d * act
    return {"tensor": f"{tensor / 1e3:.1f} KB in {2 * layers + 2} collectives",
            "pipeline": f"{pipeline / 1e3:.1f} KB in 2 collectives"}


# --- Which Qwen2 sizes fit on 1, 2 and 4 Macs ------------------------------------------------

MAC_GB = (64, 128, 192)
# macOS lets the GPU wire about 75% of a Mac's memory by default; the weights may take 70%,
# leaving the rest of that for the KV cache and activations.
WEIGHT_SHARE = 0.70
# Bytes per weight of a matrix: bfloat16; MLX affine 8/4-bit with group 64 and a 16-bit
# scale and bias per group (+0.5 bit per weight). Norms and biases stay 16-bit.
PRECISIONS = {"bf16": 2.0, "8-bit": 8.5 / 8, "4-bit": 4.5 / 8}


class _Rank:
    """Stands in for an mx.distributed group in the size arithmetic (nothing is sent)."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def rank_bytes(name: str, mode: str | None, size: int, per_weight: float) -> float | None:
    """The most weight bytes any rank holds (None: this split is impossible). The model is
    built lazily and cut with the real sharding code, so no weight is ever computed."""
    from mlx.utils import tree_flatten

    from qwen2_mlx.model import Model
    from qwen2_mlx.parallel import ParallelError, pipeline_layers, tensor_shard
    from qwen2_mlx.parallel.pipeline import PipelineStage, shard_pipeline
    from qwen2_mlx.parallel.tensor import TensorSharder
    from qwen2_mlx.presets import preset

    worst = 0.0
    for rank in range(size):
        config = preset(name)
        model = Model(config)
        try:
            if mode == "tensor":
                TensorSharder(tensor_shard(config, rank, size), None)(model)
            elif mode == "pipeline":
                layers = pipeline_layers(config, rank, size)
                shard_pipeline(model, PipelineStage(_Rank(rank, size), layers, 0))
        except ParallelError:
            return None
        total = sum(v.size * (per_weight if v.ndim >= 2 else 2.0)
                    for _, v in tree_flatten(model.parameters()))
        worst = max(worst, total)
    return worst


def fit_table() -> str:
    """The README's table: weights per Mac and the smallest Mac that holds them."""
    from qwen2_mlx.presets import PRESETS

    def cell(gb: float | None) -> str:
        if gb is None:
            return "n/a"
        fits = [m for m in MAC_GB if gb <= WEIGHT_SHARE * m]
        return f"{gb:.1f} GB ({fits[0]} GB)" if fits else f"{gb:.1f} GB (none)"

    lines = ["| model | precision | 1 Mac | 2 Macs, tensor | 2 Macs, pipeline "
             "| 4 Macs, tensor | 4 Macs, pipeline |", "|" + " --- |" * 7]
    for name in PRESETS:
        for precision, per_weight in PRECISIONS.items():
            cells = [cell(rank_bytes(name, None, 1, per_weight) / 1e9)]
            for size in (2, 4):
                for mode in ("tensor", "pipeline"):
                    gb = rank_bytes(name, mode, size, per_weight)
                    cells.append(cell(None if gb is None else gb / 1e9))
            lines.append(f"| {name} | {precision} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def worker(args: argparse.Namespace) -> None:
    """One run (one process, or one rank): prints a JSON line of its measurements."""
    from qwen2_mlx.generate import generate_step
    from qwen2_mlx.loader import load_model
    from qwen2_mlx.parallel import load_sharded_model
    from qwen2_mlx.parallel.group import exchange
    from qwen2_mlx.sampling import SamplingParams

    step = generate_step
    tic = time.perf_counter()
    if args.mode == "single":
        model, group = load_model(Path(args.path)), None
    elif args.mode == "mlx-lm-tensor":
        # mlx-lm's own tensor parallelism (Model.shard), loaded as its sharded_load does.
        from mlx_lm.generate import generate_step as lm_generate_step
        from mlx_lm.utils import load_model as lm_load_model

        model, _ = lm_load_model(Path(args.path), lazy=True)
        group = mx.distributed.init()
        model.shard(group)
        mx.eval(model.parameters())

        def step(prompt, model, sampling, max_tokens, prefill_step_size):
            return lm_generate_step(prompt, model, max_tokens=max_tokens,
                                    prefill_step_size=prefill_step_size)
    else:
        model = load_sharded_model(args.path, parallel=args.mode)
        group = model.sharding.group
    load_s = time.perf_counter() - tic
    vocab = (model.args if args.mode == "mlx-lm-tensor" else model.config).vocab_size
    prompt = mx.array([(i * 7919) % (vocab - 300) for i in range(args.prompt_tokens)],
                      dtype=mx.uint32)

    def run(prompt: mx.array, n: int) -> tuple[float, float]:
        tic = time.perf_counter()
        steps = step(prompt, model, sampling=SamplingParams(), max_tokens=n,
                     prefill_step_size=512)
        for i, _ in enumerate(steps):
            if i == 0:
                prefill = time.perf_counter() - tic
                tic = time.perf_counter()
        return prompt.size / prefill, (n - 1) / (time.perf_counter() - tic)

    run(prompt[:8], 2)  # warm-up
    prefill, decode = run(prompt, args.gen_tokens)
    if args.mode == "mlx-lm-tensor":
        # mlx-lm queues a step past the last token on its own stream; its collectives must
        # finish before ours, or the two ranks' messages interleave differently.
        from mlx_lm.generate import generation_stream

        mx.synchronize(generation_stream)
    result = {"prefill": prefill, "decode": decode, "load_s": load_s,
              "peak_gb": [mx.get_peak_memory() / 1e9]}
    if group is not None:
        peaks = exchange(group, json.dumps(result["peak_gb"][0]).encode())
        result["peak_gb"] = [json.loads(p) for p in peaks]
        if group.rank() != 0:
            return
    print("RESULT " + json.dumps(result), flush=True)


def latency_worker() -> None:
    """Median time of one all_sum of a 896-value bfloat16 vector (Qwen2-0.5B's hidden size),
    in a chain of 50 as a forward pass issues them, and of a send/recv round trip."""
    group = mx.distributed.init()
    x = mx.ones((896,), dtype=mx.bfloat16)
    mx.eval(mx.distributed.all_sum(x))
    chains, trips = [], []
    for _ in range(20):
        tic = time.perf_counter()
        y = x
        for _ in range(50):
            y = mx.distributed.all_sum(y) * 0.5
        mx.eval(y)
        chains.append((time.perf_counter() - tic) / 50)
        tic = time.perf_counter()
        other = 1 - group.rank()
        if group.rank() == 0:
            mx.eval(mx.distributed.send(x, other))
            mx.eval(mx.distributed.recv_like(x, other))
        else:
            mx.eval(mx.distributed.recv_like(x, other))
            mx.eval(mx.distributed.send(x, other))
        trips.append(time.perf_counter() - tic)
    if group.rank() == 0:
        print("RESULT " + json.dumps({
            "all_sum_ms": statistics.median(chains) * 1e3,
            "all_sum_mean_ms": statistics.mean(chains) * 1e3,
            "round_trip_ms": statistics.median(trips) * 1e3,
            "round_trip_mean_ms": statistics.mean(trips) * 1e3}))


def measure(mode: str, path: Path, args: argparse.Namespace) -> dict:
    command = [str(Path(__file__).resolve()), "--worker", "--mode", mode, "--path", str(path),
               "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens)]
    if mode == "single":
        command = [sys.executable, *command]  # "latency" and the parallel modes: 2 ranks
    else:
        launch = Path(sys.executable).parent / "mlx.launch"
        command = [str(launch), "-n", "2", "--backend", "ring", "--python", sys.executable,
                   "--", *command]
    run = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{mode} run failed:\n{run.stdout}\n{run.stderr}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["Qwen2-0.5B", "small-MoE"],
                        choices=["Qwen2-0.5B", "small-MoE"])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per model")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--gen-tokens", type=int, default=16)
    parser.add_argument("--fit-table", action="store_true",
                        help="print the README's table of which sizes fit on 1/2/4 Macs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        latency_worker() if args.mode == "latency" else worker(args)
        return
    if args.fit_table:
        print(fit_table())
        return

    modes = ("single", "tensor", "pipeline")
    try:  # mlx-lm shards dense Qwen2 by tensor parallelism (not qwen2_moe): the comparison
        import mlx_lm  # noqa: F401
        dense_modes = (*modes, "mlx-lm-tensor")
    except ImportError:
        dense_modes = modes
    print(f"backend {mx.default_device()}, {args.prompt_tokens}-token prompt, "
          f"{args.gen_tokens} generated, {args.rounds} alternating rounds (medians)")
    latency = measure("latency", Path("."), args)
    print(f"2 ranks on this machine: one all_sum of 896 bfloat16 values "
          f"{latency['all_sum_ms']:.2f} ms median, {latency['all_sum_mean_ms']:.2f} ms mean; "
          f"send/recv round trip {latency['round_trip_ms']:.2f} ms median, "
          f"{latency['round_trip_mean_ms']:.2f} ms mean (a mean far above the median: "
          "stalls of the busy CPUs)")
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in write_checkpoints(Path(tmp), args.models).items():
            model_modes = dense_modes if name == "Qwen2-0.5B" else modes
            runs: dict[str, list[dict]] = {m: [] for m in model_modes}
            for _ in range(args.rounds):
                for mode in model_modes:
                    runs[mode].append(measure(mode, path, args))
            print(f"\n{name}:")
            base = {k: statistics.median(r[k] for r in runs["single"])
                    for k in ("prefill", "decode")}
            single_peak = statistics.median(r["peak_gb"][0] for r in runs["single"])
            for mode in model_modes:
                p = statistics.median(r["prefill"] for r in runs[mode])
                d = statistics.median(r["decode"] for r in runs[mode])
                peaks = [statistics.median(r["peak_gb"][i] for r in runs[mode])
                         for i in range(len(runs[mode][0]["peak_gb"]))]
                print(f"  {mode:<13} prefill {p:7.2f} tok/s ({p / base['prefill']:.2f}x) | "
                      f"decode {d:6.2f} tok/s ({d / base['decode']:.2f}x) | peak per rank "
                      + ", ".join(f"{g:.2f} GB ({g / single_peak:.2f}x)" for g in peaks))
            for mode, text in traffic_per_token(path).items():
                print(f"  {mode} sends per decoded token and rank: {text}")


if __name__ == "__main__":
    main()
