"""qwen2-mlx."""
