"""Helpers of the serve tests: a real server in a thread, plain HTTP clients, a self-signed certificate."""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tledge_runtime.serve.config import ServeConfig
from tledge_runtime.serve.server import Server

MAX_BYTES = 64 << 10
TOKEN = "t0ken-for-the-serve-tests-0123456789"


@contextlib.contextmanager
def running(classifier: Any, **overrides: Any) -> Iterator[Server]:
    """A server on a free loopback port, stopped (and its threads joined) on exit."""
    config = ServeConfig(**{"port": 0, "max_bytes": MAX_BYTES, "max_queue": 8, "timeout_s": 5.0, "grace_s": 2.0,
                            **overrides})
    server = Server(classifier, config).start()
    try:
        yield server
    finally:
        server.stop()


def address(server: Server) -> tuple[str, int]:
    return "127.0.0.1", server.port


def request(server: Server, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None, conn: http.client.HTTPConnection | None = None):
    """(status, decoded JSON or None, response); on ``conn`` if given (keep-alive), else a new connection."""
    own = conn is None
    conn = conn or http.client.HTTPConnection(*address(server), timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        ctype = resp.getheader("Content-Type", "")
        return resp.status, (json.loads(raw) if raw and ctype.startswith("application/json") else raw or None), resp
    finally:
        if own:
            conn.close()


def raw_exchange(server: Server, data: bytes, *, close_write: bool = True, timeout: float = 10) -> bytes:
    """Send bytes over a plain socket and return everything the server answers until it closes."""
    with socket.create_connection(address(server), timeout=timeout) as s:
        s.sendall(data)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with the openssl command line."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed: no certificate to test TLS with")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key
