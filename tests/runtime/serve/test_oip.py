"""The Open Inference Protocol (v2) through the real ``tritonclient[http]`` client against ``tledge-runtime serve``."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from serve_testkit import request, running

tritonclient_http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is part of the dev extra")
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def servers(models):
    """One server per model variant: fp32 (float NCHW), fp16 (float16 in and out), baked (uint8 NHWC)."""
    from tledge_runtime import Classifier

    with Classifier(models["fp32"], device="cpu") as fp32, Classifier(models["fp16"], device="cpu") as fp16, \
            Classifier(models["baked"], device="cpu") as baked:
        with running(fp32) as a, running(fp16) as b, running(baked) as c:
            yield {"fp32": a, "fp16": b, "baked": c}


@pytest.fixture()
def client(servers):
    clients = {}

    def get(variant: str):
        if variant not in clients:
            clients[variant] = tritonclient_http.InferenceServerClient(f"127.0.0.1:{servers[variant].port}")
        return clients[variant]

    yield get
    for c in clients.values():
        c.close()


def _tensor(variant: str, n: int = 3) -> np.ndarray:
    rng = np.random.default_rng(7)
    if variant == "baked":
        return rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    x = rng.normal(0, 1, (n, 3, 16, 16))
    return x.astype(np.float16 if variant == "fp16" else np.float32)


def _onnxruntime(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_server_and_model_readiness(client, servers):
    c = client("fp32")
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("tiny-gap-gemm_fp32") and c.is_model_ready("tiny-gap-gemm_fp32_image")
    assert not c.is_model_ready("no_such_model")
    meta = c.get_server_metadata()
    assert meta["name"] == "tledge-runtime" and "binary_tensor_data" in meta["extensions"]


@pytest.mark.parametrize("variant, datatype, shape, out_type", [
    ("fp32", "FP32", [-1, 3, 16, 16], "FP32"),
    ("fp16", "FP16", [-1, 3, 16, 16], "FP16"),
    ("baked", "UINT8", [-1, 16, 16, 3], "FP32"),
])
def test_model_metadata_names_the_triton_tensors(client, variant, datatype, shape, out_type):
    name = f"tiny-gap-gemm_{'fp16' if variant == 'fp16' else 'fp32'}"
    meta = client(variant).get_model_metadata(name)
    assert meta["name"] == name and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": datatype, "shape": shape}]
    assert meta["outputs"] == [{"name": "logits", "datatype": out_type, "shape": [-1, 3]}]
    image = client(variant).get_model_metadata(name + "_image")
    assert image["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1, 1]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in image["outputs"]] == [
        ("label", "BYTES", [-1, 1]), ("score", "FP32", [-1, 1]), ("probabilities", "FP32", [-1, 3])]


@pytest.mark.parametrize("variant", ["fp32", "fp16", "baked"])
@pytest.mark.parametrize("binary", [True, False])
def test_infer_a_preprocessed_tensor_equals_local_onnxruntime(client, servers, models, variant, binary):
    server = servers[variant]
    x = _tensor(variant)
    inp = tritonclient_http.InferInput("input", list(x.shape), {"fp32": "FP32", "fp16": "FP16", "baked": "UINT8"}[variant])
    inp.set_data_from_numpy(x, binary_data=binary)
    out = tritonclient_http.InferRequestedOutput("logits", binary_data=binary)
    result = client(variant).infer(server.name, [inp], outputs=[out])
    got = result.as_numpy("logits")
    expected = _onnxruntime(models[variant], x)
    assert got.dtype == expected.dtype and got.shape == (3, 3)
    np.testing.assert_allclose(got.astype(np.float64), expected.astype(np.float64), atol=1e-4, rtol=0)


def test_infer_encoded_images_answers_labels_scores_and_top_k(client, servers, classifier, images):
    paths = [images["red"][0], images["green"][1], images["blue"][2]]  # PNG and JPEG
    encoded = np.array([[p.read_bytes()] for p in paths], dtype=np.object_)
    inp = tritonclient_http.InferInput("image", [3, 1], "BYTES")
    inp.set_data_from_numpy(encoded)
    outputs = [tritonclient_http.InferRequestedOutput("label"), tritonclient_http.InferRequestedOutput("score"),
               tritonclient_http.InferRequestedOutput("probabilities", class_count=2)]
    result = client("fp32").infer(servers["fp32"].name + "_image", [inp], outputs=outputs)
    assert result.as_numpy("label").reshape(-1).tolist() == [b"red", b"green", b"blue"]
    scores = result.as_numpy("score").reshape(-1)
    expected = [classifier.predict(p).score for p in paths]
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    top = result.as_numpy("probabilities")  # Triton's classification extension: "score:index:label"
    assert top.shape == (3, 2)
    assert [row[0].split(b":")[2] for row in top] == [b"red", b"green", b"blue"]
    assert float(top[1][0].split(b":")[0]) == pytest.approx(expected[1], abs=1e-5)
    # Without outputs named, every output comes back (binary, as tritonclient asks by default).
    everything = client("fp32").infer(servers["fp32"].name + "_image", [inp])
    probs = everything.as_numpy("probabilities")
    np.testing.assert_allclose(probs, np.stack([classifier.scores(p) for p in paths]), atol=1e-6)


def test_versioned_routes_and_json_only_requests(servers):
    server = servers["fp32"]
    x = _tensor("fp32", 1)
    doc = {"id": "r1", "inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.reshape(-1).tolist()}]}
    status, answer, _ = request(server, "POST", f"/v2/models/{server.name}/versions/1/infer", json.dumps(doc).encode())
    assert status == 200 and answer["id"] == "r1" and answer["model_name"] == server.name
    assert answer["outputs"][0]["name"] == "logits" and answer["outputs"][0]["shape"] == [1, 3]
    status, answer, _ = request(server, "POST", f"/v2/models/{server.name}/versions/2/infer", json.dumps(doc).encode())
    assert status == 404 and "version" in answer["error"]


def _raw_infer(server, doc: dict, binary: bytes = b"", header_length: int | None = None, model: str | None = None):
    body = json.dumps(doc).encode() + binary
    headers = {"Inference-Header-Content-Length": str(header_length)} if header_length is not None else {}
    return request(server, "POST", f"/v2/models/{model or server.name}/infer", body, headers)


@pytest.mark.parametrize("doc, binary, header, status, words", [
    ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": [0.0] * 768}]}, b"", None,
     400, "takes one input 'input'"),
    ({"inputs": [{"name": "input", "datatype": "FP16", "shape": [1, 3, 16, 16], "data": [0.0] * 768}]}, b"", None,
     400, "must be FP32"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0.0] * 192}]}, b"", None,
     400, "has shape [1, 3, 8, 8]"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": [0.0] * 5}]}, b"", None,
     400, "needs 768"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 16, 16],
                  "parameters": {"binary_data_size": 3072}}]}, b"\x00" * 100, "header", 400, "runs past"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": [0.0] * 768}],
      "outputs": [{"name": "probs"}]}, b"", None, 400, "has no output 'probs'"),
    ({"inputs": []}, b"", None, 400, "non-empty 'inputs'"),
    ({"inputs": [{"name": "input", "datatype": "COMPLEX", "shape": [1]}]}, b"", None, 400, "unknown datatype"),
])
def test_protocol_errors_are_json_400s(servers, doc, binary, header, status, words):
    server = servers["fp32"]
    length = len(json.dumps(doc).encode()) if header else None
    got, answer, _ = _raw_infer(server, doc, binary, length)
    assert got == status and words in answer["error"] and answer["hint"], answer


def test_image_model_errors(client, servers):
    server = servers["fp32"]
    status, answer, _ = request(server, "POST", "/v2/models/nope/infer", b"{}")
    assert status == 404 and "tiny-gap-gemm_fp32_image" in answer["hint"]
    status, answer, _ = request(server, "POST", f"/v2/models/{server.name}/infer", b"not json")
    assert status == 400 and "not valid JSON" in answer["error"]
    junk = tritonclient_http.InferInput("image", [2, 1], "BYTES")
    junk.set_data_from_numpy(np.array([[b"\x89PNG\r\n\x1a\nbroken"], [b"junk"]], dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        client("fp32").infer(server.name + "_image", [junk])
    assert e.value.status() == "400" and "image 0" in e.value.message()
    label = tritonclient_http.InferRequestedOutput("label", class_count=2)
    ok = tritonclient_http.InferInput("image", [1, 1], "BYTES")
    ok.set_data_from_numpy(np.array([[b"x"]], dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        client("fp32").infer(server.name + "_image", [ok], outputs=[label])
    assert e.value.status() == "400" and "no labels" in e.value.message()
