"""The HTTP server on loopback: good and bad requests, limits (413/503), concurrency, clean shutdown."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from tledge_runtime.errors import TledgeError
from tledge_runtime.serve import PredictionServer, ServeConfig

MAX_BYTES = 64 << 10


def _start(classifier, **overrides) -> tuple[PredictionServer, threading.Thread]:
    config = ServeConfig(**{"port": 0, "max_bytes": MAX_BYTES, "max_queue": 8, "timeout_s": 5.0, **overrides})
    server = PredictionServer(classifier, config)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread


def _stop(server: PredictionServer, thread: threading.Thread) -> None:
    server.shutdown()
    thread.join(5)
    server.close()


@pytest.fixture()
def server(classifier):
    srv, thread = _start(classifier)
    yield srv
    _stop(srv, thread)


def request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, (json.loads(raw) if raw else None), resp
    finally:
        conn.close()


def raw_exchange(server, data: bytes, *, close_write: bool = True) -> bytes:
    """Send bytes over a plain socket and return everything the server answers."""
    with socket.create_connection(server.server_address[:2], timeout=10) as s:
        s.sendall(data)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_predict_returns_label_topk_and_latency(server, images):
    status, body, resp = request(server, "POST", "/predict", images["green"][0].read_bytes())
    assert status == 200 and resp.getheader("Content-Type") == "application/json"
    assert (body["label"], body["index"]) == ("green", 1)
    assert [t["label"] for t in body["topk"]][0] == "green" and len(body["topk"]) == 3
    assert body["score"] == body["topk"][0]["score"] and body["latency_ms"] > 0
    status, body, _ = request(server, "POST", "/predict?topk=1", images["red"][1].read_bytes())
    assert status == 200 and len(body["topk"]) == 1 and body["label"] == "red"


def test_same_answer_as_the_python_api(server, classifier, images):
    path = images["blue"][3]
    _, body, _ = request(server, "POST", "/predict", path.read_bytes())
    assert body["score"] == pytest.approx(classifier.predict(path).score, abs=1e-9)


@pytest.mark.parametrize("body, headers, status, expected", [
    (b"this is not an image", {}, 400, "request body: not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, {}, 400, "request body"),
    (b"", {}, 400, "empty request body"),
    (b"x" * (MAX_BYTES + 1), {}, 413, "more than the"),
    (b"--b\r\n\r\nabc", {"Content-Type": "multipart/form-data; boundary=b"}, 415, "multipart"),
])
def test_bad_requests_get_4xx_with_a_hint(server, images, body, headers, status, expected):
    got, answer, _ = request(server, "POST", "/predict", body, headers)
    assert got == status
    assert expected in answer["error"] and answer["hint"]
    ok, good, _ = request(server, "POST", "/predict", images["red"][0].read_bytes())  # still serving
    assert ok == 200 and good["label"] == "red"


@pytest.mark.parametrize("query", ["topk=abc", "topk=0", "topk=-2"])
def test_bad_topk_is_400(server, images, query):
    status, answer, _ = request(server, "POST", f"/predict?{query}", images["red"][0].read_bytes())
    assert status == 400 and "topk" in answer["error"]


def test_routes_and_methods(server):
    status, answer, _ = request(server, "GET", "/nope")
    assert status == 404 and "/predict" in answer["hint"]
    status, _, resp = request(server, "GET", "/predict")
    assert status == 405 and resp.getheader("Allow") == "POST"
    status, _, resp = request(server, "POST", "/health", b"x")
    assert status == 405 and resp.getheader("Allow") == "GET"
    assert request(server, "PUT", "/predict", b"x")[0] == 405
    assert request(server, "DELETE", "/elsewhere")[0] == 404


def test_health_and_info(server):
    status, health, _ = request(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["backend"] == "ort-cpu"
    status, info, _ = request(server, "GET", "/info")
    assert status == 200 and info["labels"] == ["red", "green", "blue"]
    assert info["limits"] == {"max_bytes": MAX_BYTES, "max_queue": 8}
    assert info["meta"]["preprocess"]["height"] == 16


def test_malformed_http_is_answered_and_survived(server, images):
    assert raw_exchange(server, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.0 400")
    no_length = b"POST /predict HTTP/1.0\r\nHost: x\r\n\r\n"
    assert raw_exchange(server, no_length).startswith(b"HTTP/1.0 411")
    bad_length = b"POST /predict HTTP/1.0\r\nContent-Length: many\r\n\r\n"
    assert raw_exchange(server, bad_length).startswith(b"HTTP/1.0 400")
    short = b"POST /predict HTTP/1.0\r\nContent-Length: 5000\r\n\r\n" + b"x" * 10  # client hangs up early
    reply = raw_exchange(server, short)
    assert reply.startswith(b"HTTP/1.0 400") and b"ended after 10 of 5000" in reply
    assert request(server, "POST", "/predict", images["blue"][0].read_bytes())[0] == 200


def test_full_queue_answers_503_and_recovers(server, images):
    body = images["red"][0].read_bytes()
    for _ in range(server.config.max_queue):  # occupy every slot, as max_queue slow requests would
        assert server.admission.try_enter()
    try:
        status, answer, resp = request(server, "POST", "/predict", body)
        assert status == 503 and resp.getheader("Retry-After") == "1" and "busy" in answer["error"]
        assert request(server, "GET", "/health")[1]["in_flight"] == server.config.max_queue
    finally:
        for _ in range(server.config.max_queue):
            server.admission.leave()
    assert request(server, "POST", "/predict", body)[0] == 200


def test_concurrent_clients_with_bad_requests_mixed_in(server, images):
    good = {label: [p.read_bytes() for p in paths] for label, paths in images.items()}
    problems: list[str] = []
    counts = {"ok": 0, "bad": 0}
    lock = threading.Lock()

    def client(t: int) -> None:
        for i in range(25):
            label = ("red", "green", "blue")[(t + i) % 3]
            if i % 5 == 4:
                status, answer, _ = request(server, "POST", "/predict", b"junk %d" % i)
                ok = status == 400
                key = "bad"
            else:
                status, answer, _ = request(server, "POST", "/predict", good[label][i % 4])
                ok = status == 200 and answer["label"] == label
                key = "ok"
            with lock:
                counts[key] += 1
                if not ok:
                    problems.append(f"client {t} request {i}: {status} {answer}")

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert problems == []
    assert counts == {"ok": 160, "bad": 40}
    assert request(server, "GET", "/health")[1]["in_flight"] == 0


def test_shutdown_finishes_a_request_in_flight(classifier, images):
    srv, thread = _start(classifier)
    body = images["green"][2].read_bytes()
    with socket.create_connection(srv.server_address[:2], timeout=10) as s:
        s.sendall(b"POST /predict HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:10])
        time.sleep(0.2)  # the handler thread is now waiting for the rest of the body
        srv.shutdown()  # stop accepting; serve_forever returns
        thread.join(5)
        closer = threading.Thread(target=srv.close)  # waits for the request in flight
        closer.start()
        s.sendall(body[10:])
        reply = b"".join(iter(lambda: s.recv(65536), b""))
        closer.join(10)
    assert not closer.is_alive()
    assert reply.startswith(b"HTTP/1.0 200") and b'"label": "green"' in reply


def test_idle_connection_does_not_block_shutdown(classifier):
    srv, thread = _start(classifier, timeout_s=0.5)
    with socket.create_connection(srv.server_address[:2], timeout=10):
        time.sleep(0.1)
        start = time.monotonic()
        _stop(srv, thread)
        assert time.monotonic() - start < 5


def test_config_validation_and_busy_port(classifier):
    for bad in ({"max_bytes": 0}, {"max_queue": -1}, {"topk": 1.5}, {"port": 70000}):
        with pytest.raises(TledgeError):
            ServeConfig(**bad)
    srv, thread = _start(classifier)
    try:
        with pytest.raises(TledgeError) as e:
            PredictionServer(classifier, ServeConfig(port=srv.server_address[1]))
        assert "--port" in e.value.hint
    finally:
        _stop(srv, thread)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_serve_stops_cleanly_on_signals(models, images, sig):
    proc = subprocess.Popen([sys.executable, "-m", "tledge_runtime.cli", "serve", str(models["fp32"]), "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while True:
            line = proc.stderr.readline()
            assert line, "server exited early: " + "".join(lines)
            lines.append(line)
            if m := re.search(r"on http://([\d.]+):(\d+)", line):
                break
        assert any("backend ort-cpu (" in line for line in lines)  # the one-line backend choice
        conn = http.client.HTTPConnection(m.group(1), int(m.group(2)), timeout=10)
        conn.request("POST", "/predict", body=images["blue"][0].read_bytes())
        assert json.loads(conn.getresponse().read())["label"] == "blue"
        conn.close()
        proc.send_signal(sig)
        assert proc.wait(timeout=15) == 0
        rest = proc.stderr.read()
        assert "server stopped" in rest and "Traceback" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
