"""HTTP plumbing of ``tledge-runtime serve``: the token check, the metrics of every answer, bodies read
against their limit and deadline, and every error as JSON (``{"error": ..., "hint": ...}``) with a status."""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import anyio
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tledge_runtime.errors import ImageError, TledgeError
from tledge_runtime.serve import oip
from tledge_runtime.serve.batch import Dropped
from tledge_runtime.serve.metrics import Metrics

log = logging.getLogger("tledge_runtime")

# Paths anyone may read: liveness and readiness (load balancers and orchestrators probe them without secrets).
_OPEN = re.compile(r"^/(health|v2/health/(live|ready)|v2/models/[^/]+(/versions/[^/]+)?/ready)$")
# Endpoint labels of the metrics: a bounded set, whatever paths clients send.
_ENDPOINTS = [
    (re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$"), "infer"),
    (re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/ready$"), "model_ready"),
    (re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?$"), "model_metadata"),
    (re.compile(r"^/v2/health/(live|ready)$"), "health"),
    (re.compile(r"^/v2$"), "server_metadata"),
    (re.compile(r"^/predict$"), "predict"),
    (re.compile(r"^/health$"), "health"),
    (re.compile(r"^/info$"), "info"),
    (re.compile(r"^/metrics$"), "metrics"),
    (re.compile(r"^/(page/[^/]+)?$"), "page"),
    (re.compile(r"^/v2/repository/"), "repository"),
]


class HTTPError(TledgeError):
    """An answer other than 200, raised anywhere in a handler and turned into JSON in one place."""

    def __init__(self, status: int, message: str, hint: str | None = None, headers: dict | None = None):
        super().__init__(message, hint)
        self.status = status
        self.headers = headers or {}


class Observe:
    """Counts every answer by endpoint and status and times it, whatever produced it."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}

        async def observed(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            self.metrics.observe(endpoint_of(scope["path"]), status["code"], time.perf_counter() - start)


class Guard:
    """Bearer-token check before routing and before the body: liveness, readiness and ``open_paths`` (the
    page's files, exact paths) stay open."""

    def __init__(self, app: Any, token: str | None, open_paths: frozenset[str] = frozenset()):
        self.app = app
        self._expected = f"Bearer {token}".encode() if token else None
        self._open_paths = open_paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or self._expected is None or path in self._open_paths or _OPEN.match(path):
            return await self.app(scope, receive, send)
        sent = b""
        for key, value in scope["headers"]:
            if key == b"authorization":
                sent = value
        if hmac.compare_digest(sent, self._expected):  # constant time: no timing oracle on the token
            return await self.app(scope, receive, send)
        message = "missing bearer token" if not sent else "wrong bearer token"
        response = error(401, message, "send the header 'Authorization: Bearer <token>' with the server's token",
                          {"WWW-Authenticate": 'Bearer realm="tledge-runtime"'})
        await response(scope, receive, send)


class NoSniff:
    """``X-Content-Type-Options: nosniff`` on every answer, errors included: a browser takes each body as the
    type it is sent as (JSON, Prometheus text) and never sniffs one into HTML or script."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def hardened(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-content-type-options" for k, _ in headers):
                    message = {**message, "headers": [*headers, (b"x-content-type-options", b"nosniff")]}
            await send(message)

        await self.app(scope, receive, hardened)


def endpoint_of(path: str) -> str:
    for pattern, name in _ENDPOINTS:
        if pattern.match(path):
            return name
    return "other"


# ----------------------------------------------------------------------------- bodies


def content_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    try:  # h11 has checked the syntax already; a second look costs nothing
        return int(raw)
    except ValueError:
        raise HTTPError(400, f"bad Content-Length {raw!r}", "send a non-negative integer") from None


async def read_body(request: Request, max_bytes: int, deadline: float, declared: int | None) -> bytearray:
    """The body, read chunk by chunk into one buffer: never more than ``max_bytes``, never past ``deadline``.

    With a Content-Length the buffer is allocated once at that size and filled in place, so a body
    costs its own size in memory, not its size again for a joined copy (what the body budget counts).
    """
    body = bytearray(declared) if declared else bytearray()
    size = 0
    with anyio.move_on_after(max(0.0, deadline - time.monotonic())) as scope:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                raise HTTPError(499, "the client closed the connection", None)
            chunk = message.get("body", b"")
            if size + len(chunk) > max_bytes:
                await discard_rest(request, deadline)
                raise too_large(size + len(chunk), max_bytes, sent=True)
            if declared:
                body[size:size + len(chunk)] = chunk  # h11 has checked that no more than declared arrives
            else:
                body += chunk
            size += len(chunk)
            if not message.get("more_body", False):
                break
    if scope.cancelled_caught:
        raise HTTPError(408, "the request body did not arrive before the request deadline",
                        "send the whole body without pauses; the server cuts off slow senders", {"Connection": "close"})
    if declared and size != declared:  # the client closed early; h11 reports it as a disconnect, this is a backstop
        raise HTTPError(400, f"the request body ended after {size} of {declared} bytes", "send the whole body")
    return body


# RFC 9112 §9.6 ("tear-down"): a server that answers and closes while the client is still sending makes the
# client's kernel answer the unread bytes with a reset, and that reset can destroy the answer (a 413) before
# the client reads it; the client sees a broken pipe instead. So before answering a refused body the server
# reads and discards a little more of it: enough for a body somewhat over the limit to end and its sender to
# read the 413, bounded in bytes and time so that a refusal never costs more than this.
DRAIN_BYTES = 1 << 20
DRAIN_SECONDS = 1.0


async def discard_rest(request: Request, deadline: float) -> None:
    """Read and drop the rest of a refused body: at most DRAIN_BYTES, for at most DRAIN_SECONDS."""
    left = DRAIN_BYTES
    with anyio.move_on_after(max(0.0, min(DRAIN_SECONDS, deadline - time.monotonic()))):
        while left > 0:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return
            left -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return


async def disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def too_large(size: int, limit: int, sent: bool = False) -> HTTPError:
    what = f"more than {limit} bytes of request body arrived" if sent else f"request body is {size} bytes"
    return HTTPError(413, f"{what}, more than the {limit} allowed" if not sent else what,
                     "downscale or recompress the image, or start the server with a larger --max-bytes",
                     {"Connection": "close"})


def late() -> HTTPError:
    return HTTPError(503, "the model did not answer within the request deadline", "retry shortly; the server is "
                     "overloaded", {"Retry-After": "1"})


# ----------------------------------------------------------------------------- errors as JSON


def error(status: int, message: str, hint: str | None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "hint": hint}, status_code=status, headers=headers)


async def http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return error(405, f"{request.method} is not allowed on {request.url.path}", f"use {allowed}", exc.headers)
    if exc.status_code == 404:
        return error(404, f"no such endpoint {request.url.path!r}",
                      "use POST /v2/models/<name>/infer, POST /predict, GET /v2/health/ready or GET /metrics")
    return error(exc.status_code, str(exc.detail), None, exc.headers)


async def tledge_error(request: Request, exc: Exception) -> Response:
    """tledge's own errors from a handler: the status says whose fault it is, the body says how to fix it."""
    assert isinstance(exc, TledgeError)
    if isinstance(exc, HTTPError):
        return error(exc.status, exc.message, exc.hint, exc.headers)
    if isinstance(exc, oip.ProtocolError):
        return error(exc.status, exc.message, exc.hint)
    if isinstance(exc, ImageError):
        return error(400, exc.message, exc.hint)
    if isinstance(exc, Dropped):
        return error(503, exc.message, exc.hint, {"Retry-After": "1"})
    log.error("%s %s: %s", request.method, request.url.path, exc)
    return error(500, exc.message, exc.hint)


async def unexpected(request: Request, exc: Exception) -> Response:
    """A bug that escaped a handler: the client still gets JSON with a status; starlette logs the traceback."""
    return error(500, "internal error", "see the server log")
