"""Golden logits and greedy tokens from PyTorch (transformers) for the full-size parity cases.

On a CUDA machine (PyTorch + transformers, no MLX needed, no network):

    python examples/cuda_parity/make_goldens.py

writes tests/data/goldens/<case>.cuda.json for every case in parity_cases.CASES; on a
CPU-only machine `--cpu` runs the same code on the CPU and writes <case>.cpu.json (the
stand-ins the test suite uses until CUDA goldens exist). For each case it rebuilds the
checkpoint from its seed on the CPU, then runs transformers in float32 and in bfloat16 on the
device (and, on CUDA, float32 on the CPU too, for PyTorch's own CUDA-vs-CPU difference):
one forward pass over the prompt, whose last 4 positions are summarised, and 16 greedy steps
through the KV cache. Existing goldens are kept (the case is skipped) unless --force, so a
run cut short by its time budget resumes where it stopped.

Examples:

    python examples/cuda_parity/make_goldens.py --cpu --cases sliding-window yarn
    python examples/cuda_parity/make_goldens.py --budget-s 540 --force
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import parity_cases as pc

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "tests" / "data" / "goldens"


def cpu_memory_needed(case: pc.Case) -> int:
    """Peak bytes of a CPU run, measured with torch 2.13 / transformers 5.24: 7.1 GB for the
    1.56 G-parameter qwen2-7b-2l (float32 weights plus load transients), 12.2 GB for the
    1.64 G-parameter MoE (transformers fuses the per-expert tensors while loading)."""
    per_parameter = 8 if case.config["model_type"] == "qwen2_moe" else 5
    return per_parameter * pc.parameter_count(case)


_START = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _START:6.1f}s] {message}", flush=True)


def load_reference(path: Path, dtype: torch.dtype, device: str):
    """transformers' model for `path` in `dtype` on `device`, eager attention (exact masks)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", **{dtype_kw: dtype})
    if model.dtype != dtype:
        raise RuntimeError(f"transformers loaded {model.dtype}, asked for {dtype}")
    return model.to(device).eval()


@torch.inference_mode()
def run_reference(model, prompt: list[int], positions: list[int], device: str) -> dict:
    """Logit rows at `positions` of the prompt, then N_GREEDY greedy tokens via the cache."""
    # transformers 5.2x renamed `past_key_values` (argument and output) to `cache`.
    cache = "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"
    ids = torch.tensor([prompt], device=device)
    out = model(input_ids=ids, use_cache=True)
    rows = out.logits[0, positions].double().cpu().numpy()
    past, last = getattr(out, cache), out.logits[0, -1]
    tokens, margins, logprobs = [], [], []
    for step in range(pc.N_GREEDY):
        row = last.double().cpu().numpy()
        tokens.append(int(row.argmax()))
        margins.append(pc.margin(row))
        logprobs.append(float(row[tokens[-1]] - pc.logsumexp(row)))
        if step + 1 < pc.N_GREEDY:
            nxt = torch.tensor([[tokens[-1]]], device=device)
            out = model(input_ids=nxt, use_cache=True, **{cache: past})
            past, last = getattr(out, cache), out.logits[0, -1]
    return {"rows": rows, "greedy": tokens, "margins": margins, "logprobs": logprobs}


def compare_block(run: dict, ref_rows: np.ndarray, ref_summary: list[dict], matrix) -> dict:
    """A run summarised at the reference's top ids, with its error against the reference."""
    ids = [s["top_ids"] for s in ref_summary]
    values = [run["rows"][i][ids[i]].tolist() for i in range(len(ids))]
    sketches = [pc.sketch(r, matrix).tolist() for r in run["rows"]]
    return {
        "values_at_float32_ids": values,
        "sketch": sketches,
        "logsumexp": [pc.logsumexp(r) for r in run["rows"]],
        "greedy": run["greedy"],
        "margins": run["margins"],
        "greedy_logprobs": run["logprobs"],
        "max_abs_error_vs_float32": float(
            max(np.abs(np.array(values[i]) - ref_summary[i]["top_values"]).max()
                for i in range(len(ids)))),
        "full_row_max_abs_error_vs_float32": float(np.abs(run["rows"] - ref_rows).max()),
        "full_row_rms_error_vs_float32": float(np.sqrt(np.mean((run["rows"] - ref_rows) ** 2))),
        "sketch_rms_error_vs_float32": pc.sketch_rms_error(
            sketches, [s["sketch"] for s in ref_summary]),
    }


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def make_golden(case: pc.Case, device: str, workdir: Path) -> dict:
    """Build `case`'s checkpoint, run the references, return the golden record."""
    import transformers

    timings = {}
    t = time.monotonic()
    ckpt = workdir / case.name
    log(f"{case.name}: building {pc.parameter_count(case) / 1e9:.2f} G parameters "
        f"from seed {case.seed}")
    sha = pc.build_checkpoint(case, ckpt, progress=log)
    timings["build_checkpoint_s"] = round(time.monotonic() - t, 1)
    prompt, positions = pc.prompt_ids(case), pc.selected_positions(case)
    matrix = pc.sketch_matrix(case.config["vocab_size"])

    t = time.monotonic()
    log(f"{case.name}: float32 on {device}")
    model = load_reference(ckpt, torch.float32, "cpu")
    cpu32 = run_reference(model, prompt, positions, "cpu")
    if device == "cuda":
        log(f"{case.name}: float32 on the CPU done (PyTorch's own reference), now on cuda")
        model = model.to(device)
        ref = run_reference(model, prompt, positions, device)
    else:
        ref, cpu32 = cpu32, None
    del model
    release_memory()
    timings["float32_s"] = round(time.monotonic() - t, 1)

    t = time.monotonic()
    log(f"{case.name}: bfloat16 on {device}")
    model = load_reference(ckpt, torch.bfloat16, device)
    bf16 = run_reference(model, prompt, positions, device)
    del model
    release_memory()
    timings["bfloat16_s"] = round(time.monotonic() - t, 1)
    shutil.rmtree(ckpt)

    summary = [pc.summarize(r, matrix) for r in ref["rows"]]
    golden = {
        "case": case.name,
        "stand_in": None if device == "cuda" else (
            "PyTorch on the CPU, not CUDA: a stand-in until make_goldens.py runs on a GPU"),
        "generated_by": "examples/cuda_parity/make_goldens.py" + (" --cpu" if device == "cpu"
                                                                  else ""),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "about": case.about,
        "reductions": case.reductions,
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda if device == "cuda" else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "bf16_reduced_precision_reduction": bool(
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction),
        "attn_implementation": "eager",
        "seed": case.seed,
        "checkpoint_dtype": "bfloat16",
        "checkpoint_sha256": sha,
        "parameters": pc.parameter_count(case),
        "config": case.config,
        "prompt": prompt,
        "positions": positions,
        "float32": {
            "top_ids": [s["top_ids"] for s in summary],
            "top_values": [s["top_values"] for s in summary],
            "sketch": [s["sketch"] for s in summary],
            "logsumexp": [s["logsumexp"] for s in summary],
            "std": [s["std"] for s in summary],
            "greedy": ref["greedy"],
            "margins": ref["margins"],
            "greedy_logprobs": ref["logprobs"],
        },
        "bfloat16": compare_block(bf16, ref["rows"], summary, matrix),
        "timings": timings,
    }
    if device == "cuda":
        golden["cpu_float32"] = compare_block(cpu32, ref["rows"], summary, matrix)
    return golden


def write_json(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n  python examples/cuda_parity/make_goldens.py            # on CUDA\n"
               "  python examples/cuda_parity/make_goldens.py --cpu --cases yarn",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true",
                        help="run on the CPU and write <case>.cpu.json stand-ins")
    # Smallest first, so a run cut short by its budget still covers the most cases.
    order = sorted(pc.CASES, key=lambda name: pc.parameter_count(pc.CASES[name]))
    parser.add_argument("--cases", nargs="+", choices=order, default=order, metavar="CASE",
                        help=f"cases to run (default all: {' '.join(order)})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="goldens directory")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where checkpoints are built (default a temporary directory)")
    parser.add_argument("--force", action="store_true", help="overwrite existing goldens")
    parser.add_argument("--budget-s", type=float, default=540,
                        help="start no new case after this many seconds (default 540)")
    args = parser.parse_args(argv)
    global _START
    _START = time.monotonic()  # the budget counts from this run's start, not the import

    if args.cpu:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32
        torch.backends.cudnn.allow_tf32 = False
    else:
        print("error: CUDA is not available; pass --cpu to write CPU stand-in goldens",
              file=sys.stderr)
        return 2
    import transformers

    transformers.utils.logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="qwen2_goldens_", dir=args.workdir))
    skipped: list[str] = []
    log(f"device {device_name(device)}; torch {torch.__version__}; out {args.out}")
    try:
        for name in [c for c in order if c in args.cases]:
            path = pc.golden_path(args.out, name, device)
            if path.exists() and not args.force:
                log(f"{name}: {path.name} exists, skipped (--force to redo)")
                continue
            need = cpu_memory_needed(pc.CASES[name])
            have = pc.available_memory()
            if have is not None and have < need:
                log(f"{name}: skipped, PyTorch needs about {need / 2**30:.0f} GiB of memory "
                    f"here, {have / 2**30:.0f} GiB available")
                skipped.append(name)
                continue
            if time.monotonic() - _START > args.budget_s:
                log(f"{name}: time budget of {args.budget_s:.0f}s spent; rerun to resume")
                return 3
            t = time.monotonic()
            golden = make_golden(pc.CASES[name], device, workdir)
            golden["timings"]["total_s"] = round(time.monotonic() - t, 1)
            write_json(path, golden)
            b = golden["bfloat16"]
            log(f"{name}: wrote {path.name} in {golden['timings']['total_s']}s; greedy "
                f"{golden['float32']['greedy'][:6]}...; bf16 vs fp32 max error "
                f"{b['max_abs_error_vs_float32']:.3g} "
                f"(logit std {golden['float32']['std'][0]:.3g})")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if skipped:
        log(f"done, except {' '.join(skipped)} (not enough memory)")
        return 4
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
