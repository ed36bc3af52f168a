"""qwen2-mlx: Qwen2 language models on Apple Silicon with MLX.

    >>> from qwen2_mlx import load, generate
    >>> model, tokenizer = load("Qwen/Qwen2-0.5B-Instruct")
    >>> generate(model, tokenizer, [{"role": "user", "content": "Hi"}], max_tokens=32)
"""

from qwen2_mlx.cache import KVCache, ModelCache, load_cache, save_cache
from qwen2_mlx.chat_session import ChatResponse, ChatSession, ChatSessionBusyError
from qwen2_mlx.config import ModelConfig
from qwen2_mlx.generate import GenerationResponse, GenerationResult, generate, stream_generate
from qwen2_mlx.loading import load
from qwen2_mlx.memory import wired_limit
from qwen2_mlx.model import Model
from qwen2_mlx.output_parser import parse_tool_calls
from qwen2_mlx.sampling import SamplingParams
from qwen2_mlx.tools import ToolCall
from qwen2_mlx.validation import TokenIdError, check_token_ids

__all__ = [
    "ChatResponse",
    "ChatSession",
    "ChatSessionBusyError",
    "GenerationResponse",
    "GenerationResult",
    "KVCache",
    "Model",
    "ModelCache",
    "ModelConfig",
    "SamplingParams",
    "TokenIdError",
    "ToolCall",
    "check_token_ids",
    "generate",
    "load",
    "load_cache",
    "wired_limit",
    "parse_tool_calls",
    "save_cache",
    "stream_generate",
]
