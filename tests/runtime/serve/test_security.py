"""Secure by default: no token off loopback is refused; 401 without the right token, before the body; TLS."""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
import ssl
import subprocess
import sys
import time

import pytest
from serve_testkit import TOKEN, request, running, self_signed

from tledge_runtime.cli import main
from tledge_runtime.errors import TledgeError
from tledge_runtime.serve.config import ServeConfig, is_loopback
from tledge_runtime.serve.server import Server

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def guarded(classifier):
    with running(classifier, token=TOKEN) as srv:
        yield srv


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "camera.local"])
def test_a_non_loopback_bind_without_a_token_is_refused(classifier, host):
    with pytest.raises(TledgeError) as e:
        Server(classifier, ServeConfig(host=host, port=0))
    assert "without a token" in e.value.message and "--token" in e.value.hint and "--insecure" in e.value.hint


def test_the_cli_refuses_in_one_line_before_loading_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TLEDGE_TOKEN", raising=False)
    status = main(["serve", str(tmp_path / "not-even-a-model.onnx"), "--host", "0.0.0.0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status != 0 and len(err) == 1 and "refusing to serve on 0.0.0.0:8080 without a token" in err[0]


def test_loopback_needs_nothing_and_short_tokens_are_refused():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.1", "::1", "localhost", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com"))
    with pytest.raises(TledgeError, match="fewer than the 16"):
        ServeConfig(token="short")


def test_insecure_serves_off_loopback_and_says_what_it_exposes(classifier, images, caplog):
    with caplog.at_level(logging.WARNING, logger="tledge_runtime"):
        with running(classifier, host="0.0.0.0", insecure=True) as srv:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
            conn.request("POST", "/predict", body=images["red"][0].read_bytes())
            assert conn.getresponse().status == 200
            conn.close()
    assert any("--insecure: anyone who can reach 0.0.0.0" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("path", ["/v2", "/v2/models/tiny-gap-gemm_fp32", "/metrics", "/info", "/nowhere"])
def test_metadata_and_metrics_need_the_token(guarded, path):
    status, answer, resp = request(guarded, "GET", path)
    assert status == 401 and answer["error"] == "missing bearer token" and "Bearer" in answer["hint"]
    assert resp.getheader("WWW-Authenticate").startswith("Bearer")
    status, answer, _ = request(guarded, "GET", path, headers={"Authorization": "Bearer " + "x" * len(TOKEN)})
    assert status == 401 and answer["error"] == "wrong bearer token"
    status, _, _ = request(guarded, "GET", path, headers=AUTH)
    assert status == (404 if path == "/nowhere" else 200)


@pytest.mark.parametrize("path", ["/health", "/v2/health/live", "/v2/health/ready", "/v2/models/tiny-gap-gemm_fp32/ready"])
def test_liveness_and_readiness_stay_open(guarded, path):
    assert request(guarded, "GET", path)[0] == 200


def test_inference_is_refused_before_the_body_is_read(guarded, images):
    # Headers announce a 60 KB body that never comes: the 401 arrives at once, nothing is waited for.
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=5) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n")
        start = time.monotonic()
        reply = s.recv(65536)
        assert time.monotonic() - start < 2
    assert reply.startswith(b"HTTP/1.1 401")
    status, answer, _ = request(guarded, "POST", "/predict", images["blue"][0].read_bytes(), headers=AUTH)
    assert status == 200 and answer["label"] == "blue"
    assert guarded.state.metrics.sample("tledge_requests_total", endpoint="predict", status="401") >= 1


def test_tritonclient_sends_the_token_as_a_header(guarded):
    import numpy as np
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    client = th.InferenceServerClient(f"127.0.0.1:{guarded.port}")
    try:
        with pytest.raises(InferenceServerException) as e:
            client.get_model_metadata(guarded.name)
        assert e.value.status() == "401"
        meta = client.get_model_metadata(guarded.name, headers=AUTH)
        x = th.InferInput("input", [1, 3, 16, 16], "FP32")
        x.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
        assert client.infer(guarded.name, [x], headers=AUTH).as_numpy("logits").shape == (1, 3)
        assert meta["inputs"][0]["name"] == "input"
    finally:
        client.close()


def test_tls_with_a_certificate(classifier, images, tmp_path):
    cert, key = self_signed(tmp_path)
    with running(classifier, ssl_certfile=str(cert), ssl_keyfile=str(key), token=TOKEN) as srv:
        assert srv.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        conn = http.client.HTTPSConnection("127.0.0.1", srv.port, timeout=10, context=context)
        conn.request("POST", "/predict", body=images["green"][0].read_bytes(), headers=AUTH)
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["label"] == "green"
        conn.close()
        plain = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)  # no TLS: no answer
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            plain.request("GET", "/health")
            plain.getresponse()
        plain.close()
    with pytest.raises(TledgeError, match="TLS"):
        Server(classifier, ServeConfig(port=0, ssl_certfile=str(key), ssl_keyfile=str(cert)))


def test_the_cli_reads_the_token_from_the_environment(models, images):
    env = {**os.environ, "TLEDGE_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "tledge_runtime.cli", "serve", str(models["fp32"]), "--host",
                             "0.0.0.0", "--port", "0"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        while not (m := re.search(r"on http://[\d.]+:(\d+)", lines[-1] if lines else "")):
            line = proc.stderr.readline()
            assert line, "server exited early: " + "".join(lines)
            lines.append(line)
        assert any("without TLS: the token travels in clear text" in line for line in lines)
        conn = http.client.HTTPConnection("127.0.0.1", int(m.group(1)), timeout=10)
        conn.request("POST", "/predict", body=images["red"][0].read_bytes())
        assert conn.getresponse().status == 401
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", int(m.group(1)), timeout=10)
        conn.request("POST", "/predict", body=images["red"][0].read_bytes(), headers=AUTH)
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
