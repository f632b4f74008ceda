"""Everything bounded: admission before the body, memory for bodies, request deadlines, dropped work, shutdown."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import numpy as np
import pytest
from serve_testkit import MAX_BYTES, address, raw_exchange, request, running

from tledge_runtime.serve.batch import IMAGES, TENSOR, Batcher, Dropped
from tledge_runtime.serve.metrics import Metrics


def _slow_upload(server, declared: int, first: bytes = b"x" * 10) -> socket.socket:
    """A client that sent its headers and the first bytes of its body, and then nothing."""
    s = socket.create_connection(address(server), timeout=10)
    s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % declared + first)
    return s


def _wait_for(condition, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


def test_a_full_queue_answers_503_before_reading_the_body(classifier, images):
    with running(classifier, max_queue=2) as srv:
        slow = [_slow_upload(srv, 5000) for _ in range(2)]  # both slots held by uploads that stall
        try:
            _wait_for(lambda: srv.state.in_flight == 2)
            with socket.create_connection(address(srv), timeout=5) as s:  # headers only, the body never comes
                s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\n")
                resp = http.client.HTTPResponse(s)
                resp.begin()
                answer = json.loads(resp.read())
            assert resp.status == 503 and resp.getheader("Retry-After") == "1"
            assert "2 requests already in flight" in answer["error"]
            assert request(srv, "GET", "/v2/health/ready")[0] == 200  # probes are never queued
        finally:
            for s in slow:
                s.close()
        _wait_for(lambda: srv.state.in_flight == 0)
        assert request(srv, "POST", "/predict", images["red"][0].read_bytes())[0] == 200
        assert srv.state.metrics.sample("tledge_refused_total", reason="queue") == 1


def test_body_memory_is_a_budget_of_declared_bytes(classifier, images):
    with running(classifier, max_queue=8, body_memory=2 * MAX_BYTES) as srv:
        slow = [_slow_upload(srv, MAX_BYTES) for _ in range(2)]
        try:
            _wait_for(lambda: srv.state.body_bytes == 2 * MAX_BYTES)
            status, answer, _ = request(srv, "POST", "/predict", images["red"][0].read_bytes())
            assert status == 503 and "bytes of request bodies held" in answer["error"]
        finally:
            for s in slow:
                s.close()
        _wait_for(lambda: srv.state.body_bytes == 0)
        assert request(srv, "POST", "/predict", images["red"][0].read_bytes())[0] == 200


def test_a_slow_sender_is_cut_off_while_others_are_served(classifier, images):
    with running(classifier, timeout_s=1.0) as srv:
        start = time.monotonic()
        slow = _slow_upload(srv, 5000)
        for i in range(5):  # meanwhile everyone else is answered
            assert request(srv, "POST", "/predict", images["green"][i % 4].read_bytes())[0] == 200
        reply = b"".join(iter(lambda: slow.recv(65536), b""))
        took = time.monotonic() - start
        slow.close()
    assert reply.startswith(b"HTTP/1.1 408") and b"request deadline" in reply
    assert 0.9 < took < 4


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_a_client_dribbling_its_headers_is_disconnected(classifier, http):
    with running(classifier, timeout_s=1.0, http=http) as srv, socket.create_connection(address(srv), timeout=10) as s:
        start = time.monotonic()
        for part in (b"POST /predict HTTP/1.1\r\n", b"Host: x\r\n", b"X-Slow: 1\r\n"):
            s.sendall(part)
            time.sleep(0.4)
        rest = s.recv(65536)  # the server closed it: no request ever completed its headers in time
        assert rest == b"" and time.monotonic() - start < 4


def test_expired_jobs_are_dropped_not_run(classifier):
    metrics = Metrics({"name": "t"})
    batcher = Batcher(classifier, 8, metrics)
    try:
        image = np.zeros((1, 16, 16, 3), np.uint8)
        job = batcher.submit(IMAGES, image, deadline=time.monotonic() - 1)
        with pytest.raises(Dropped, match="deadline passed"):
            job.future.result(5)
        assert metrics.sample("tledge_dropped_total", reason="deadline") == 1
        assert metrics.sample("tledge_batch_size_count") == 0  # the model never saw it
        ok = batcher.submit(IMAGES, image, deadline=time.monotonic() + 10)
        probs, scores = ok.future.result(5)  # probabilities, and no ood_score (this model has none)
        assert probs.shape == (1, 3) and scores is None
        assert metrics.sample("tledge_batch_size_count") == 1
    finally:
        batcher.close()


def test_withdrawn_jobs_are_dropped_not_run(classifier):
    metrics = Metrics({"name": "t"})
    batcher = Batcher(classifier, 8, metrics)
    try:
        busy = np.zeros((4000, 3, 16, 16), np.float32)  # keeps the model thread busy for a moment
        for _ in range(10):  # the withdrawal must land while the job still waits; retry if the thread was faster
            first = batcher.submit(TENSOR, busy, deadline=time.monotonic() + 30)
            waiting = batcher.submit(IMAGES, np.zeros((1, 16, 16, 3), np.uint8), deadline=time.monotonic() + 30)
            waiting.gone = "disconnected"
            withdrawn = waiting.future.cancel()
            first.future.result(30)
            if withdrawn:
                break
        assert withdrawn
        _wait_for(lambda: metrics.sample("tledge_dropped_total", reason="disconnected") == 1)
        assert metrics.sample("tledge_queue_depth") == 0
    finally:
        batcher.close()


def test_a_burst_of_connections_is_answered_without_errors(classifier):
    with running(classifier) as srv:
        errors, answers = [], []
        barrier = threading.Barrier(200)

        def client() -> None:
            barrier.wait()
            try:
                answers.append(raw_exchange(srv, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
            except OSError as e:
                errors.append(repr(e))

        threads = [threading.Thread(target=client) for _ in range(200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert errors == [] and len(answers) == 200 and all(a.startswith(b"HTTP/1.1 200") for a in answers)


def test_shutdown_with_slow_clients_ends_within_the_grace_period(classifier):
    with running(classifier, timeout_s=30.0, grace_s=1.0) as srv:
        slow = [_slow_upload(srv, 5000) for _ in range(3)]  # mid-body, for ever
        headers = socket.create_connection(address(srv), timeout=10)
        headers.sendall(b"POST /predict HTTP/1.1\r\nHost")  # mid-headers
        idle = socket.create_connection(address(srv), timeout=10)  # connected, silent
        _wait_for(lambda: srv.state.in_flight == 3)
        start = time.monotonic()
        srv.stop()
        took = time.monotonic() - start
        for s in [*slow, headers, idle]:
            s.close()
    assert took < 1.0 + 1.5, f"shutdown took {took:.1f} s with a 1 s grace period"
    assert srv.state.in_flight == 0 and not srv.state.batcher.alive


def test_metrics_count_requests_latency_batches_and_the_model(classifier, images):
    with running(classifier) as srv:
        for i in range(3):
            request(srv, "POST", "/predict", images["red"][i].read_bytes())
        request(srv, "POST", "/predict", b"junk")
        status, text, resp = request(srv, "GET", "/metrics")
    body = text.decode()
    assert status == 200 and resp.getheader("Content-Type").startswith("text/plain")
    assert 'tledge_requests_total{endpoint="predict",status="200"} 3.0' in body
    assert 'tledge_requests_total{endpoint="predict",status="400"} 1.0' in body
    assert 'tledge_request_seconds_count{endpoint="predict"} 4.0' in body
    assert "tledge_batch_size_sum 3.0" in body and "tledge_queue_depth 0.0" in body
    assert 'tledge_model_info{' in body and 'name="tiny-gap-gemm_fp32"' in body and 'backend="ort-cpu"' in body


def test_an_endless_body_is_cut_off_after_a_bounded_drain(classifier):
    """After refusing a body the server reads a little more of it (so a sender slightly over the limit can
    read its 413), but an endless stream is cut off: bounded in bytes and time."""
    from tledge_runtime.serve.http import DRAIN_BYTES, DRAIN_SECONDS

    with running(classifier) as srv, socket.create_connection(address(srv), timeout=10) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (16384, b"x" * 16384)
        start, sent = time.monotonic(), 0
        try:
            while time.monotonic() - start < 20:
                s.sendall(chunk)
                sent += 16384
                time.sleep(0.001)
        except (BrokenPipeError, ConnectionResetError):
            pass
        took = time.monotonic() - start
    assert took < DRAIN_SECONDS + 5, f"still accepting the body after {took:.1f} s"
    # what the kernel buffers on both sides comes on top of what the server read
    assert sent < MAX_BYTES + DRAIN_BYTES + (16 << 20)


def test_a_client_that_expects_100_continue_gets_413_without_sending(classifier):
    with running(classifier) as srv, socket.create_connection(address(srv), timeout=5) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
                  % (MAX_BYTES * 100))
        reply = b"".join(iter(lambda: s.recv(65536), b""))
    # 413 first, not "100 Continue": reading the body (even to discard it) would invite the client to send it
    assert reply.startswith(b"HTTP/1.1 413") and b"more than the" in reply
