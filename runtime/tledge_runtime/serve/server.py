"""``tledge-runtime serve``: the model over HTTP, on uvicorn + starlette (extra ``tledge-runtime[serve]``).

    GET  /v2, /v2/health/live, /v2/health/ready           Open Inference Protocol (v2): server
    GET  /v2/models/<name>[/ready]                        model metadata (tensors as in the Triton repository)
    POST /v2/models/<name>/infer                          the graph's tensors (JSON or binary), as Triton takes them
    POST /v2/models/<name>_image/infer                    encoded images as BYTES -> label, score, probabilities
    POST /predict[?topk=K]                                an image file's bytes -> {label, index, score, topk}
    GET  /metrics                                         Prometheus
    GET  /health, /info                                   liveness; the model's metadata and the limits

``<name>`` defaults to the name ``tledge export --triton`` gives the file (:mod:`tledge_runtime.serve.served_model`), so one
client works against this server and against Triton serving the exported repository.

Secure by default: off loopback the server needs a token (``Authorization: Bearer <token>``) or an
explicit ``insecure``. Everything a client controls is bounded (see :mod:`tledge_runtime.serve.app`): requests in
flight, body bytes held, the time a request may take from its first header byte to its answer
(slow senders are cut off), and shutdown, which waits at most ``grace_s`` for requests in flight.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tledge_runtime.backends.engine_file import is_engine_file
from tledge_runtime.errors import TledgeError, import_optional
from tledge_runtime.serve.config import ServeConfig, check_exposure
from tledge_runtime.serve.served_model import default_name

if TYPE_CHECKING:
    from tledge_runtime.classifier import Classifier
    from tledge_runtime.repository.repository import ModelRepository

log = logging.getLogger("tledge_runtime")

class Server:
    """The HTTP server for one classifier, or for the versions of a model repository (``serve --model-dir``).

    ``run()`` serves in the calling thread until SIGINT/SIGTERM (when it is the main thread) or
    ``stop()``; ``start()`` runs it in a thread of its own and returns once it listens (tests,
    benchmarks, embedding apps). Either way the listening socket is bound in the constructor, so
    a busy port or a refused exposure is a TledgeError before anything runs.
    """

    def __init__(self, model: Classifier | ModelRepository, config: ServeConfig):
        check_exposure(config)
        uvicorn = _require_extra()
        from tledge_runtime.repository.repository import ModelRepository
        from tledge_runtime.serve.app import build_app
        from tledge_runtime.serve.fleet import Fleet

        _check_tls(config)
        self.config = config
        self.fleet = Fleet(model, config.poll_s) if isinstance(model, ModelRepository) else None
        classifier = None if self.fleet is not None else model
        if self.fleet is not None:
            self.name = model.name
        else:
            self.name = config.name or default_name(classifier.meta, engine=is_engine_file(classifier.path))
        self._sock = _listen(config)
        app, self.state = build_app(classifier, config, self.name, self.fleet)
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
            live = self.state.live
            what = f"{live.classifier.path} (version {live.version}, {live.classifier.backend_name})" if live else \
                "no version yet"
            if live is None and self.fleet is not None:
                log.warning("no version of %s can serve yet: %s", self.name, "; ".join(
                    f"version {v.version}: {v.reason}" for v in self.fleet.repository.index()[:3]) or "none on disk")
            log.info("serving %s as %s on %s", what, self.name, self.url)
            if self.fleet is not None:
                self.fleet.start()
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

    @property
    def classifier(self) -> Classifier | None:
        """The classifier of the version serving now."""
        return self.state.classifier

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.fleet is not None:
                self.fleet.stop()
            if self.state.live is not None:
                self.state.live.close()
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


def _ignore(signum: int, frame: Any) -> None:
    pass
