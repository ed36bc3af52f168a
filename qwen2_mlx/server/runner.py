"""Running the server: bind the socket, start uvicorn, shut down gracefully on SIGTERM/Ctrl-C.

On SIGTERM or SIGINT the server stops accepting connections, refuses requests that have not
started (503), lets running sequences finish for up to `shutdown_timeout` seconds less a
margin, then ends them with finish_reason "length" (so every client still gets a complete
response), stops the engine and returns: the process exits 0. A second Ctrl-C quits at once.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import sys

import uvicorn

from qwen2_mlx.server.app import ServerConfig, create_app
from qwen2_mlx.server.engine import Engine


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free port."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, which also tells the engine to drain when a signal arrives."""

    def __init__(self, config: uvicorn.Config, engine: Engine, grace: float) -> None:
        super().__init__(config)
        self.engine, self.grace = engine, grace

    def handle_exit(self, sig, frame) -> None:
        self.engine.drain(self.grace)
        super().handle_exit(sig, frame)


def serve(engine: Engine, config: ServerConfig, sock: socket.socket, *,
          shutdown_timeout: float = 30.0, max_connections: int = 256,
          log_level: str = "warning") -> None:
    """Serve `engine` (started) on the listening socket `sock` until a signal stops it."""
    app = create_app(engine, config)
    uv_config = uvicorn.Config(
        app, log_level=log_level, access_log=log_level in ("info", "debug"), lifespan="off",
        timeout_keep_alive=5, timeout_graceful_shutdown=max(1, int(shutdown_timeout)),
        limit_concurrency=max_connections, h11_max_incomplete_event_size=64 * 1024,
        server_header=False)
    server = _Server(uv_config, engine, grace=max(0.0, shutdown_timeout - 1.0))
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers in
    # place (they are what it restores) that re-raise is a no-op and the process exits 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.stop()
        sock.close()
        print("qwen2-mlx serve: stopped", file=sys.stderr, flush=True)
