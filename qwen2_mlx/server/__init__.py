"""`qwen2-mlx serve`: an OpenAI-compatible HTTP server with continuous batching and a prefix
cache, safe by default.

Modules, in the order a request meets them: `runner` (socket, uvicorn, signals), `app` (the
ASGI routes, auth, CORS, limits, SSE), `protocol` (request fields and their checks),
`responses` (OpenAI response shapes), `jobs` (what the engine is handed and sends back),
`engine` (the one thread that owns MLX: scheduling, prefill, batched decoding), `metrics`.
The HTTP modules need the optional extra ``pip install "qwen2-mlx[server]"``; the engine does
not.

Embedding the server in an application::

    from qwen2_mlx import load
    from qwen2_mlx.server.engine import Engine, EngineSettings
    from qwen2_mlx.server.app import ServerConfig
    from qwen2_mlx.server.runner import bind_socket, serve

    engine = Engine(lambda: load("Qwen/Qwen2-0.5B-Instruct"), EngineSettings())
    engine.start()
    serve(engine, ServerConfig(model_id="qwen2-0.5b", api_key="secret"),
          bind_socket("127.0.0.1", 8080))
"""

SERVER_EXTRA = 'pip install "qwen2-mlx[server]"'


def missing_server_extra() -> str | None:
    """None when the server's dependencies import, else the one-line fix."""
    import importlib.util

    missing = [name for name in ("starlette", "uvicorn", "pydantic")
               if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"qwen2-mlx serve needs {', '.join(missing)}: install the server extra with "
            f"{SERVER_EXTRA}")
