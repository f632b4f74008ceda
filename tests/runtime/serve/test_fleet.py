"""serve --model-dir on a real server: concurrent clients through live swaps get no error and scores that match the
version each answer names; bad versions never serve and say why in the index and /metrics; the repository extension."""

from __future__ import annotations

import http.client
import io
import json
import threading
import time

import numpy as np
import pytest
from fleet_testkit import expected_probabilities, make_key, version_folder
from PIL import Image
from runtime_testkit import colour_image
from serve_testkit import TOKEN, address, request, running

from tledge_runtime.repository import ModelRepository

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _png(name: str, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(colour_image(name, seed=seed)).save(buf, "PNG")
    return buf.getvalue()


def _wait(predicate, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def signed_repo(tmp_path):
    private, public = make_key(tmp_path / "keys")
    version_folder(tmp_path / "models", 1, key=private)
    repo = ModelRepository(tmp_path / "models", trusted_keys=[public], device="cpu", settle_s=0.0, warmup_batch=4)
    yield tmp_path / "models", private, repo
    repo.close()


def test_clients_through_swaps_get_answers_of_the_version_they_name(signed_repo):
    root, private, repo = signed_repo
    body = _png("blue", 5)
    prepared = repo.current.classifier.prepare(body)
    failures, mismatches, seen = [], [], set()
    stop = threading.Event()

    def client(srv) -> None:
        conn = http.client.HTTPConnection(*address(srv), timeout=10)
        while not stop.is_set():
            status, answer, _ = request(srv, "POST", "/predict?topk=3", body, AUTH, conn=conn)
            if status != 200:
                failures.append((status, answer))
                continue
            version = int(answer["model_version"])
            seen.add(version)
            expected = expected_probabilities(version, prepared)
            got = {p["index"]: p["score"] for p in answer["topk"]}
            if any(abs(got[i] - expected[i]) > 1e-5 for i in got):
                mismatches.append(version)
        conn.close()

    with running(repo, token=TOKEN, poll_s=0.1, max_queue=64) as srv:
        threads = [threading.Thread(target=client, args=(srv,)) for _ in range(8)]
        for t in threads:
            t.start()
        for v in range(2, 6):
            version_folder(root, v, key=private)
            _wait(lambda v=v: srv.state.live.version == str(v))
            time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join()
        metrics = srv.state.metrics
        assert metrics.sample("tledge_model_swaps_total") == 4 and metrics.sample("tledge_model_version") == 5
    assert failures == [] and mismatches == [] and seen == {1, 2, 3, 4, 5}


def test_bad_versions_never_serve_and_say_why(signed_repo, tmp_path):
    root, private, repo = signed_repo
    other, _ = make_key(tmp_path / "other-keys", "other")
    with running(repo, token=TOKEN, poll_s=0.1) as srv:
        version_folder(root, 2, key=other)
        version_folder(root, 3, key=private, scale=2.0)
        _wait(lambda: srv.state.metrics.sample("tledge_versions_refused_total", reason="check") == 1)
        _wait(lambda: srv.state.metrics.sample("tledge_versions_refused_total", reason="signature") == 1)
        status, index, _ = request(srv, "GET", "/v2/repository/index", headers=AUTH)
        assert status == 200
        states = {int(v["version"]): v for v in index}
        assert states[1]["state"] == "READY"
        assert states[2]["state"] == "UNAVAILABLE" and "not trusted here" in states[2]["reason"]
        assert states[3]["state"] == "UNAVAILABLE" and "refused (check)" in states[3]["reason"]
        status, answer, _ = request(srv, "POST", "/predict", _png("red", 1), AUTH)
        assert status == 200 and answer["model_version"] == "1"
        status, info, _ = request(srv, "GET", "/info", headers=AUTH)
        assert info["version"] == "1" and info["signature"]["verified"] is True
        assert info["signature"]["key"] == repo.current.signature.key.short
        status, ready_only, _ = request(srv, "POST", "/v2/repository/index", json.dumps({"ready": True}).encode(),
                                        AUTH)
        assert [v["version"] for v in ready_only] == ["1"]
        assert request(srv, "GET", "/v2/repository/index")[0] == 401  # the extension is token-protected


def test_load_unload_and_versions_in_oip_answers(signed_repo):
    root, private, repo = signed_repo
    with running(repo, token=TOKEN) as srv:  # no --poll: new versions come in on a load request
        name = repo.name
        version_folder(root, 2, key=private)
        assert srv.state.live.version == "1"
        assert request(srv, "POST", f"/v2/repository/models/{name}/load", headers=AUTH)[0] == 200
        assert srv.state.live.version == "2"
        tensor = np.zeros((1, 3, 16, 16), dtype=np.float32)
        doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": tensor.ravel().tolist()}]}
        status, answer, _ = request(srv, "POST", f"/v2/models/{name}/infer", json.dumps(doc).encode(), AUTH)
        assert status == 200 and answer["model_version"] == "2"
        assert request(srv, "GET", f"/v2/models/{name}", headers=AUTH)[1]["versions"] == ["2"]
        assert request(srv, "GET", f"/v2/models/{name}/versions/1", headers=AUTH)[0] == 404
        assert request(srv, "POST", f"/v2/repository/models/{name}/unload", headers=AUTH)[0] == 200
        status, answer, _ = request(srv, "POST", "/predict", _png("red", 1), AUTH)
        assert status == 503 and "is loaded" in answer["error"]
        assert request(srv, "GET", "/v2/health/ready")[0] == 503
        assert request(srv, "POST", f"/v2/repository/models/{name}/load", headers=AUTH)[0] == 200
        assert request(srv, "GET", "/v2/health/ready")[0] == 200
        status, answer, _ = request(srv, "POST", "/v2/repository/models/other/load", headers=AUTH)
        assert status == 404 and name in answer["hint"]
        status, answer, _ = request(srv, "POST", f"/v2/repository/models/{name}/load", b"x" * (70 << 10), AUTH)
        assert status == 413


def test_a_single_file_server_names_version_1_and_its_signature(models):
    from tledge_runtime import Classifier

    with Classifier(models["fp32"], device="cpu") as clf, running(clf) as srv:
        info = request(srv, "GET", "/info")[1]
        assert info["version"] == "1" and info["signature"] == "unsigned"
        answer = request(srv, "POST", "/predict", _png("green", 2))[1]
        assert answer["model_version"] == "1"
        assert request(srv, "GET", "/v2/repository/index")[0] == 404  # the extension needs --model-dir


def test_serve_command_takes_a_file_or_a_model_dir(models, tmp_path, capsys):
    from tledge_runtime.cli import main

    assert main(["serve", "--port", "0"]) == 2
    assert main(["serve", str(models["fp32"]), "--model-dir", str(tmp_path), "--port", "0"]) == 2
    assert main(["serve", str(models["fp32"]), "--poll", "1", "--port", "0"]) == 2
    err = capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's own refusal: not a positive interval
        main(["serve", "--model-dir", str(tmp_path), "--poll", "0", "--port", "0"])
    assert e.value.code == 2 and "is not a number of seconds" in capsys.readouterr().err
    assert "a model file or --model-dir DIR" in err and "--poll and --allow-rollback need --model-dir" in err
    assert main(["serve", "--model-dir", str(tmp_path), "--port", "0"]) == 2  # an empty repository: says so
    assert "holds no models" in capsys.readouterr().err
