"""What ``tledge-runtime serve`` is told: where to listen, who may ask, how much to accept, and the rule that
refuses to expose a model off loopback without a token. Below the server and the app, which both read it."""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass

from tledge_runtime.errors import TledgeError

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
    capture: str | None = None  # a folder: inputs answered unknown or unsure are kept there (answers.capture)
    poll_s: float | None = None  # serve --model-dir: look for new versions every poll_s seconds (None: on request)

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
        if self.poll_s is not None and (isinstance(self.poll_s, bool) or not isinstance(self.poll_s, (int, float))
                                        or not 0 < self.poll_s <= 86400):
            raise TledgeError(f"serve poll_s must be a number of seconds in (0, 86400], got {self.poll_s!r}",
                              hint="fix --poll")
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


def _valid_name(name: str) -> bool:
    return bool(name) and all(c.isascii() and (c.isalnum() or c in "_-") for c in name)
