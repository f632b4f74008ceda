"""A small HTTP endpoint for gateways, on the standard library only.

    POST /predict[?topk=K]   body: the image file's bytes  -> {label, index, score, topk, latency_ms}
    GET  /health             -> {"status": "ok", ...}
    GET  /info               -> the model's metadata, backend and limits

Each connection gets a thread that reads and decodes its image (the CPU-heavy
preprocessing runs in parallel); one batcher thread runs the model on whatever
images are waiting, up to the model's batch, so concurrent requests share one
inference. Limits make overload a clear answer instead of a crash: a body over
``max_bytes`` gets 413, more than ``max_queue`` requests in flight get 503, a body
that is not an image gets 400. Responses close the connection (HTTP/1.0), which
keeps shutdown simple: on SIGINT/SIGTERM the server stops accepting, finishes the
requests in flight, and returns.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, urlsplit

import numpy as np

from . import __version__
from .classifier import Classifier
from .errors import ImageError, TledgeError

log = logging.getLogger("tledge_runtime")

_ROUTES = {"/predict": ("POST",), "/health": ("GET",), "/info": ("GET",)}
_DRAIN_LIMIT = 16 << 20  # bytes read and thrown away after a 413, so the client sees the answer, not a reset


@dataclass(frozen=True)
class ServeConfig:
    """Where to listen and how much to accept."""

    host: str = "127.0.0.1"
    port: int = 8080
    max_bytes: int = 10 << 20  # largest request body (an encoded image), bytes
    max_queue: int = 64  # requests admitted at once (decoding, waiting or running); more get 503
    max_batch: int = 8  # images per model run when requests pile up
    topk: int = 5  # classes listed in each answer unless ?topk= says otherwise
    timeout_s: float = 30.0  # socket reads and waiting for a result; slow clients are cut off

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_queue", "max_batch", "topk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TledgeError(f"serve {name} must be a positive integer, got {value!r}", hint="fix the option")
        if not 0 <= self.port <= 65535:
            raise TledgeError(f"port {self.port} is out of range", hint="use 1..65535, or 0 for any free port")


class Admission:
    """A bounded count of requests in flight; ``try_enter`` fails instead of waiting when it is full."""

    def __init__(self, limit: int):
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self.in_flight = 0

    def try_enter(self) -> bool:
        if not self._slots.acquire(blocking=False):
            return False
        with self._lock:
            self.in_flight += 1
        return True

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1
        self._slots.release()


class Batcher:
    """One thread that runs the model on the prepared images waiting in its queue, several at a time."""

    def __init__(self, classifier: Classifier, max_batch: int):
        self._classifier = classifier
        self._max_batch = max(1, min(max_batch, classifier.max_batch))
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="tledge-batcher", daemon=True)
        self._thread.start()

    def submit(self, image: np.ndarray) -> Future:
        """Queue one prepared image (``Classifier.prepare``); the future resolves to its probabilities."""
        future: Future = Future()
        self._queue.put((image, future))
        return future

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is None:
                break
            items = [item]
            while len(items) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                items.append(nxt)
            try:
                probs = self._classifier.infer(np.stack([image for image, _ in items]))
            except BaseException as e:
                for _, future in items:
                    future.set_exception(e)
            else:
                for (_, future), row in zip(items, probs):
                    future.set_result(row)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


class PredictionServer(ThreadingHTTPServer):
    """The HTTP server; ``serve_forever`` in one thread, ``shutdown`` from another, then ``close``."""

    daemon_threads = False  # server_close() waits for requests in flight: clean shutdown
    block_on_close = True

    def __init__(self, classifier: Classifier, config: ServeConfig):
        self.classifier = classifier
        self.config = config
        self.admission = Admission(config.max_queue)
        self.batcher = Batcher(classifier, config.max_batch)
        self.started = time.monotonic()
        try:
            super().__init__((config.host, config.port), _Handler)
        except OSError as e:
            self.batcher.close()
            raise TledgeError(f"cannot listen on {config.host}:{config.port} ({e.strerror or e})",
                              hint="pick another --port, or stop the process that holds it") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        """After shutdown(): wait for requests in flight, then stop the batcher."""
        self.server_close()
        self.batcher.close()


class _Handler(BaseHTTPRequestHandler):
    server: PredictionServer
    server_version = f"tledge-runtime/{__version__}"
    protocol_version = "HTTP/1.0"
    default_request_version = "HTTP/1.0"  # even a garbled request line gets a status line back, not bare HTML

    def setup(self) -> None:
        self.timeout = self.server.config.timeout_s  # socket timeout: a stalled client cannot hold a thread forever
        super().setup()

    # ---------------------------------------------------------------- routes

    def do_GET(self) -> None:
        path = self._route("GET")
        if path == "/health":
            self._json(200, {"status": "ok", "backend": self.server.classifier.backend_name,
                             "in_flight": self.server.admission.in_flight,
                             "uptime_s": round(time.monotonic() - self.server.started, 1)})
        elif path == "/info":
            clf, cfg = self.server.classifier, self.server.config
            self._json(200, {"model": clf.path.name, "backend": clf.backend_name, "labels": list(clf.labels),
                             "limits": {"max_bytes": cfg.max_bytes, "max_queue": cfg.max_queue},
                             "meta": clf.meta.to_dict()})

    def do_POST(self) -> None:
        if self._route("POST") != "/predict":
            return
        cfg = self.server.config
        length = self._content_length()
        if length is None:
            return
        if length > cfg.max_bytes:
            self._error(413, f"request body is {length} bytes, more than the {cfg.max_bytes} allowed",
                        "downscale or recompress the image, or start the server with a larger --max-bytes")
            self._drain(length)
            return
        ctype = self.headers.get("Content-Type", "")
        if ctype.startswith("multipart/"):
            self._drain(length)
            self._error(415, "multipart bodies are not accepted", "POST the image file's bytes as the request body")
            return
        try:
            k = self._topk()
        except ValueError as e:
            self._drain(length)
            self._error(400, str(e), f"use ?topk=1..{len(self.server.classifier.labels)}")
            return
        body = self._read_body(length)
        if body is None:
            return
        if not self.server.admission.try_enter():
            self._error(503, f"server busy: {cfg.max_queue} requests already in flight", "retry shortly",
                        headers={"Retry-After": "1"})
            return
        try:
            self._predict(body, k)
        finally:
            self.server.admission.leave()

    def _predict(self, body: bytes, k: int) -> None:
        start = time.perf_counter()
        clf = self.server.classifier
        try:
            image = clf.prepare(body)
            probs = self.server.batcher.submit(image).result(timeout=self.server.config.timeout_s)
        except ImageError as e:
            # load_image names in-memory sources "<bytes>"; here they are the request body.
            self._error(400, e.message.replace("<bytes>", "request body", 1), e.hint)
            return
        except FutureTimeout:
            self._error(503, "the model did not answer in time", "retry shortly; the server is overloaded")
            return
        except TledgeError as e:
            log.error("prediction failed: %s", e)
            self._error(500, e.message, e.hint)
            return
        except Exception:
            log.exception("unexpected error while predicting")
            self._error(500, "internal error", "see the server log")
            return
        top = clf.rank(probs, k)
        self._json(200, {**top[0].to_dict(), "topk": [p.to_dict() for p in top],
                         "latency_ms": round((time.perf_counter() - start) * 1000.0, 3)})

    do_PUT = do_DELETE = do_PATCH = lambda self: self._route(self.command)
    do_HEAD = do_OPTIONS = do_PUT

    # ---------------------------------------------------------------- helpers

    def _route(self, method: str) -> Optional[str]:
        """The path if ``method`` is allowed on it; otherwise answer 404/405 and return None."""
        path = urlsplit(self.path).path
        allowed = _ROUTES.get(path)
        if allowed is None:
            self._error(404, f"no such endpoint {path!r}", "use POST /predict, GET /health or GET /info")
            return None
        if method not in allowed:
            self._error(405, f"{method} is not allowed on {path}", f"use {' or '.join(allowed)}",
                        headers={"Allow": ", ".join(allowed)})
            return None
        return path

    def _content_length(self) -> Optional[int]:
        raw = self.headers.get("Content-Length")
        if raw is None:
            self._error(411, "a Content-Length header is required", "send the image bytes with their length")
            return None
        try:
            length = int(raw)
            if length < 0:
                raise ValueError
        except ValueError:
            self._error(400, f"bad Content-Length {raw!r}", "send a non-negative integer")
            return None
        if length == 0:
            self._error(400, "empty request body", "POST the image file's bytes")
            return None
        return length

    def _topk(self) -> int:
        values = parse_qs(urlsplit(self.path).query).get("topk")
        if not values:
            return min(self.server.config.topk, len(self.server.classifier.labels))
        try:
            k = int(values[-1])
        except ValueError:
            raise ValueError(f"topk must be an integer, got {values[-1]!r}") from None
        if k < 1:
            raise ValueError(f"topk must be at least 1, got {k}")
        return min(k, len(self.server.classifier.labels))

    def _read_body(self, length: int) -> Optional[bytes]:
        try:
            body = self.rfile.read(length)
        except OSError:  # timeout or reset while reading: nobody left to answer
            self.close_connection = True
            return None
        if len(body) != length:
            self._error(400, f"request body ended after {len(body)} of {length} bytes", "send the whole image")
            return None
        return body

    def _drain(self, length: int) -> None:
        left = min(length, _DRAIN_LIMIT)
        try:
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """The base class's errors (bad request line, oversized headers) as JSON like all the others."""
        self.close_connection = True
        self._error(code, message or HTTPStatus(code).phrase, explain or "send a well-formed HTTP/1.x request")

    def _error(self, status: int, message: str, hint: Optional[str], headers: Optional[dict] = None) -> None:
        self._json(status, {"error": message, "hint": hint}, headers)

    def _json(self, status: int, payload: dict, headers: Optional[dict] = None) -> None:
        body = json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:  # the client went away; nothing to tell it
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def serve(classifier: Classifier, config: ServeConfig, *,
          on_ready: Optional[Callable[[PredictionServer], None]] = None) -> None:
    """Serve until SIGINT/SIGTERM (or ``server.shutdown()``), then finish requests in flight and return."""
    server = PredictionServer(classifier, config)
    previous = {}

    def stop(signum: int, frame: Any) -> None:
        log.info("%s: finishing requests in flight and stopping", signal.Signals(signum).name)
        # shutdown() waits for serve_forever() to return, which runs in this (the main) thread: call it from another.
        threading.Thread(target=server.shutdown, daemon=True).start()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, stop)
    try:
        log.info("serving %s (%s) on %s", classifier.path.name, classifier.backend_name, server.url)
        if on_ready is not None:
            on_ready(server)
        server.serve_forever(poll_interval=0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.close()
        log.info("server stopped")

