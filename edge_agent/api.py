"""The edge's local OpenAI-compatible HTTP API (Starlette app, served by uvicorn).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health``, ``GET /metrics``. docs/API.md documents the fields,
the ``spececd`` extension and the errors.

Generation is blocking code, so each request runs in a thread pool of ``max_concurrent``
threads (the agent gives each generation its own drafter and serializes forward passes). At
most ``max_concurrent`` requests generate at once and at most ``max_queue`` wait for a slot;
one more is answered 429 with ``Retry-After``. When the cloud is unreachable and the agent's
policy is ``fail``, requests that need the cloud are answered 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edge_agent.agent import EdgeAgent
from edge_agent.api_server import ServerHandle, start_server, uvicorn_server
from edge_agent.api_text import ApiError, GenRequest, Outcome, parse_request, run_job
from edge_agent.service import serving_state
from shared.config_keys import MAX_BODY_BYTES
from shared.errors import CloudUnavailableError, SpecECDError
from shared.metrics import CONTENT_TYPE_LATEST, EdgeMetrics

__all__ = ["ApiError", "ServerHandle", "create_app", "serve", "start_server"]

log = logging.getLogger(__name__)
_END = object()


class _Gate:
    """At most ``limit`` holders, at most ``max_queue`` waiters; the rest are refused (429)."""

    def __init__(self, limit: int, max_queue: int, metrics: EdgeMetrics) -> None:
        self.limit, self.max_queue, self.metrics = limit, max_queue, metrics
        self.sem = asyncio.Semaphore(limit)
        self.waiting = 0
        self.active = 0
        self.avg_s = 1.0  # moving average of a generation's duration, for Retry-After

    async def acquire(self) -> None:
        if self.sem.locked() and self.waiting >= self.max_queue:
            retry = max(1, math.ceil(self.avg_s * (self.waiting + 1) / self.limit))
            raise ApiError(
                429,
                f"too many requests: {self.active} generating and {self.waiting} queued "
                f"(max_queue = {self.max_queue}); retry after {retry} s",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(retry)},
            )
        self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        try:
            await self.sem.acquire()
        finally:
            self.waiting -= 1
            self.metrics.queue_depth.set(self.waiting)
        self.active += 1
        self.metrics.in_flight.set(self.active)

    def release(self, seconds: float) -> None:
        """Called on the event loop when a generation thread has finished."""
        self.avg_s = 0.8 * self.avg_s + 0.2 * seconds
        self.active -= 1
        self.metrics.in_flight.set(self.active)
        self.sem.release()


class _Api:
    def __init__(
        self,
        agent: EdgeAgent,
        model_name: str,
        aliases: Sequence[str],
        max_queue: int,
        max_concurrent: int,
        metrics: EdgeMetrics,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.agent, self.model_name, self.metrics = agent, model_name, metrics
        self.max_body_bytes = max_body_bytes
        # tokenizing runs here, never on the event loop (one thread: /health stays answered)
        self.parser_pool = ThreadPoolExecutor(1, thread_name_prefix="spececd-parse")
        self.parsing = 0  # requests waiting for or in the tokenizer (at most max_queue)
        self.names = {model_name, *aliases}
        self.max_queue, self.max_concurrent = max_queue, max_concurrent
        self.pool = ThreadPoolExecutor(max_concurrent, thread_name_prefix="spececd-gen")
        self.gate: _Gate | None = None  # made on the server's event loop
        self.context = agent.context_length
        self.started = int(time.time())

    # ------------------------------------------------------------ helpers
    def _check_model(self, body: object) -> None:
        if not isinstance(body, dict):
            return
        model = body.get("model")
        if model is None:
            raise ApiError(400, "'model' is required", param="model", code="missing_required_parameter")
        if model not in self.names:
            raise ApiError(
                404,
                f"the model {model!r} does not exist here; this agent serves {sorted(self.names)} (GET /v1/models)",
                type="invalid_request_error",
                param="model",
                code="model_not_found",
            )

    def _check_cloud(self, req: GenRequest) -> None:
        link = self.agent.link
        if req.opts.mode == "edge-only" or link is None:
            return
        if req.opts.on_cloud_unreachable == "fail" and not link.available():
            raise ApiError(
                503,
                "the cloud is unreachable and this agent's policy is 'fail'; retry later",
                type="server_error",
                code="cloud_unavailable",
                headers={"Retry-After": "5"},
            )

    async def _body(self, request: Request) -> object:
        """The JSON body, read up to ``max_body_bytes`` (413 beyond, before reading the rest)."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None

    def _start(self, req: GenRequest, on_text, cancel: threading.Event) -> asyncio.Future[Outcome]:
        """Run the job in the pool; the gate is released when the thread is done."""
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        fut = loop.run_in_executor(self.pool, run_job, self.agent, req, on_text, cancel)
        assert self.gate is not None
        gate = self.gate
        fut.add_done_callback(lambda _f: gate.release(time.monotonic() - t0))
        return fut

    # ------------------------------------------------------------ endpoints
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def _generate(self, request: Request, kind: str) -> Response:
        endpoint = request.url.path
        body = await self._body(request)
        self._check_model(body)
        if self.parsing >= self.max_queue:  # bodies waiting for the tokenizer are bounded too
            raise ApiError(
                429,
                f"too many requests: {self.parsing} waiting to be tokenized (max_queue = {self.max_queue}); retry after 1 s",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self.parsing += 1
        loop = asyncio.get_running_loop()
        try:
            req = await loop.run_in_executor(
                self.parser_pool, lambda: parse_request(self.agent, body, kind, context=self.context)
            )
        finally:
            self.parsing -= 1
        self._check_cloud(req)
        if self.gate is None:
            self.gate = _Gate(self.max_concurrent, self.max_queue, self.metrics)
        await self.gate.acquire()
        cancel = threading.Event()
        if req.stream:
            self.metrics.request_done(endpoint, 200)
            return StreamingResponse(self._sse(req, cancel), media_type="text/event-stream")
        fut = self._start(req, lambda _t: None, cancel)
        try:
            out = await _until_done_or_gone(fut, request, cancel)
        except asyncio.CancelledError:
            cancel.set()  # the client went away: stop generating
            raise
        except CloudUnavailableError as exc:
            raise ApiError(503, str(exc), type="server_error", code="cloud_unavailable") from exc
        self.metrics.request_done(endpoint, 200)
        return JSONResponse(self._final(req, out))

    def _final(self, req: GenRequest, out: Outcome) -> dict:
        if req.kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": out.text},
                "logprobs": None,
                "finish_reason": out.finish_reason,
            }
            obj, prefix = "chat.completion", "chatcmpl-"
        else:
            choice = {"index": 0, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}
            obj, prefix = "text_completion", "cmpl-"
        return {
            "id": prefix + req.id,
            "object": obj,
            "created": req.created,
            "model": self.model_name,
            "choices": [choice],
            "usage": out.usage(),
            "spececd": out.extension(),
        }

    def _chunk(self, req: GenRequest, text: str | None, finish: str | None, *, first: bool = False) -> dict:
        if req.kind == "chat":
            delta: dict = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj, prefix = "chat.completion.chunk", "chatcmpl-"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj, prefix = "text_completion", "cmpl-"
        return {
            "id": prefix + req.id,
            "object": obj,
            "created": req.created,
            "model": self.model_name,
            "choices": [choice],
        }

    async def _sse(self, req: GenRequest, cancel: threading.Event) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        fut = self._start(req, lambda t: loop.call_soon_threadsafe(queue.put_nowait, t), cancel)
        fut.add_done_callback(lambda _f: queue.put_nowait(_END))
        try:
            if req.kind == "chat":
                yield _sse_line(self._chunk(req, None, None, first=True))
            while (item := await queue.get()) is not _END:
                yield _sse_line(self._chunk(req, item, None))
            try:
                out = fut.result()
            except Exception as exc:
                err = exc if isinstance(exc, ApiError) else _server_error(exc)
                yield _sse_line(err.body())
                yield "data: [DONE]\n\n"
                return
            final = self._chunk(req, None, out.finish_reason)
            final["spececd"] = out.extension()
            yield _sse_line(final)
            if req.include_usage:  # as OpenAI: once, in a last chunk with no choices
                yield _sse_line({**self._chunk(req, None, None), "choices": [], "usage": out.usage()})
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # a no-op when finished; stops the generation when the client left

    async def models(self, request: Request) -> Response:
        # the served name only; aliases (the target's id, "spececd") are still accepted in requests
        return JSONResponse({"object": "list", "data": [self._model_card(self.model_name)]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in self.names:
            raise ApiError(
                404, f"the model {name!r} does not exist here", param="model", code="model_not_found"
            )
        return JSONResponse(self._model_card(name))

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.started, "owned_by": "spececd"}

    async def health(self, request: Request) -> Response:
        link = self.agent.link
        cloud = "none" if link is None else ("up" if link.available() else "down")
        serving, why = serving_state(link, self.agent.defaults)  # 503 when the policy cannot serve
        gate = self.gate
        return JSONResponse(
            {
                "status": "ok" if serving else "unavailable",
                "detail": why,
                "model": self.model_name,
                "mode": self.agent.defaults.mode,
                "cloud": cloud,
                "in_flight": gate.active if gate else 0,
                "queued": gate.waiting if gate else 0,
                "max_queue": self.max_queue,
            },
            status_code=200 if serving else 503,
        )

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _until_done_or_gone(
    fut: asyncio.Future[Outcome], request: Request, cancel: threading.Event
) -> Outcome:
    """Wait for a non-streamed generation; stop it when the client disconnects (uvicorn then
    delivers ``http.disconnect``; Starlette never cancels a plain handler on its own)."""

    async def gone() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({fut, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not fut.done():
            cancel.set()  # the client went away: stop generating, free the slot
        return await fut
    finally:
        watcher.cancel()


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        f"the request body is {size} bytes or more; this agent takes at most {limit} (max_body_bytes)",
        param=None,
        code="request_too_large",
    )


def _sse_line(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _server_error(exc: BaseException) -> ApiError:
    if isinstance(exc, CloudUnavailableError):
        return ApiError(503, str(exc), type="server_error", code="cloud_unavailable")
    message = str(exc) if isinstance(exc, SpecECDError) else f"internal error: {type(exc).__name__}: {exc}"
    return ApiError(500, message, type="server_error", code="internal_error")


def create_app(
    agent: EdgeAgent,
    *,
    model_name: str,
    max_queue: int,
    max_concurrent: int = 1,
    aliases: Sequence[str] = (),
    metrics: EdgeMetrics | None = None,
    heartbeat: Callable[[], None] | None = None,
    heartbeat_interval: float = 1.0,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> Starlette:
    """The ASGI app serving ``agent`` as ``model_name`` (and ``aliases``).

    ``metrics``: an ``EdgeMetrics`` already attached to the agent, or None to make and attach one
    (``app.state.metrics``). ``max_queue`` >= 0 requests may wait while ``max_concurrent`` >= 1
    generate. The thread pool is shut down when the app's lifespan ends. ``heartbeat`` is called
    every ``heartbeat_interval`` s from the event loop (feeds the systemd watchdog: a hung loop
    stops the pings).
    """
    if max_concurrent < 1:
        raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
    if max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {max_queue}")
    if metrics is None:
        metrics = EdgeMetrics().attach(agent)
    api = _Api(agent, model_name, aliases, max_queue, max_concurrent, metrics, max_body_bytes)

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        metrics.request_done(_endpoint(request), exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        err = ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", code=None)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    async def on_error(request: Request, exc: Exception) -> Response:
        log.exception("request %s failed", request.url.path)
        err = _server_error(exc)
        metrics.request_done(_endpoint(request), err.status)
        return JSONResponse(err.body(), status_code=err.status)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        beat = asyncio.create_task(_beat(heartbeat, heartbeat_interval)) if heartbeat else None
        yield
        if beat is not None:
            beat.cancel()
        api.pool.shutdown(wait=False, cancel_futures=True)
        api.parser_pool.shutdown(wait=False, cancel_futures=True)

    routes = [
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.model, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics_endpoint, methods=["GET"]),
    ]
    handlers = {ApiError: on_api_error, HTTPException: on_http_error, Exception: on_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.metrics = metrics
    app.state.api = api
    return app


async def _beat(heartbeat: Callable[[], None], interval: float) -> None:
    while True:
        heartbeat()
        await asyncio.sleep(interval)


def _endpoint(request: Request) -> str:
    path = request.url.path
    return path if path in ("/v1/completions", "/v1/chat/completions") else "other"


def serve(
    agent: EdgeAgent,
    host: str,
    port: int,
    *,
    model_name: str,
    max_queue: int = 16,
    max_concurrent: int = 1,
    aliases: Sequence[str] = (),
    metrics: EdgeMetrics | None = None,
    log_level: str = "info",
    on_ready: Callable[[], None] | None = None,
    heartbeat: Callable[[], None] | None = None,
    heartbeat_interval: float = 1.0,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> None:
    """Serve the API on ``host:port`` in this thread until SIGINT/SIGTERM (blocking).

    ``on_ready`` is called (from another thread) once the socket listens, e.g. to tell systemd;
    ``heartbeat`` as in :func:`create_app`.
    Returns when the server has shut down; closing the agent is the caller's job.
    """
    app = create_app(
        agent,
        model_name=model_name,
        max_queue=max_queue,
        max_concurrent=max_concurrent,
        aliases=aliases,
        metrics=metrics,
        heartbeat=heartbeat,
        heartbeat_interval=heartbeat_interval,
        max_body_bytes=max_body_bytes,
    )
    server = uvicorn_server(app, host, port, log_level)
    if on_ready is not None:
        threading.Thread(target=_when_started, args=(server, on_ready), daemon=True).start()
    log.info("serving the OpenAI-compatible API on http://%s:%d/v1 as %r", host, port, model_name)
    main = threading.current_thread() is threading.main_thread()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal at the handler it found:
    # a no-op one makes serve() return, so the caller can close the agent and exit 0.
    previous = signal.signal(signal.SIGTERM, lambda _s, _f: None) if main else None
    try:
        server.run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _when_started(server, on_ready: Callable[[], None]) -> None:
    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.05)
    on_ready()
