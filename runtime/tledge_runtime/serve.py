"""``tledge-runtime serve``: the model over HTTP, on uvicorn + starlette (extra ``tledge-runtime[serve]``).

    GET  /v2, /v2/health/live, /v2/health/ready           Open Inference Protocol (v2): server
    GET  /v2/models/<name>[/ready]                        model metadata (tensors as in the Triton repository)
    POST /v2/models/<name>/infer                          the graph's tensors (JSON or binary), as Triton takes them
    POST /v2/models/<name>_image/infer                    encoded images as BYTES -> label, score, probabilities
    POST /predict[?topk=K]                                an image file's bytes -> {label, index, score, topk}
    GET  /metrics                                         Prometheus
    GET  /health, /info                                   liveness; the model's metadata and the limits

``<name>`` defaults to the name ``tledge export --triton`` gives the file (:mod:`.served_model`), so one
client works against this server and against Triton serving the exported repository.

Secure by default: off loopback the server needs a token (``Authorization: Bearer <token>``) or an
explicit ``insecure``. Everything a client controls is bounded (see :mod:`.serve_app`): requests in
flight, body bytes held, the time a request may take from its first header byte to its answer
(slow senders are cut off), and shutdown, which waits at most ``grace_s`` for requests in flight.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .engine_file import is_engine_file
from .errors import TledgeError, import_optional
from .served_model import default_name

if TYPE_CHECKING:
    from .classifier import Classifier

log = logging.getLogger("tledge_runtime")

MIN_TOKEN_CHARS = 16
_TOKEN_HINT = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


@dataclass(frozen=True)
class ServeConfig:
    """Where to listen, who may ask, and how much to accept."""

    host: str = "127.0.0.1"
    port: int = 8080
    name: str | None = None  # model name in the protocol (default: the Triton repository's name for the file)
    token: str | None = None  # required as "Authorization: Bearer <token>" (not for liveness/readiness)
    insecure: bool = False  # serve off loopback without a token: anyone who reaches the port may use the model
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    max_bytes: int = 10 << 20  # largest request body, bytes
    max_queue: int = 64  # inference requests admitted at once (reading, decoding, waiting, running); more get 503
    body_memory: int = 128 << 20  # request-body bytes admitted at once (declared length, or max_bytes); more get 503
    max_batch: int = 8  # images per model run when requests pile up
    topk: int = 5  # classes listed in each /predict answer unless ?topk= says otherwise
    timeout_s: float = 30.0  # a request's whole life: headers, body, decoding, queue, model
    grace_s: float = 10.0  # on SIGTERM/SIGINT: how long requests in flight may still finish
    keep_alive_s: float = 5.0  # idle keep-alive connections are closed after this
    backlog: int = 2048  # connections the kernel queues before accept(): bursts of hundreds connect without resets
    workers: int = min(8, os.cpu_count() or 2)  # threads decoding images / parsing JSON bodies at once
    http: str = "auto"  # HTTP/1.1 parser: httptools (C, when installed), else h11 (pure Python); or name one

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_queue", "body_memory", "max_batch", "topk", "backlog", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TledgeError(f"serve {name} must be a positive integer, got {value!r}", hint="fix the option")
        for name in ("timeout_s", "grace_s", "keep_alive_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise TledgeError(f"serve {name} must be a positive number of seconds, got {value!r}",
                                  hint="fix the option")
        if not 0 <= self.port <= 65535:
            raise TledgeError(f"port {self.port} is out of range", hint="use 1..65535, or 0 for any free port")
        if self.body_memory < self.max_bytes:
            raise TledgeError(f"serve body_memory ({self.body_memory}) is smaller than max_bytes ({self.max_bytes})",
                              hint="raise the body memory budget or lower --max-bytes")
        if self.token is not None and len(self.token) < MIN_TOKEN_CHARS:
            raise TledgeError(f"the token has {len(self.token)} characters, fewer than the {MIN_TOKEN_CHARS} required",
                              hint=_TOKEN_HINT)
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise TledgeError("TLS needs both a certificate and its key", hint="pass --ssl-certfile and --ssl-keyfile")
        if self.http not in ("auto", "httptools", "h11"):
            raise TledgeError(f"unknown HTTP parser {self.http!r}", hint="use auto, httptools or h11")
        if self.name is not None and not _valid_name(self.name):
            raise TledgeError(f"model name {self.name!r} is not usable in a URL",
                              hint="use letters, digits, '_' and '-' only")

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_certfile else "http"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything, so it counts as exposed


def check_exposure(config: ServeConfig) -> None:
    """Refuse to serve off loopback without a token unless ``insecure`` says so; log what is exposed."""
    if is_loopback(config.host):
        return
    where = f"{config.host}:{config.port}"
    if config.token is None and not config.insecure:
        raise TledgeError(f"refusing to serve on {where} without a token: anyone who can reach it could use the model",
                          hint="pass --token TOKEN (or set TLEDGE_TOKEN), or --insecure to serve without "
                               "authentication; " + _TOKEN_HINT)
    if config.token is None:
        log.warning("--insecure: anyone who can reach %s may run the model and read its metadata and metrics", where)
    elif config.ssl_certfile is None:
        log.warning("serving on %s without TLS: the token travels in clear text (use --ssl-certfile/--ssl-keyfile)",
                    where)


class Server:
    """The HTTP server for one classifier.

    ``run()`` serves in the calling thread until SIGINT/SIGTERM (when it is the main thread) or
    ``stop()``; ``start()`` runs it in a thread of its own and returns once it listens (tests,
    benchmarks, embedding apps). Either way the listening socket is bound in the constructor, so
    a busy port or a refused exposure is a TledgeError before anything runs.
    """

    def __init__(self, classifier: Classifier, config: ServeConfig):
        check_exposure(config)
        uvicorn = _require_extra()
        from .serve_app import build_app

        _check_tls(config)
        self.classifier, self.config = classifier, config
        self.name = config.name or default_name(classifier.meta, engine=is_engine_file(classifier.path))
        self._sock = _listen(config)
        app, self.state = build_app(classifier, config, self.name)
        uv_config = uvicorn.Config(app, http=_protocol(config.http, config.timeout_s), lifespan="off", log_config=None,
                                   access_log=False, server_header=False, backlog=config.backlog,
                                   timeout_keep_alive=config.keep_alive_s, timeout_graceful_shutdown=config.grace_s,
                                   ssl_certfile=config.ssl_certfile, ssl_keyfile=config.ssl_keyfile)
        self._server = uvicorn.Server(uv_config)
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    @property
    def url(self) -> str:
        host = self._sock.getsockname()[0]
        host = f"[{host}]" if ":" in host else host
        return f"{self.config.scheme}://{host}:{self.port}"

    def run(self) -> None:
        """Serve until a signal or ``stop()``; requests in flight get ``grace_s`` to finish; then release everything."""
        main = threading.current_thread() is threading.main_thread()
        previous = {}
        if main:
            # uvicorn re-raises the signal it caught once it has stopped; a no-op handler underneath it turns
            # that into a clean return (exit status 0) instead of the default action (death by SIGTERM).
            previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            log.info("serving %s (%s) as %s on %s", self.classifier.path.name, self.classifier.backend_name, self.name,
                     self.url)
            self._server.run(sockets=[self._sock])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._close()
            log.info("server stopped")

    def start(self, timeout_s: float = 30.0) -> Server:
        """Serve in a background thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.run, name="tledge-serve", daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout_s
        while not self._server.started and self._thread.is_alive() and time.monotonic() < end:
            self._thread.join(0.01)
        if not self._server.started:
            self.stop()
            raise TledgeError("the server did not start", hint="see the log above")
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        """Ask the server to stop (as SIGTERM does) and wait for it: at most the grace period plus a little."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s if timeout_s is not None else self.config.grace_s + 5.0)
        else:
            self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self.state.batcher.close()
            self._sock.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(classifier: Classifier, config: ServeConfig, *, on_ready: Callable[[Server], None] | None = None) -> None:
    """Serve ``classifier`` until SIGINT/SIGTERM, then let requests in flight finish (within the grace period)."""
    server = Server(classifier, config)
    if on_ready is not None:
        on_ready(server)
    server.run()


# ----------------------------------------------------------------------------- plumbing


def _require_extra() -> Any:
    """uvicorn, after checking that every library of the serve extra imports."""
    for module in ("prometheus_client", "starlette", "uvicorn"):
        found = import_optional(module, TledgeError, "serve needs {missing}, which is not installed",
                                "pip install 'tledge-runtime[serve]'")
    return found


def _check_tls(config: ServeConfig) -> None:
    """Load the certificate and key once now, so a bad pair is a clear error before anything is bound."""
    if config.ssl_certfile is None:
        return
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
    except (OSError, ValueError) as e:
        raise TledgeError(f"cannot use the TLS certificate {config.ssl_certfile} with the key {config.ssl_keyfile} "
                          f"({e})", hint="pass a PEM certificate and its unencrypted PEM private key") from None


def _listen(config: ServeConfig) -> socket.socket:
    """The listening socket, bound now: a busy port is a clear error, and the backlog absorbs bursts."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM,
                                                          proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)[0]
        # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without it
        # a keep-alive answer written as headers + body waits for the client's delayed ACK (40 ms a request).
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(addr)
            sock.listen(config.backlog)
        except OSError:
            sock.close()
            raise
        return sock
    except OSError as e:
        raise TledgeError(f"cannot listen on {config.host}:{config.port} ({e.strerror or e})",
                          hint="pick another --port, or stop the process that holds it") from None


_BAD_REQUEST = json.dumps({"error": "malformed HTTP request", "hint": "send a well-formed HTTP/1.1 request"}).encode()


def _protocol(parser: str, timeout_s: float) -> type:
    """uvicorn's HTTP/1.1 protocol (httptools, else h11) with a deadline on the headers of each request.

    uvicorn times out idle keep-alive connections but not a client that sends its headers a byte
    at a time; here a connection that has not completed a request's headers within ``timeout_s``
    of connecting (or of its previous answer) is closed, so slow senders cannot hold sockets.
    """
    if parser == "auto":
        parser = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    if parser == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class DeadlineProtocol(Base):
        _deadline: Any = None

        def send_400_response(self, msg: str) -> None:
            # A request the parser cannot read: answered in JSON like every other error (uvicorn's is plain text),
            # unless an answer is already under way on this connection; then it can only be closed.
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                                     b"content-length: %d\r\nconnection: close\r\n\r\n" % len(_BAD_REQUEST)
                                     + _BAD_REQUEST)
            self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(timeout_s, self._expire, self.cycle)

        def _expire(self, cycle: Any) -> None:
            if self.cycle is cycle and not self.transport.is_closing():
                self.transport.close()

    return DeadlineProtocol


def _valid_name(name: str) -> bool:
    return bool(name) and all(c.isascii() and (c.isalnum() or c in "_-") for c in name)


def _ignore(signum: int, frame: Any) -> None:
    pass
