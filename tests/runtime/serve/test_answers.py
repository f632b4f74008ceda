"""serve with a model that carries answers: /predict and the Open Inference Protocol (through the real
tritonclient) return the prediction set, "unknown" and ood_score; /metrics counts unknown and unsure answers and
spreads the scores; --capture keeps the flagged inputs."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from runtime_testkit import colour_image, write_answered_model
from serve_testkit import request, running

from tledge_runtime import Classifier

tritonclient_http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is part of the dev extra")


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


GREY = _png(np.full((30, 30, 3), 128, np.uint8))
RED = _png(colour_image("red", 3))
ORANGE = _png(np.array([[[200, 150, 40]] * 30] * 30, np.uint8))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("answers")
    model = write_answered_model(folder / "answered.onnx", set_threshold=0.8)
    with Classifier(model, device="cpu") as clf, running(clf, capture=str(folder / "captured")) as server:
        yield server, folder / "captured"


def test_predict_answers_with_the_set_and_unknown(served):
    server, _ = served
    status, red, _ = request(server, "POST", "/predict", RED)
    assert status == 200 and red["label"] == "red" and red["candidates"] == ["red"] and red["unknown"] is False
    status, grey, _ = request(server, "POST", "/predict", GREY)
    assert status == 200 and grey["unknown"] is True and isinstance(grey["ood_score"], float)
    status, orange, _ = request(server, "POST", "/predict", ORANGE)
    assert orange["candidates"] == ["red", "green"] and orange["unknown"] is False


def test_the_open_inference_protocol_names_the_new_outputs(served):
    server, _ = served
    client = tritonclient_http.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        meta = request(server, "GET", "/info")[1]
        image_model = meta["names"][1]
        inp = tritonclient_http.InferInput("image", [2, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[RED], [GREY]], dtype=np.object_))
        result = client.infer(image_model, [inp])
        assert result.as_numpy("unknown").reshape(-1).tolist() == [False, True]
        assert result.as_numpy("ood_score").shape == (2, 1)
        assert result.as_numpy("candidates")[0, 0] == b"red"
        graph = client.get_model_metadata(meta["names"][0])
        assert [o["name"] for o in graph["outputs"]] == ["logits", "ood_score"]
        x = np.zeros((1, 3, 16, 16), np.float32)
        t = tritonclient_http.InferInput("input", list(x.shape), "FP32")
        t.set_data_from_numpy(x)
        out = client.infer(meta["names"][0], [t])
        assert out.as_numpy("ood_score").shape == (1, 1) and out.as_numpy("logits").shape == (1, 3)
    finally:
        client.close()


def test_metrics_count_unknown_and_unsure_and_spread_the_scores(served):
    server, _ = served
    metrics = server.state.metrics
    before = {k: metrics.sample(f"tledge_{k}_total", model=server.state.name) for k in ("answers", "unknown", "unsure")}
    for body in (RED, GREY, GREY, ORANGE):
        assert request(server, "POST", "/predict", body)[0] == 200
    after = {k: metrics.sample(f"tledge_{k}_total", model=server.state.name) for k in ("answers", "unknown", "unsure")}
    # grey frames are unknown and (every class in the set at this threshold) unsure too; orange is unsure only
    assert {k: after[k] - before[k] for k in after} == {"answers": 4, "unknown": 2, "unsure": 3}
    status, body, _ = request(server, "GET", "/metrics")
    assert status == 200 and b"tledge_ood_score_bucket" in body and b"tledge_top_score_bucket" in body


def test_capture_keeps_what_was_flagged(served):
    server, captured = served
    request(server, "POST", "/predict", GREY)
    request(server, "POST", "/predict", ORANGE)
    request(server, "POST", "/predict", RED)
    files = {p.parent.name for p in captured.rglob("*.png")}
    assert files == {"unknown", "red"}
    records = [json.loads(p.read_text()) for p in captured.rglob("*.json")]
    assert all(r["model_sha256"] and (r["unknown"] or r["unsure"]) for r in records)
