"""The HTTP server on loopback: /predict for curl users, bad requests, limits, keep-alive, concurrency, the CLI."""

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
from serve_testkit import MAX_BYTES, address, raw_exchange, request, running

from tledge_runtime.errors import TledgeError
from tledge_runtime.serve.config import ServeConfig
from tledge_runtime.serve.server import Server


@pytest.fixture(scope="module", params=["httptools", "h11"])
def server(classifier, request):
    """The server with each HTTP parser uvicorn offers (httptools when installed, h11 otherwise)."""
    with running(classifier, http=request.param) as srv:
        yield srv


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


def test_keep_alive_serves_many_requests_on_one_connection(server, images):
    conn = http.client.HTTPConnection(*address(server), timeout=10)
    try:
        for i in range(6):
            label = ("red", "green", "blue")[i % 3]
            status, body, resp = request(server, "POST", "/predict", images[label][i % 4].read_bytes(), conn=conn)
            assert status == 200 and body["label"] == label and resp.version == 11
        sock = conn.sock
        took = []
        for _ in range(10):
            start = time.perf_counter()
            assert request(server, "GET", "/health", conn=conn)[0] == 200
            took.append(time.perf_counter() - start)
        assert conn.sock is sock  # the same TCP connection all along
        # Answers leave at once (TCP_NODELAY): no 40 ms wait for the client's delayed ACK on each request.
        assert sorted(took)[5] < 0.03, took
    finally:
        conn.close()


@pytest.mark.parametrize("body, headers, status, expected", [
    (b"this is not an image", {}, 400, "request body: not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, {}, 400, "request body"),
    (b"", {}, 400, "empty request body"),
    (b"x" * (MAX_BYTES + 1), {}, 413, "more than the"),
    (b"--b\r\n\r\nabc", {"Content-Type": "multipart/form-data; boundary=b"}, 415, "multipart"),
])
def test_bad_requests_get_4xx_json_with_a_hint(server, images, body, headers, status, expected):
    got, answer, _ = request(server, "POST", "/predict", body, headers)
    assert got == status
    assert expected in answer["error"] and answer["hint"]
    ok, good, _ = request(server, "POST", "/predict", images["red"][0].read_bytes())  # still serving
    assert ok == 200 and good["label"] == "red"


def test_a_chunked_body_is_cut_at_the_limit_while_it_streams(server):
    sent = []

    def chunks():  # a body with no Content-Length: the limit applies to what arrives
        for i in range(8):
            if i == 5:  # past the limit: the server has refused by now; a server that closed at once would
                time.sleep(0.3)  # make the next sends fail with a broken pipe before the client reads its 413
            sent.append(1)
            yield b"x" * (MAX_BYTES // 4)

    conn = http.client.HTTPConnection(*address(server), timeout=10)
    try:
        conn.request("POST", "/predict", body=chunks(), encode_chunked=True)
        resp = conn.getresponse()
        answer = json.loads(resp.read())
    except (BrokenPipeError, ConnectionResetError):
        pytest.fail("the server must answer 413, not drop the connection")
    finally:
        conn.close()
    assert resp.status == 413 and "more than" in answer["error"]


@pytest.mark.parametrize("query", ["topk=abc", "topk=0", "topk=-2"])
def test_bad_topk_is_400(server, images, query):
    status, answer, _ = request(server, "POST", f"/predict?{query}", images["red"][0].read_bytes())
    assert status == 400 and "topk" in answer["error"]


def test_routes_and_methods_answer_json(server):
    status, answer, _ = request(server, "GET", "/nope")
    assert status == 404 and "/v2/models/<name>/infer" in answer["hint"]
    status, answer, resp = request(server, "GET", "/predict")
    assert status == 405 and resp.getheader("Allow") == "POST" and answer["error"]
    status, _, resp = request(server, "POST", "/health", b"x")
    assert status == 405 and "GET" in resp.getheader("Allow")
    assert request(server, "PUT", "/predict", b"x")[0] == 405
    assert request(server, "DELETE", "/elsewhere")[0] == 404


def test_health_and_info(server, classifier):
    status, health, _ = request(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["backend"] == "ort-cpu"
    status, info, _ = request(server, "GET", "/info")
    assert status == 200 and info["labels"] == ["red", "green", "blue"]
    assert info["limits"]["max_bytes"] == MAX_BYTES and info["limits"]["max_queue"] == 8
    assert info["meta"]["preprocess"]["height"] == 16
    assert info["names"] == ["tiny-gap-gemm_fp32", "tiny-gap-gemm_fp32_image"]


def test_malformed_http_is_answered_in_json_and_survived(server, images):
    reply = raw_exchange(server, b"GARBAGE\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400") and b'"error": "malformed HTTP request"' in reply
    bad_length = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: many\r\n\r\n"
    assert raw_exchange(server, bad_length).startswith(b"HTTP/1.1 400")
    short = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"x" * 10  # client hangs up early
    assert raw_exchange(server, short) == b""  # nobody is left to answer; the server just lets go
    assert request(server, "POST", "/predict", images["blue"][0].read_bytes())[0] == 200


def test_concurrent_clients_with_bad_requests_mixed_in(server, images):
    good = {label: [p.read_bytes() for p in paths] for label, paths in images.items()}
    problems: list[str] = []
    counts = {"ok": 0, "bad": 0}
    lock = threading.Lock()

    def client(t: int) -> None:
        conn = http.client.HTTPConnection(*address(server), timeout=10)
        for i in range(15):
            label = ("red", "green", "blue")[(t + i) % 3]
            if i % 5 == 4:
                status, answer, _ = request(server, "POST", "/predict", b"junk %d" % i, conn=conn)
                ok, key = status == 400, "bad"
            else:
                status, answer, _ = request(server, "POST", "/predict", good[label][i % 4], conn=conn)
                ok, key = status == 200 and answer["label"] == label, "ok"
            with lock:
                counts[key] += 1
                if not ok:
                    problems.append(f"client {t} request {i}: {status} {answer}")
        conn.close()

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert problems == []
    assert counts == {"ok": 96, "bad": 24}
    assert request(server, "GET", "/health")[1]["in_flight"] == 0
    # Every good image went through the model once, in runs of one or more (batching).
    metrics = server.state.metrics
    assert metrics.sample("tledge_batch_size_sum") >= 96


def test_config_validation_and_busy_port(classifier):
    for bad in ({"max_bytes": 0}, {"max_queue": -1}, {"topk": 1.5}, {"port": 70000}, {"timeout_s": 0},
                {"body_memory": 10, "max_bytes": 20}, {"ssl_certfile": "c.pem"}, {"name": "a/b"}, {"http": "h2"}):
        with pytest.raises(TledgeError):
            ServeConfig(**bad)
    with running(classifier) as srv:
        with pytest.raises(TledgeError) as e:
            Server(classifier, ServeConfig(port=srv.port))
        assert "--port" in e.value.hint


def _start_cli(args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen([sys.executable, "-m", "tledge_runtime.cli", "serve", *args], stderr=subprocess.PIPE,
                            text=True, env=env)
    lines = []
    while True:
        line = proc.stderr.readline()
        assert line, "server exited early: " + "".join(lines)
        lines.append(line)
        if m := re.search(r"on http://([\d.]+):(\d+)", line):
            assert any("backend ort-cpu (" in line for line in lines)  # the one-line backend choice
            return proc, m.group(1), int(m.group(2))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_serve_stops_cleanly_on_signals(models, images, sig):
    proc, host, port = _start_cli([str(models["fp32"]), "--port", "0"])
    try:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("POST", "/predict", body=images["blue"][0].read_bytes())
        assert json.loads(conn.getresponse().read())["label"] == "blue"
        # An idle keep-alive connection stays open across the signal: it must not hold the shutdown.
        proc.send_signal(sig)
        assert proc.wait(timeout=15) == 0
        conn.close()
        rest = proc.stderr.read()
        assert "server stopped" in rest and "Traceback" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_options_reach_the_server(models, images):
    proc, host, port = _start_cli([str(models["fp32"]), "--port", "0", "--name", "colours", "--max-bytes", "1000",
                                   "--timeout", "7", "--topk", "2"])
    try:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/info")
        info = json.loads(conn.getresponse().read())
        assert info["names"] == ["colours", "colours_image"]
        assert info["limits"]["max_bytes"] == 1000 and info["limits"]["timeout_s"] == 7
        conn.request("GET", "/v2/models/colours")
        assert json.loads(conn.getresponse().read())["name"] == "colours"
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_a_sigterm_with_requests_in_flight_answers_them(classifier, images):
    body = images["green"][2].read_bytes()
    with running(classifier, grace_s=5.0) as srv, socket.create_connection(address(srv), timeout=10) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:10])
        time.sleep(0.2)  # the request is admitted and waits for the rest of its body
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        time.sleep(0.2)
        s.sendall(body[10:])
        reply = b"".join(iter(lambda: s.recv(65536), b""))
        stopper.join(10)
    assert not stopper.is_alive()
    assert reply.startswith(b"HTTP/1.1 200") and b'"label":"green"' in reply.replace(b" ", b"")


def test_the_runtime_and_its_cli_import_no_web_stack():
    code = ("import sys, tledge_runtime, tledge_runtime.cli, tledge_runtime.serve.served_model, tledge_runtime.serve.oip; "
            "print(sorted(m for m in ('uvicorn', 'starlette', 'prometheus_client', 'anyio', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
