"""The HTTP layer: an ASGI (Starlette) application in front of the engine.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models (and /v1/models/{id}),
GET /health (no key needed) and GET /metrics (Prometheus text).

Handlers run on the event loop and never call MLX. A request is read with a size limit and a
time limit, validated, rendered and tokenized on a worker thread, and handed to the engine as a
`Job`; the engine's events come back through `loop.call_soon_threadsafe` into the request's
own asyncio queue. A client that disconnects, streaming or not, has its job cancelled at once
(a watcher waits for the ASGI disconnect message alongside the response), so the engine drops
its sequence before the next forward pass. A streaming response sends an SSE comment every
`keepalive_seconds` while nothing else is sent (a long prefill), so proxies and clients keep
the connection open.

Safe by default (see `ServerConfig`): an API key when one is set (`Authorization: Bearer`),
CORS headers only for the listed origins, a body limit (413), a bounded queue (429 with
Retry-After), and the request's `model` chooses only among the names the server was started
with (404 otherwise); nothing a request says makes the server read a file or download.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from qwen2_mlx.server.engine import Engine, QueueFullError, ShuttingDownError
from qwen2_mlx.server.errors import APIError, model_not_found
from qwen2_mlx.server.jobs import ChoiceEvent, Job, JobDone, JobError
from qwen2_mlx.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelInfo,
    chat_prompt,
    choice_settings,
    completion_prompts,
    parse_request,
)
from qwen2_mlx.server.responses import ChatOutput, CompletionOutput

COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass
class ServerConfig:
    """The HTTP layer's settings.

    model_id: the name /v1/models lists; `aliases` are other names requests may use.
    api_key: required as ``Authorization: Bearer KEY`` on every route but /health (None: open).
    cors_origins: origins a browser may call from (none: no CORS headers at all).
    max_body_bytes: larger request bodies get 413.
    body_timeout: seconds a client may take to send its body (then 408).
    keepalive_seconds: SSE comment interval while a stream has nothing to send.
    default_max_tokens: a request's limit when it gives none (None: the rest of the context
        for chat, 16 tokens for completions, as OpenAI).
    processor_factories: functions of the request (a dict) returning a logits processor or
        None, applied to each choice: a hook for applications that embed the server.
    """

    model_id: str
    aliases: tuple[str, ...] = ()
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 4 << 20
    body_timeout: float = 30.0
    keepalive_seconds: float = 10.0
    default_max_tokens: int | None = None
    processor_factories: tuple[Callable, ...] = field(default_factory=tuple)


def create_app(engine: Engine, config: ServerConfig) -> Starlette:
    """The ASGI application serving `engine` (started: its model is loaded)."""
    server = _Handlers(engine, config)
    routes = [
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", server.model, methods=["GET"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
    ]
    middleware = []
    if config.cors_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"]))
    if config.api_key:
        middleware.append(Middleware(BearerAuth, api_key=config.api_key))
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={HTTPException: _http_error, APIError: _api_error,
                                         Exception: _internal_error})


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = (f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405)
               else exc.detail)
    return APIError(exc.status_code, message, type=kind).response()


async def _api_error(request: Request, exc: APIError) -> Response:
    return exc.response()


async def _internal_error(request: Request, exc: Exception) -> Response:
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()


class BearerAuth:
    """ASGI middleware: 401 unless ``Authorization: Bearer <api_key>`` (compared in constant
    time); /health stays open for load balancers and readiness checks."""

    open_paths = frozenset({"/health"})

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "Incorrect or missing API key: send the header "
                                 "'Authorization: Bearer <key>' with the server's key.",
                                 code="invalid_api_key",
                                 headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Handlers:
    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine, self.config = engine, config
        model = engine.model
        self.info = ModelInfo(engine.tokenizer, model.config.vocab_size,
                              model.config.context_length, engine.max_choices,
                              config.default_max_tokens, config.processor_factories)
        self.names = {config.model_id, *config.aliases}

    # --- simple routes
    async def health(self, request: Request) -> Response:
        if self.engine.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        counts = self.engine.counts()
        cache = self.engine.prefix_cache

        def gauges() -> dict[str, tuple[str, float]]:
            return {
                "active_sequences": ("Sequences decoding now.", counts["active"]),
                "prefilling_prompts": ("Prompts being prefilled now.", counts["prefilling"]),
                "queued_requests": ("Requests waiting to start.", counts["waiting"]),
                "prompt_cache_bytes": ("Bytes held by the prefix cache.", cache.nbytes),
                "prompt_cache_entries": ("Sequences held by the prefix cache.", len(cache)),
                "prompt_cache_hits": ("Prefix-cache lookups that found a prefix (total).",
                                      cache.hits),
                "prompt_cache_evictions": ("Prefix-cache entries evicted (total).",
                                           cache.evictions),
            }

        text = self.engine.metrics.render(gauges)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def _model_object(self) -> dict:
        return {"id": self.config.model_id, "object": "model", "created": 0,
                "owned_by": "qwen2-mlx"}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_object()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model_id"]
        if name not in self.names:
            raise model_not_found(name)
        return JSONResponse(self._model_object())

    # --- generation
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completions")

    async def _generate(self, request: Request, endpoint: str) -> Response:
        try:
            body = await self._read_body(request)
            kind = ChatCompletionRequest if endpoint == "chat" else CompletionRequest
            req = parse_request(kind, body)
            if req.model is not None and req.model not in self.names:
                raise model_not_found(req.model)
            job, output = await run_in_threadpool(self._build, req, endpoint)
        except APIError as e:
            self.engine.metrics.count_request(endpoint, e.status)
            return e.response()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event) -> None:  # on the engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is closed: nobody is listening
                job.cancelled = True

        job.emit = emit
        try:
            self.engine.submit(job)
        except QueueFullError as e:
            self.engine.metrics.count_request(endpoint, 429)
            return APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded",
                            headers={"Retry-After": str(e.retry_after)}).response()
        except ShuttingDownError as e:
            self.engine.metrics.count_request(endpoint, 503)
            return APIError(503, str(e), type="server_error",
                            code="service_unavailable").response()
        if req.stream:
            self.engine.metrics.count_request(endpoint, 200)
            return EventStream(self._stream(job, events, output), on_close=self._closer(job))
        return await self._collect(request, job, events, output, endpoint)

    def _build(self, req, endpoint: str) -> tuple[Job, ChatOutput | CompletionOutput]:
        """Render, tokenize and check a request (on a worker thread: no MLX here)."""
        info = self.info
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if endpoint == "chat":
            ids, tools, prefix = chat_prompt(req, info)
            prompts = [ids]
            top = req.top_logprobs or 0
            settings = choice_settings(req, prompts, info, logprobs=top if req.logprobs else None,
                                       max_tokens=req.max_completion_tokens or req.max_tokens,
                                       tools=tools, tool_prefix=prefix)
            output = ChatOutput(self.config.model_id, req.n, info.tokenizer, include_usage,
                                logprobs=req.logprobs)
        else:
            if req.suffix is not None:
                raise APIError(400, "suffix is not supported", param="suffix",
                               code="unsupported_value")
            if req.best_of is not None and req.best_of != req.n:
                raise APIError(400, "best_of must equal n (no server-side ranking)",
                               param="best_of", code="unsupported_value")
            prompts = completion_prompts(req, info)
            # OpenAI's default for (legacy) completions is 16 tokens; chat runs to the end.
            settings = choice_settings(req, prompts, info, logprobs=req.logprobs,
                                       max_tokens=req.max_tokens or self.config
                                       .default_max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS)
            echo = ([info.tokenizer.decode(p) for p in prompts for _ in range(req.n)]
                    if req.echo else None)
            output = CompletionOutput(self.config.model_id, len(prompts) * req.n,
                                      info.tokenizer, include_usage, logprobs=req.logprobs,
                                      echo=echo)
        return Job(prompts, req.n, settings, emit=lambda event: None), output

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)

        async def read() -> bytes:
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise _too_large(limit)
            return bytes(body)

        reader = asyncio.ensure_future(read())
        try:
            done, _ = await asyncio.wait({reader}, timeout=self.config.body_timeout)
        finally:
            if not reader.done():
                reader.cancel()
        if reader not in done:
            raise APIError(408, f"the request body did not arrive within "
                           f"{self.config.body_timeout:g} s")
        return reader.result()

    def _closer(self, job: Job) -> Callable[[], None]:
        def close() -> None:
            if not job.finished:
                self.engine.cancel(job)
        return close

    async def _collect(self, request: Request, job: Job, events: asyncio.Queue, output,
                       endpoint: str) -> Response:
        """A whole (non-streaming) response; the job is cancelled if the client leaves."""
        async def collect():
            while True:
                event = await events.get()
                if isinstance(event, ChoiceEvent):
                    output.add(event)
                    continue
                job.finished = True
                if isinstance(event, JobDone):
                    output.done = event
                    return JSONResponse(output.response())
                return APIError(event.status, event.message, type=event.type,
                                code=event.code).response()

        def cancel() -> None:  # the client went away, or the server cancelled the handler
            if not job.finished:
                self.engine.cancel(job)

        try:
            response = await _unless_disconnected(request.receive, collect(), cancel)
        finally:
            cancel()
        if response is None:
            response = Response(status_code=499)  # nobody will read it
        self.engine.metrics.count_request(endpoint, response.status_code)
        return response

    async def _stream(self, job: Job, events: asyncio.Queue, output) -> AsyncIterator[str]:
        """The SSE stream: chunks, keep-alive comments, usage, an error chunk, [DONE]."""
        while True:
            event = await _next_event(events, self.config.keepalive_seconds)
            if event is None:
                yield ": keep-alive\n\n"
                continue
            if isinstance(event, ChoiceEvent):
                chunk = output.chunk(event)
                if chunk is not None:
                    yield _sse(chunk)
            elif isinstance(event, JobDone):
                job.finished = True
                output.done = event
                if output.include_usage:
                    yield _sse(output.usage_chunk())
                break
            elif isinstance(event, JobError):
                job.finished = True
                yield _sse(APIError(event.status, event.message, type=event.type,
                                    code=event.code).body())
                break
        yield "data: [DONE]\n\n"


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes",
                    code="request_too_large")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _wait_for_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _next_event(events: asyncio.Queue, timeout: float):
    """The next event, or None when `timeout` seconds pass first.

    Not `asyncio.wait_for`: before Python 3.12 it can swallow a cancellation that arrives as
    the item does, and a stream whose client left would then run on to its end."""
    getter = asyncio.ensure_future(events.get())
    try:
        done, _ = await asyncio.wait({getter}, timeout=timeout)
    finally:
        if not getter.done():
            getter.cancel()  # a cancelled Queue.get leaves the item in the queue
    return getter.result() if getter in done else None


async def _unless_disconnected(receive, work, on_disconnect: Callable[[], None]):
    """Run `work` (a coroutine) unless the client disconnects first: then call
    `on_disconnect` at once and return None. Whatever ends it (the client, or this handler
    being cancelled), `work` has stopped on return."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        on_disconnect()
        await _stop(task)
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    on_disconnect()
    await _stop(task)
    return None


async def _stop(task: asyncio.Future) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


class EventStream:
    """A server-sent-events response that stops, and calls `on_close`, as soon as the client
    disconnects (not only at the next write)."""

    def __init__(self, chunks: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        self.chunks, self.on_close = chunks, on_close

    async def __call__(self, scope, receive, send) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]})
            async for text in self.chunks:
                await send({"type": "http.response.body", "body": text.encode(),
                            "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await _unless_disconnected(receive, stream(), self.on_close)
        except OSError:  # the connection broke mid-write
            pass
        finally:
            self.on_close()
            await self.chunks.aclose()
