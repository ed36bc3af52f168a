"""`qwen2-mlx serve` as a subprocess on 127.0.0.1 and a free port, for the server tests.

The process is always ended (SIGTERM, then SIGKILL) when the `with` block or fixture ends,
and must then exit 0; every client call has a timeout, so a failing test never leaves a
server behind or hangs.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

START_TIMEOUT = 120
REQUEST_TIMEOUT = 60

_READY = re.compile(r"Serving .* at (http://127\.0\.0\.1:\d+)/v1")


class ServerProcess:
    """A running server: `url` (http://127.0.0.1:PORT), `base_url` (.../v1), its stderr."""

    def __init__(self, args: list[str], command: list[str] | None = None) -> None:
        command = command or [sys.executable, "-m", "qwen2_mlx.cli.main", "serve"]
        self.process = subprocess.Popen(
            [*command, *args, "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            cwd=Path(__file__).parent)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.url = ""
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(START_TIMEOUT) or not self.url:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)
            match = _READY.search(line)
            if match:
                self.url = match.group(1)
                self._ready.set()
        self._ready.set()  # the process ended

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def client(self, api_key: str = "none"):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=api_key, timeout=REQUEST_TIMEOUT,
                             max_retries=0)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        # SIGTERM is a clean shutdown: anything but 0 (an abort at exit) is a failure.
        assert self.process.returncode == 0, f"the server exited with {self.process.returncode}"


class Reply:
    """A raw HTTP response: status, headers (lower-case names), body."""

    def __init__(self, response: http.client.HTTPResponse, body: bytes) -> None:
        self.status_code = response.status
        self.headers = {k.lower(): v for k, v in response.getheaders()}
        self.content = body

    @property
    def text(self) -> str:
        return self.content.decode()

    def json(self):
        return json.loads(self.content)


def request(url: str, method: str, path: str, *, body=None,
            headers: dict | None = None, timeout: float = REQUEST_TIMEOUT) -> Reply:
    """One raw HTTP request to the server (stdlib only), for what the openai client hides.
    `body`: bytes, a dict (sent as JSON) or an iterator of bytes (sent chunked, with no
    Content-Length)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    chunked = body is not None and not isinstance(body, bytes)  # an iterator of bytes
    try:
        connection.request(method, path, body=body, headers=headers or {},
                           encode_chunked=chunked)
        response = connection.getresponse()
        return Reply(response, response.read())
    finally:
        connection.close()


def stream_lines(url: str, path: str, body: dict, headers: dict, timeout: float = 30):
    """The lines of a streaming (SSE) response, as they arrive."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request("POST", path, body=json.dumps(body).encode(),
                           headers={"Content-Type": "application/json", **headers})
        response = connection.getresponse()
        yield response.getheader("content-type")
        for line in response:
            yield line.decode().rstrip("\n")
    finally:
        connection.close()


def metric(text: str, name: str) -> float:
    """The value of an unlabelled metric in Prometheus text."""
    match = re.search(rf"^qwen2_mlx_{name} (\S+)$", text, re.MULTILINE)
    if match is None:
        raise KeyError(name)
    return float(match.group(1))


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
