"""Long-context speed and memory: Dual Chunk Attention decode at several context lengths.

A small random model with Qwen2-0.5B's attention geometry (14 query heads over 2 KV heads,
head_dim 64) runs DCA through the pure-MLX path. For each context length the KV cache is
filled with that many positions (random keys and values, written as DCA writes them), then
decoding is timed; a stepwise prefill is also timed at the lengths given by --prefill.

    python examples/bench_long_context.py --contexts 4096 16384 65536 --prefill 4096

Prefill cost grows with the square of the length (every query sees every older chunk), so
on a CPU without a fast BLAS the long prefills take hours; the decode figures use a
synthetic cache for that reason and are what a user sees once the prompt is in the cache.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

from qwen2_mlx.cache import kv_cache_bytes_per_token
from qwen2_mlx.config import ModelConfig
from qwen2_mlx.model import Model


def small_model(layers: int, chunk_size: int, local_size: int) -> Model:
    config = ModelConfig(
        hidden_size=896, intermediate_size=2048, num_hidden_layers=layers,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=32000,
        max_position_embeddings=32768, rope_theta=1e6,
        dual_chunk_attention_config={"chunk_size": chunk_size, "local_size": local_size,
                                     "original_max_position_embeddings": chunk_size},
    )
    model = Model(config)
    mx.eval(model.parameters())
    return model


def filled_cache(model: Model, n: int, kv_bits: int | None):
    """Caches holding `n` positions of random keys/values (shape and dtype as DCA writes)."""
    cfg = model.config
    caches = model.make_cache(kv_bits=kv_bits)
    for cache in caches:
        cache.reserve(n + 64)
        for start in range(0, n, 8192):
            size = min(8192, n - start)
            shape = (1, cfg.num_key_value_heads, size, cfg.head_dim)
            cache.update_and_fetch(mx.random.normal(shape), mx.random.normal(shape))
            mx.eval([c for c in (cache.keys, cache.values)])
    return caches


def time_decode(model: Model, caches, steps: int) -> float:
    token = mx.array([[1]])
    mx.eval(model(token, cache=caches))  # warm-up
    tic = time.perf_counter()
    for _ in range(steps):
        logits = model(token, cache=caches)
        token = mx.argmax(logits[:, -1:], axis=-1)
        mx.eval(token)
    return steps / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--prefill", type=int, nargs="*", default=[4096])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=8192)
    parser.add_argument("--local-size", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--kv-bits", type=int, default=None, choices=[8])
    args = parser.parse_args()

    model = small_model(args.layers, args.chunk_size, args.local_size)
    cfg = model.config
    per_token = kv_cache_bytes_per_token(args.layers, cfg.num_key_value_heads, cfg.head_dim,
                                         bits=args.kv_bits or 32)  # the model runs in float32
    print(f"DCA chunk {args.chunk_size}, local {args.local_size}; {args.layers} layers, "
          f"14/2 heads, head_dim 64; backend {mx.default_device()}; kv_bits {args.kv_bits}")
    for n in args.prefill:
        ids = (mx.arange(n) % 31000)[None]
        caches = model.make_cache(kv_bits=args.kv_bits)
        for c in caches:
            c.prompt_length = n
            c.reserve(n)
        mx.reset_peak_memory()
        tic = time.perf_counter()
        for i in range(0, n, 512):
            mx.eval(model(ids[:, i : i + 512], cache=caches)[:, -1])
        seconds = time.perf_counter() - tic
        print(f"prefill {n:>6} tokens: {n / seconds:8.1f} tok/s, "
              f"peak {mx.get_peak_memory() / 1e9:.3f} GB")
    for n in args.contexts:
        mx.clear_cache()
        caches = filled_cache(model, n, args.kv_bits)
        mx.reset_peak_memory()
        tps = time_decode(model, caches, args.decode_steps)
        print(f"decode at {n:>6} context: {tps:7.2f} tok/s, peak {mx.get_peak_memory() / 1e9:.3f}"
              f" GB (its KV cache: {per_token * n / 1e9:.3f} GB)")
        del caches


if __name__ == "__main__":
    main()
