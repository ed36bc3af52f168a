"""A local stand-in for the Hugging Face Hub, so download paths run without the internet.

`FakeHub` serves checkpoint directories on 127.0.0.1 with the endpoints huggingface_hub's
`snapshot_download` calls, with the Hub's status codes and `X-Error-Code` headers:

- GET  /api/models/{repo}[/revision/{rev}]      repo info (its commit sha and files)
- GET  /api/models/{repo}/tree/{rev}[/{path}]   recursive file listing (sizes, LFS sha256)
- HEAD/GET /{repo}/resolve/{rev}/{file}         file metadata / bytes (Range supported)

Access rules follow the real Hub: an unknown repo is 404 RepoNotFound; a private repo without
its token is 401 RepoNotFound (the Hub does not reveal it exists); a gated repo lists its files
to anyone but serves them only with an authorised token (401 GatedRepo without a token, 403
GatedRepo with a token that has not been granted access).

The `hub_server` fixture starts one and points huggingface_hub at it (HF_ENDPOINT for child
processes, the already-imported `huggingface_hub.constants` for this one), with a private
cache and no token.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest


@dataclass
class HubRepo:
    path: Path
    private: bool = False
    gated: bool = False
    token: str | None = None  # the token that may read a private/gated repo
    sha: str = ""

    def files(self) -> list[Path]:
        return sorted(p for p in self.path.rglob("*") if p.is_file())


@dataclass
class FakeHub:
    """A tiny Hub on 127.0.0.1. `add()` repos, read `requests` to see what was fetched."""

    repos: dict[str, HubRepo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    def add(self, repo_id: str, path: Path, *, private: bool = False, gated: bool = False,
            token: str | None = None) -> HubRepo:
        sha = hashlib.sha1(repo_id.encode()).hexdigest()
        repo = HubRepo(Path(path), private=private, gated=gated, token=token, sha=sha)
        self.repos[repo_id] = repo
        return repo

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def downloaded(self) -> list[str]:
        """Files fetched with GET from any repo (repo-relative paths)."""
        return [path.split("/resolve/", 1)[1].split("/", 1)[1]
                for method, path in self.requests if method == "GET" and "/resolve/" in path]

    def start(self) -> FakeHub:
        hub = self

        class Handler(_HubHandler):
            fake_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _HubHandler(BaseHTTPRequestHandler):
    fake_hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self._route(send_body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._route(send_body=True)

    # ------------------------------------------------------------------------- routing
    def _route(self, send_body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.fake_hub.requests.append((self.command, path))
        if path.startswith("/api/models/"):
            return self._api(path[len("/api/models/"):], send_body)
        if "/resolve/" in path:
            repo_id, rest = path.lstrip("/").split("/resolve/", 1)
            revision, _, filename = rest.partition("/")
            return self._resolve(repo_id, revision, filename, send_body)
        self._error(404, None, "Not Found", send_body)

    def _api(self, rest: str, send_body: bool) -> None:
        parts = rest.split("/")
        repo_id, tail = "/".join(parts[:2]), parts[2:]
        repo = self._visible_repo(repo_id, send_body)
        if repo is None:
            return
        if tail and tail[0] == "tree":
            if not self._revision_ok(tail[1] if len(tail) > 1 else "main", repo, send_body):
                return
            prefix = "/".join(tail[2:])
            entries = []
            for file in repo.files():
                rel = file.relative_to(repo.path).as_posix()
                if prefix and not rel.startswith(prefix + "/"):
                    continue
                data = file.read_bytes()
                entry = {"type": "file", "path": rel, "size": len(data),
                         "oid": hashlib.sha1(data).hexdigest()}
                if file.suffix == ".safetensors":
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                    "pointerSize": 134}
                entries.append(entry)
            return self._json(entries, send_body)
        if tail and tail[0] == "revision" and not self._revision_ok(tail[1], repo, send_body):
            return
        info = {
            "id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": repo.private,
            "gated": "manual" if repo.gated else False, "disabled": False, "tags": [],
            "siblings": [{"rfilename": f.relative_to(repo.path).as_posix()}
                         for f in repo.files()],
        }
        self._json(info, send_body)

    def _resolve(self, repo_id: str, revision: str, filename: str, send_body: bool) -> None:
        repo = self._visible_repo(repo_id, send_body)
        if repo is None or not self._revision_ok(revision, repo, send_body):
            return
        if repo.gated and not self._authorised(repo):
            if self._token() is None:
                return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. "
                                   "You must have access to it and be authenticated to access "
                                   "it. Please log in.", send_body)
            return self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and "
                               "you are not in the authorized list.", send_body)
        file = repo.path / filename
        if not file.is_file():
            return self._error(404, "EntryNotFound", f"{filename} does not exist", send_body)
        data = file.read_bytes()
        start = 0
        status = 200
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes="):
            start = int(range_header[len("bytes="):].split("-")[0] or 0)
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("X-Repo-Commit", repo.sha)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    # ------------------------------------------------------------------------- access rules
    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def _authorised(self, repo: HubRepo) -> bool:
        return repo.token is not None and self._token() == repo.token

    def _visible_repo(self, repo_id: str, send_body: bool) -> HubRepo | None:
        repo = self.fake_hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", send_body)
            return None
        if repo.private and not self._authorised(repo):
            self._error(401, "RepoNotFound", "Invalid username or password.", send_body)
            return None
        return repo

    def _revision_ok(self, revision: str, repo: HubRepo, send_body: bool) -> bool:
        if revision in ("main", repo.sha):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", send_body)
        return False

    # ------------------------------------------------------------------------- responses
    def _json(self, payload, send_body: bool) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, send_body: bool) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)


@pytest.fixture
def hub_server(tmp_path_factory, monkeypatch):
    """A running FakeHub that huggingface_hub (here and in child processes) talks to.

    The Hugging Face cache is private to the test and no token is set.
    """
    import huggingface_hub.constants as hf_constants

    hub = FakeHub().start()
    home = tmp_path_factory.mktemp("hf_home")
    cache = home / "hub"
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "5")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    try:
        yield hub
    finally:
        hub.stop()
