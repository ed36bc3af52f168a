"""Attention and matmul kernels for qwen2-mlx.

Each kernel sits beside its pure-MLX reference behind one dispatch function that the model
calls; the reference runs wherever Metal does not (Linux, CI). Nothing here imports the model.
"""
