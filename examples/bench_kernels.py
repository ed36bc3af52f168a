"""Benchmark qwen2-mlx's Metal kernels against the MLX built-ins they replace.

    python examples/bench_kernels.py                          # all kernels, bfloat16
    python examples/bench_kernels.py --only attention --context 4096 32768 --dtype float16
    python examples/bench_kernels.py --models Qwen2-0.5B Qwen2-7B --only qmv swiglu

For each kernel and each of Qwen2's real decode shapes (0.5B, 1.5B, 7B, 72B) it prints the
time of our kernel, the time of the MLX built-in (`mx.fast.scaled_dot_product_attention`,
`mx.quantized_matmul`, or the pure-MLX reference for the quantized KV cache and Dual Chunk
Attention), their ratio (built-in / ours: above 1 means the kernel is faster), the largest
difference between the two outputs (relative to the output's scale), and whether the
dispatch uses the kernel for that shape. Kernels are called directly, so shapes where the
dispatch keeps MLX's kernel (e.g. quantized matmuls that `qmv_fast` takes) are measured too.

Without Metal (Linux, CI) the script says so, runs each reference path once on small
shapes (so you can see it works) and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from qwen2_mlx.metal_kernels.dispatch import metal_available
from qwen2_mlx.metal_kernels.dual_chunk_attention import (
    DualChunkConfig,
    dual_chunk_attention_kernel,
    dual_chunk_attention_reference,
)
from qwen2_mlx.metal_kernels.gqa_decode import gqa_decode
from qwen2_mlx.metal_kernels.quantized import qmv_fast_takes
from qwen2_mlx.metal_kernels.quantized_matvec import quantized_matvec, quantized_swiglu_matvec
from qwen2_mlx.presets import preset

MODELS = ("Qwen2-0.5B", "Qwen2-1.5B", "Qwen2-7B", "Qwen2-72B")
SECTIONS = ("attention", "quantized-kv", "qmv", "swiglu", "dca")
# Qwen2.5-1M's DCA geometry scaled to the spec's defaults (long-context.md §2).
DCA_CONFIG = DualChunkConfig(chunk_size=8192, local_size=1024,
                             original_max_position_embeddings=32768)


def median_seconds(fn: Callable[[], mx.array], repeats: int, inner: int) -> float:
    """Median over `repeats` of the time per call, `inner` independent calls per eval (so the
    per-eval overhead is shared the same way by both sides)."""
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval([fn() for _ in range(inner)])
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def rel_diff(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.max(mx.abs(a - b)) / mx.maximum(mx.max(mx.abs(b)), 1e-30)).item()


class Table:
    def __init__(self, title: str, builtin: str) -> None:
        print(f"\n== {title} (built-in: {builtin})")
        print(f"{'model':<12} {'shape':<34} {'ours us':>9} {'built-in us':>12} {'ratio':>7} "
              f"{'max diff':>9}  dispatch")

    def row(self, model: str, shape: str, ours: float, builtin: float, diff: float,
            used: bool) -> None:
        print(f"{model:<12} {shape:<34} {ours * 1e6:>9.1f} {builtin * 1e6:>12.1f} "
              f"{builtin / ours:>6.2f}x {diff:>9.1e}  {'kernel' if used else 'built-in'}",
              flush=True)


def heads(name: str) -> tuple[int, int, int]:
    cfg = preset(name)
    return cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim


def bench_attention(args, quantized: bool) -> None:
    title = "GQA decode attention" + (", 8-bit KV cache" if quantized else "")
    table = Table(title, "dequantize + mx.fast.scaled_dot_product_attention" if quantized
                  else "mx.fast.scaled_dot_product_attention")
    for name in args.models:
        q_heads, kv_heads, dim = heads(name)
        for n in args.context:
            kq, kk, kv = mx.random.split(mx.random.key(n), 3)
            q = mx.random.normal((1, q_heads, 1, dim), key=kq).astype(args.dtype)
            k = mx.random.normal((1, kv_heads, n, dim), key=kk).astype(args.dtype)
            v = mx.random.normal((1, kv_heads, n, dim), key=kv).astype(args.dtype)
            scale = dim**-0.5
            q_rows = q.reshape(q_heads, 1, dim)
            if quantized:
                kqt = mx.quantize(k, group_size=64, bits=8)
                vqt = mx.quantize(v, group_size=64, bits=8)
                mx.eval(kqt, vqt)

                def ours(kqt=kqt, vqt=vqt, q_rows=q_rows, scale=scale):
                    return gqa_decode("metal", q_rows, kqt, vqt, scale=scale,
                                      out_dtype=args.dtype, bits=8, group_size=64)

                def builtin(kqt=kqt, vqt=vqt, q=q, scale=scale):
                    kd = mx.dequantize(*kqt, group_size=64, bits=8).astype(args.dtype)
                    vd = mx.dequantize(*vqt, group_size=64, bits=8).astype(args.dtype)
                    return mx.fast.scaled_dot_product_attention(q, kd, vd, scale=scale)
            else:
                mx.eval(q, k, v)

                def ours(k=k, v=v, q_rows=q_rows, scale=scale):
                    return gqa_decode("metal", q_rows, k, v, scale=scale, out_dtype=args.dtype)

                def builtin(k=k, v=v, q=q, scale=scale):
                    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)

            diff = rel_diff(ours().reshape(1, q_heads, 1, dim), builtin())
            t_ours = median_seconds(ours, args.repeats, args.inner)
            t_builtin = median_seconds(builtin, args.repeats, args.inner)
            table.row(name, f"{q_heads}/{kv_heads} heads d{dim} N={n}", t_ours, t_builtin,
                      diff, True)


def projections(name: str) -> list[tuple[str, int, int]]:
    """(projection, K, N) of one decoder layer and the LM head (72B's 2.5 GB head skipped)."""
    cfg = preset(name)
    q_out = cfg.num_attention_heads * cfg.head_dim
    kv_out = cfg.num_key_value_heads * cfg.head_dim
    rows = [("q_proj", cfg.hidden_size, q_out), ("k/v_proj", cfg.hidden_size, kv_out),
            ("o_proj", q_out, cfg.hidden_size), ("gate/up", cfg.hidden_size,
                                                  cfg.intermediate_size),
            ("down_proj", cfg.intermediate_size, cfg.hidden_size)]
    if cfg.hidden_size * cfg.vocab_size < 1e9:
        rows.append(("lm_head", cfg.hidden_size, cfg.vocab_size))
    return rows


def random_quantized(n: int, k: int, bits: int, dtype: mx.Dtype, seed: int):
    w = mx.random.uniform(-0.05, 0.05, (n, k), key=mx.random.key(seed)).astype(dtype)
    q = mx.quantize(w, group_size=64, bits=bits)
    mx.eval(q)
    return tuple(q)


def bench_qmv(args) -> None:
    table = Table("Quantized matvec (group size 64)", "mx.quantized_matmul")
    for name in args.models:
        for bits in (4, 8):
            for proj, k, n in projections(name):
                w = random_quantized(n, k, bits, args.dtype, seed=k + n)
                x = mx.random.normal((1, k), key=mx.random.key(k)).astype(args.dtype)

                def ours(x=x, w=w, bits=bits):
                    return quantized_matvec("metal", x, *w, group_size=64, bits=bits)

                def builtin(x=x, w=w, bits=bits):
                    return mx.quantized_matmul(x, *w, transpose=True, group_size=64, bits=bits)

                diff = rel_diff(ours(), builtin())
                table.row(name, f"{proj} {bits}-bit K={k} N={n}",
                          median_seconds(ours, args.repeats, args.inner),
                          median_seconds(builtin, args.repeats, args.inner), diff,
                          not qmv_fast_takes(k, n, bits))
                del w


def bench_swiglu(args) -> None:
    table = Table("Fused gate/up/SiLU matvec (group size 64)",
                  "silu(quantized_matmul(gate)) * quantized_matmul(up)")
    for name in args.models:
        cfg = preset(name)
        k, n = cfg.hidden_size, cfg.intermediate_size
        for bits in (4, 8):
            gate = random_quantized(n, k, bits, args.dtype, seed=1)
            up = random_quantized(n, k, bits, args.dtype, seed=2)
            x = mx.random.normal((1, k), key=mx.random.key(3)).astype(args.dtype)

            def ours(x=x, gate=gate, up=up, bits=bits):
                return quantized_swiglu_matvec("metal", x, gate, up, group_size=64, bits=bits)

            def builtin(x=x, gate=gate, up=up, bits=bits):
                g = mx.quantized_matmul(x, *gate, transpose=True, group_size=64, bits=bits)
                u = mx.quantized_matmul(x, *up, transpose=True, group_size=64, bits=bits)
                return nn.silu(g) * u

            diff = rel_diff(ours(), builtin())
            table.row(name, f"{bits}-bit K={k} N={n}",
                      median_seconds(ours, args.repeats, args.inner),
                      median_seconds(builtin, args.repeats, args.inner), diff,
                      not qmv_fast_takes(k, n, bits))


def bench_dca(args) -> None:
    table = Table(f"Dual Chunk Attention (C={DCA_CONFIG.chunk_size}, W={DCA_CONFIG.local_size})",
                  "pure-MLX dual_chunk_attention_reference")
    for name in args.models:
        q_heads, kv_heads, dim = heads(name)
        inv_freq = 1.0 / (1e6 ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim))
        cases = [(1, n) for n in args.context] + [(n, n) for n in args.prefill]
        for q_len, n in cases:
            kq, kk, kv = mx.random.split(mx.random.key(n + q_len), 3)
            q = mx.random.normal((1, q_heads, q_len, dim), key=kq).astype(args.dtype)
            k = mx.random.normal((1, kv_heads, n, dim), key=kk).astype(args.dtype)
            v = mx.random.normal((1, kv_heads, n, dim), key=kv).astype(args.dtype)
            mx.eval(q, k, v)
            common = dict(q_start=n - q_len, cfg=DCA_CONFIG, inv_freq=inv_freq,
                          scale=dim**-0.5, q_temperature=DCA_CONFIG.temperature(n))

            def ours(q=q, k=k, v=v, common=common):
                return dual_chunk_attention_kernel("metal", q, k, v, **common)

            def builtin(q=q, k=k, v=v, common=common):
                return dual_chunk_attention_reference(q, k, v, **common)

            inner = args.inner if q_len == 1 else 1
            diff = rel_diff(ours(), builtin())
            kind = "decode" if q_len == 1 else "prefill"
            table.row(name, f"{kind} {q_heads}/{kv_heads} d{dim} N={n}",
                      median_seconds(ours, args.repeats, inner),
                      median_seconds(builtin, args.repeats, inner), diff, True)


def run_references_once() -> None:
    """Each reference path on small shapes: proves the script and the package work here."""
    q = mx.random.normal((1, 14, 1, 64))
    k = mx.random.normal((1, 2, 128, 64))
    mx.eval(mx.fast.scaled_dot_product_attention(q, k, k, scale=0.125))
    kq = mx.quantize(k, group_size=64, bits=8)
    mx.eval(mx.fast.scaled_dot_product_attention(
        q, mx.dequantize(*kq, group_size=64, bits=8), k, scale=0.125))
    w = random_quantized(64, 896, 4, mx.float32, seed=0)
    x = mx.random.normal((1, 896))
    g = mx.quantized_matmul(x, *w, transpose=True, group_size=64, bits=4)
    mx.eval(nn.silu(g) * g)
    inv_freq = 1.0 / (1e6 ** (mx.arange(0, 64, 2, dtype=mx.float32) / 64))
    mx.eval(dual_chunk_attention_reference(
        mx.random.normal((1, 14, 8, 64)), k, k, q_start=120, cfg=DualChunkConfig(32, 8),
        inv_freq=inv_freq, scale=0.125))
    print("reference paths: SDPA, dequantized-cache SDPA, quantized_matmul + SiLU and Dual "
          "Chunk Attention all ran.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--only", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--context", nargs="+", type=int, default=[1024, 8192, 32768],
                        help="KV cache lengths for the decode benchmarks")
    parser.add_argument("--prefill", nargs="+", type=int, default=[4096],
                        help="prompt lengths for the DCA prefill benchmark")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inner", type=int, default=20, help="calls per evaluation")
    args = parser.parse_args(argv)
    args.dtype = getattr(mx, args.dtype)

    if not metal_available():
        print("Metal is not available on this machine, so the kernels cannot be timed: run "
              "this script on an Apple Silicon Mac. Running the reference paths once instead.")
        run_references_once()
        return 0
    info_fn = getattr(mx, "device_info", None) or getattr(mx.metal, "device_info", None)
    info = info_fn() if info_fn else {}
    print(f"device: {info.get('device_name', 'Metal GPU')}, MLX {mx.__version__}, "
          f"dtype {args.dtype}")
    sections = {"attention": lambda: bench_attention(args, quantized=False),
                "quantized-kv": lambda: bench_attention(args, quantized=True),
                "qmv": lambda: bench_qmv(args), "swiglu": lambda: bench_swiglu(args),
                "dca": lambda: bench_dca(args)}
    for section in args.only:
        sections[section]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
