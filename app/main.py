"""The app factory: `create_app(settings)` builds a service; the model loads in the background.

The server accepts connections at once; /health answers 503 until the model is loaded and a
warm-up pass has run (Docker and Kubernetes probes wait on it), then 200.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from python_multipart.multipart import parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import Metrics
from app.predictor import Predictor
from app.routes import STATIC_DIR, ops, page, predictions, text_beside_uploads
from app.settings import Settings
from app.state import APIError, ServingState

log = logging.getLogger("app")


def _error(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


_HTTP_CODES = {
    400: "bad_request",  # e.g. a malformed or truncated multipart body
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "too_large",
}


def _validation_message(exc: RequestValidationError) -> tuple[str, str]:
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        field = loc[-1] if loc else "request"
        if loc[:1] == ["body"] and len(loc) > 1 and loc[1] in ("file", "files"):
            # Missing, or a text value where a file upload belongs (loc may end in an index).
            field = loc[1]
            example = "-F file=@image.jpg" if field == "file" else "-F files=@a.jpg -F files=@b.png"
            return (
                "no_file",
                f"no file: send the image(s) as multipart/form-data file upload(s) in field "
                f"'{field}' (curl {example} ...)",
            )
        if field == "top_k":
            return "bad_top_k", "top_k must be an integer from 1 to 10"
        problems.append(f"{'.'.join(loc)}: {err.get('msg')}")
    return "invalid_request", "; ".join(problems) or "invalid request"


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, without buffering them: at once from
    Content-Length, or as soon as a streamed (chunked) body passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        detail = (
            f"the request body is over the {self.max_bytes:,}-byte limit (APP_MAX_UPLOAD_BYTES)"
        )
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            # Not 'Connection: close': closing with the body unread makes the kernel reset the
            # connection, and a client still sending loses this answer. uvicorn reads and drops
            # the rest (bounded in time by protocol.GuardedHttpToolsProtocol).
            response = _error(413, "too_large", detail)
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, detail)
            return message

        await self.app(scope, limited, send)


class ReadTimeout:
    """Answer 408 (and close) when a request body stalls for `timeout_s`: uvicorn waits for
    the rest of a body forever, and a client that stops sending (slowly or on purpose) held
    its connection, its upload buffer and, at shutdown, the graceful-drain time. Only reads
    of the body are timed: once it is complete, waiting for a disconnect is not."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = False

        async def timed() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                raise HTTPException(
                    408,
                    f"the request body stalled: nothing arrived for {self.timeout_s:g} s "
                    "(APP_READ_TIMEOUT_S); send the request again",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed, send)


class CompleteMultipart:
    """Refuse a multipart body that ends before its closing boundary (400). The form parser
    would otherwise drop the unfinished last part without a word: /predict/batch answered 200
    for the files before it, /predict said no file was sent. What follows the closing boundary
    (an epilogue, which the multipart standard allows) does not matter."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        content_type = dict(scope.get("headers", ())).get(b"content-type", b"")
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if scope["type"] != "http" or not kind.startswith(b"multipart/") or not boundary:
            await self.app(scope, receive, send)  # a missing boundary: the parser's own 400
            return
        close = b"--" + boundary + b"--"
        tail = b""  # the end of what came so far: a boundary may straddle two chunks
        closed = False

        async def checked() -> Message:
            nonlocal tail, closed
            message = await receive()
            if message["type"] == "http.request" and not closed:
                window = tail + message.get("body", b"")
                closed = close in window
                tail = window[-(len(close) - 1) :]
                if not message.get("more_body", False) and not closed:
                    raise HTTPException(
                        400,
                        "the multipart body ends before its closing boundary: the upload was "
                        "cut short or is malformed; send it again",
                    )
            return message

        await self.app(scope, checked, send)


class CancelledAtShutdown:
    """A request still running when the graceful-shutdown time (APP_GRACEFUL_SHUTDOWN_S) is up
    is cancelled by uvicorn, which then logged "Exception in ASGI application" with a
    CancelledError traceback and answered 500. It gets a 503 instead (another instance may
    take it), and the log one line. Nothing else cancels a request from outside the app:
    the cancel scopes of anyio and of our own tasks end inside it."""

    def __init__(self, app: ASGIApp, graceful_shutdown_s: float) -> None:
        self.app, self.graceful_shutdown_s = app, graceful_shutdown_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            await send(message)
            # After: a cancel while uvicorn waits to send the start leaves it unsent.
            started = started or message["type"] == "http.response.start"

        try:
            await self.app(scope, receive, watch)
        except asyncio.CancelledError:
            log.warning(
                "%s %s cancelled: the server stopped before it finished "
                "(APP_GRACEFUL_SHUTDOWN_S: %d s)",
                scope["method"], scope["path"], math.ceil(self.graceful_shutdown_s),
            )  # fmt: skip
            if not started:
                response = _error(
                    503,
                    "shutting_down",
                    "the server stopped before this request finished; send it again",
                    {"Connection": "close", "Retry-After": "1"},
                )
                await response(scope, receive, send)


class RequestMetrics:
    """Count requests by route template and status, and time them. A request answered before
    routing (a 413 from Content-Length) counts under its path when that is a route's."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: frozenset[str]) -> None:
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or (
                scope["path"] if scope["path"] in self.paths else "other"  # bounded labels
            )
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


def create_app(
    settings: Settings | None = None,
    predictor: Predictor | None = None,
    *,
    ready_before_serving: bool = False,
) -> FastAPI:
    """A service for `settings` (default: from APP_* variables). Pass an already loaded
    `predictor` to skip loading (the CLI loads first, to fail fast with a one-line error).

    By default the server listens at once and /health says 503 until the model is warm. With
    `ready_before_serving` (each of several worker processes), startup waits for the model, and
    fails if it does not load: uvicorn starts listening only after startup, so a worker joins
    the shared port once it can answer, and the others take every connection until then.
    """
    settings = settings or Settings()
    state = ServingState(settings, predictor)

    def stop_inference_at_exit() -> None:
        # A second Ctrl-C makes uvicorn skip the shutdown below; Python exiting while the
        # inference thread is inside a forward pass then aborted the process ("terminate
        # called without an active exception"). Let it finish its work first.
        if state.batcher is not None:
            state.batcher.stop(settings.graceful_shutdown_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=state.load_and_warm_up, name="model-loader", daemon=True)
        loader.start()
        atexit.register(stop_inference_at_exit)
        if ready_before_serving:
            await asyncio.to_thread(state.ready.wait)
            if state.status != "ok":
                raise RuntimeError(state.detail)
        yield
        atexit.unregister(stop_inference_at_exit)  # the normal way, below
        # SIGTERM: uvicorn has stopped accepting and finished in-flight requests; let the
        # inference thread answer anything still queued, then end it.
        await asyncio.to_thread(loader.join)
        if state.batcher is not None:
            await asyncio.to_thread(state.batcher.stop, settings.graceful_shutdown_s)
        state.decoders.shutdown(wait=False)

    app = FastAPI(
        title="alexnet-serve",
        summary="An AlexNet image classifier (the shipped model: CIFAR-10), served with dynamic batching.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.serving = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and str(exc.detail).startswith("Too many files"):
            # The form parser's own ceiling (1000 parts), above any APP_MAX_BATCH_FILES: the
            # same answer as a batch over that setting.
            limit = state.settings.max_batch_files
            return _error(
                413,
                "too_many_files",
                f"{exc.detail} This server takes at most {limit} per call (APP_MAX_BATCH_FILES)",
            )
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        code, detail = _validation_message(exc)
        multipart = (
            request.headers.get("content-type", "").lower().startswith("multipart/form-data")
        )
        if code == "no_file" and multipart:
            # A text value beside the upload(s) was read as the field's value, or one of them:
            # "no file" would be wrong. (The form was parsed for the endpoint: kept, not re-read.)
            mixed = text_beside_uploads(await request.form())
            if mixed is not None:
                return _error(422, mixed.code, mixed.detail)
        return _error(422, code, detail)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "internal_error", "internal error; the server log has the details")

    app.include_router(predictions)
    app.include_router(ops)
    app.include_router(page)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(CompleteMultipart)
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(ReadTimeout, timeout_s=settings.read_timeout_s)
    app.add_middleware(CancelledAtShutdown, graceful_shutdown_s=settings.graceful_shutdown_s)
    # From the routers: FastAPI lists an included router as one opaque entry of app.routes.
    paths = frozenset(route.path for router in (predictions, ops, page) for route in router.routes)
    app.add_middleware(RequestMetrics, metrics=state.metrics, paths=paths)
    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory`: settings from APP_* only."""
    return create_app(Settings())


def configure_logging(level: str) -> None:
    """The service's log format, for the CLI's process and each worker process it spawns."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def worker_app_from_env() -> FastAPI:
    """Factory for one of several worker processes: settings from APP_*; it starts listening
    once its model is warm (see `create_app`)."""
    settings = Settings()
    configure_logging(settings.log_level)  # a spawned process starts with logging unset
    return create_app(settings, ready_before_serving=True)


def state_of(app: Any) -> ServingState:
    return app.state.serving
