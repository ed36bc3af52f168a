"""One rank of the parallel tests, run by `mlx.launch -n 2 --backend ring` (see test_parallel.py).

    python parallel_worker.py cases SPEC.json     every case of SPEC in one launch
    python parallel_worker.py forever SPEC.json   generate until killed (rank-failure tests)

`cases`: for each case, every rank loads the model with `parallel=<mode>`; rank 0 saves the
sharded logits of the case's prompt and the greedy tokens of a cached generation (chunked
prefill), and every rank reports the error it got, if any. Rank 0 writes everything to the
spec's `out` JSON; pytest compares it with the single-process model. A case with
`memory: true` also records every rank's peak memory and, on rank 0, the single-process peak.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen2_mlx import load
from qwen2_mlx.generate import generate_step
from qwen2_mlx.loader import load_model
from qwen2_mlx.parallel import ParallelError, RankWatchdog
from qwen2_mlx.parallel.group import exchange
from qwen2_mlx.parallel.launch import rank_failure_message
from qwen2_mlx.sampling import SamplingParams


def greedy_steps(model, prompt: list[int], n: int, prefill_step: int, kv_bits=None):
    cache = model.make_cache(kv_bits=kv_bits)
    steps = generate_step(mx.array(prompt, dtype=mx.uint32), model, sampling=SamplingParams(),
                          cache=cache, max_tokens=n, prefill_step_size=prefill_step)
    return (token for token, _ in steps)


def greedy(model, prompt: list[int], n: int, prefill_step: int, kv_bits=None) -> list[int]:
    return list(greedy_steps(model, prompt, n, prefill_step, kv_bits))


def run_case(case: dict, rank: int, group, out_dir: Path) -> dict:
    path = case.get("rank_paths", {}).get(str(rank), case["path"])
    result: dict = {}
    if case.get("memory"):
        mx.clear_cache()
        mx.reset_peak_memory()
    try:
        model, _ = load(path, parallel=case["mode"], adapter_path=case.get("adapter"),
                        group=group)
    except ParallelError as e:
        result["error"] = str(e)
    else:
        logits = model(mx.array([case["prompt"]]))
        mx.eval(logits)  # on every rank: the ranks must run the same collectives in order
        tokens = greedy(model, case["prompt"], case["gen"], case["prefill_step"],
                        case.get("kv_bits"))
        if rank == 0:
            np.save(out_dir / f"{case['name']}.npy", np.array(logits.astype(mx.float32)))
        result["tokens"] = tokens
        if case.get("memory"):
            result["peak"] = mx.get_peak_memory()
        del model, logits
    gc.collect()
    mx.clear_cache()
    if case.get("memory") and rank == 0:
        mx.reset_peak_memory()
        whole = load_model(Path(case["path"]))
        mx.eval(whole(mx.array([case["prompt"]])))
        greedy(whole, case["prompt"], case["gen"], case["prefill_step"])
        result["single_peak"] = mx.get_peak_memory()
        del whole
        gc.collect()
        mx.clear_cache()
    # Every rank's result, so pytest sees that all ranks agree.
    return [json.loads(r) for r in exchange(group, json.dumps(result).encode())]


def run_cases(spec: dict) -> None:
    group = mx.distributed.init()
    out_dir = Path(spec["out"]).parent
    results = {case["name"]: run_case(case, group.rank(), group, out_dir)
               for case in spec["cases"]}
    if group.rank() == 0:
        Path(spec["out"]).write_text(json.dumps(results))


def run_forever(spec: dict) -> None:
    """Generate without end (EOS ignored) inside the rank watchdog, as `qwen2-mlx generate
    --parallel` does, printing each token on rank 0; exit 1 with one line on a rank failure.

    `spec["fail"]` = {"rank", "after", "how"}: that rank kills itself (SIGKILL) or freezes
    (SIGSTOP: connections open, no thread runs) after that many tokens.
    """
    group = mx.distributed.init()
    model, _ = load(spec["path"], parallel=spec["mode"], group=group)
    fail = spec["fail"]
    try:
        with RankWatchdog(spec.get("rank_timeout")):
            for n, token in enumerate(greedy_steps(model, spec["prompt"], 10**6, 64)):
                if group.rank() == 0:
                    print(token, flush=True)
                if group.rank() == fail["rank"] and n == fail["after"]:
                    # A freeze stops every thread (its own watchdog too), sockets left open.
                    stop = signal.SIGKILL if fail["how"] == "kill" else signal.SIGSTOP
                    os.kill(os.getpid(), stop)
    except RuntimeError as e:
        message = rank_failure_message(e)
        if message is None:
            raise
        print(message, file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    command, spec_file = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_file).read_text())
    {"cases": run_cases, "forever": run_forever}[command](spec)
