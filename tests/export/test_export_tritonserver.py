"""The Triton repositories tledge writes, loaded by a real Triton Inference Server (2.51, from nvidia-pytriton).

That ``tritonserver`` starts on a CPU-only machine and carries one backend, Python. So:
- every graph model's config.pbtxt must parse (Triton reads it against its ModelConfig schema:
  field names, enums such as TYPE_UINT8 / FORMAT_NHWC / KIND_GPU) and its only load failure must
  be the missing ONNX Runtime / TensorRT backend library; a config that does not parse, the
  control, fails otherwise;
- Triton validates tensors (dims, types, formats, labels) only once a backend loads, so each
  graph config also gets a twin on the Python backend (platform swapped for ``backend:
  "python"``, nothing else changed) that must load; an invalid twin, the control, must not;
- every ``_image`` model must load in the Python backend (tledge_runtime opening the sibling ONNX
  inside Triton), show the same metadata as ``tledge-runtime serve``, and answer tritonclient.

The binary comes from ``TLEDGE_TRITONSERVER`` or the installed ``pytriton`` package
(``pip install --no-deps nvidia-pytriton``: the wheel pins numpy<2, the binary needs none of it).
Triton's Python backend runs model code with the first ``python3`` on PATH; this test puts
``TLEDGE_TRITON_PYTHON`` (default: this interpreter) there.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tledge_export.triton import TritonModel, write_repository
from tledge_runtime.backends.loader import read_meta
from tledge_runtime.serve.served_model import IMAGE_SUFFIX, default_name

MISSING = "unable to find backend library for backend '{}'"
TWIN = "__on_python"


def _tritonserver() -> Path | None:
    if os.environ.get("TLEDGE_TRITONSERVER"):
        return Path(os.environ["TLEDGE_TRITONSERVER"])
    import importlib.util

    spec = importlib.util.find_spec("pytriton")  # located, not imported: its Python side needs what --no-deps skips
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "tritonserver" / "bin" / "tritonserver"
    return binary if binary.is_file() else None


BINARY = _tritonserver()
PYTHON = Path(os.environ.get("TLEDGE_TRITON_PYTHON", sys.executable))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    BINARY is None, reason="no tritonserver binary: pip install --no-deps nvidia-pytriton, or set TLEDGE_TRITONSERVER")]


def _python_backend(folder: Path) -> Path:
    """A backend directory holding the Python backend with the stub built for the Python that will run the models."""
    root = BINARY.parent.parent
    version = subprocess.run([str(PYTHON), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    target = folder / "python"
    target.mkdir(parents=True)
    for source in (root / "backends" / "python" / "libtriton_python.so",
                   root / "backends" / "python" / "triton_python_backend_utils.py", stub):
        if source.exists():  # symlinks: the stub finds its libraries relative to where it really is
            (target / source.name).symlink_to(source)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, data: bytes | None = None) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _python_twin(folder: Path, name: str, dims: str | None = None) -> None:
    """``folder``'s config on the Python backend (a model that does nothing): Triton then validates its tensors."""
    config = (folder / "config.pbtxt").read_text()
    config = config.replace(f'name: "{folder.name}"', f'name: "{name}"').replace("KIND_GPU", "KIND_CPU")
    config = "\n".join('backend: "python"' if line.startswith("platform:") else line for line in config.splitlines())
    if dims is not None:
        config = config.replace(f"dims: [ {len((folder / 'labels.txt').read_text().splitlines())} ]", dims)
    twin = folder.parent / name
    (twin / "1").mkdir(parents=True)
    (twin / "1" / "model.py").write_text("class TritonPythonModel:\n    def execute(self, requests):\n        return []\n")
    (twin / "labels.txt").write_bytes((folder / "labels.txt").read_bytes())
    (twin / "config.pbtxt").write_text(config + "\n")


@pytest.fixture(scope="module")
def repository(exported, exported_cli, tmp_path_factory) -> Path:
    """What `tledge export --triton` wrote, the same for the CPU int8 flavour and a TensorRT plan, and a control."""
    root = tmp_path_factory.mktemp("triton") / "models"
    shutil.copytree(exported_cli.out / "triton", root)
    files = [exported.get(fmt).path for fmt in ("fp32", "fp16", "int8")]
    cpu = [TritonModel(default_name(read_meta(f)), f.read_bytes(), read_meta(f), "onnx") for f in files]
    fp16 = read_meta(files[1])
    plan = TritonModel(default_name(fp16, engine=True), b"a plan Triton never reads", fp16, "plan")
    cpu = [m for m in cpu if not (root / m.name).exists()]
    write_repository(root, [*cpu, plan], max_batch=16)
    for folder in [p for p in root.iterdir() if (p / "1").is_dir() and not p.name.endswith(IMAGE_SUFFIX)]:
        _python_twin(folder, folder.name + TWIN)
    _python_twin(root / "efficientnet_lite0_fp32", "invalid" + TWIN, dims="dims: [ -7 ]")
    control = root / "broken_config"
    (control / "1").mkdir(parents=True)
    (control / "1" / "model.onnx").write_bytes(files[0].read_bytes())
    (control / "config.pbtxt").write_text('name: "broken_config"\nplatform: "onnxruntime_onnx"\ninput [ { nme: "x" } ]\n')
    return root


@pytest.fixture(scope="module")
def triton(repository, tmp_path_factory):
    """tritonserver on the repository (HTTP only), once for the module; returns its URL and the model index."""
    folder = tmp_path_factory.mktemp("tritonserver")
    port = _free_port()
    env = {**os.environ, "PATH": f"{PYTHON.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = (folder / "tritonserver.log").open("w")
    proc = subprocess.Popen([str(BINARY), "--model-repository", str(repository), "--http-port", str(port),
                             "--allow-grpc=false", "--allow-metrics=false", "--exit-on-error=false",
                             "--strict-readiness=false", "--backend-directory", str(_python_backend(folder / "backends"))],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        index: list = []
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.skip(f"tritonserver cannot run here (exit {proc.returncode}): "
                            + (folder / "tritonserver.log").read_text()[-500:])
            try:
                if _get(url + "/v2/health/live")[0] == 200:
                    index = _get(url + "/v2/repository/index", b"{}")[1]
                    # A model whose config does not parse is listed without a state.
                    if index and all(m.get("state", "UNAVAILABLE") in ("READY", "UNAVAILABLE") for m in index):
                        break
            except OSError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail("tritonserver did not finish loading the repository: "
                        + (folder / "tritonserver.log").read_text()[-2000:])
        yield url, {m["name"]: m for m in index}, folder / "tritonserver.log"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_every_config_parses_and_only_the_backend_library_is_missing(triton, repository):
    _, index, log = triton
    graphs = sorted(p.name for p in repository.iterdir() if (p / "1" / "model.onnx").exists() and p.name != "broken_config")
    assert graphs == ["efficientnet_lite0_fp16", "efficientnet_lite0_fp32", "efficientnet_lite0_int8",
                      "efficientnet_lite0_int8-trt"]
    for name in graphs:
        assert index[name]["state"] == "UNAVAILABLE"
        assert MISSING.format("onnxruntime") in index[name]["reason"], (name, index[name])
    plan = index["efficientnet_lite0_fp16-engine"]
    assert plan["state"] == "UNAVAILABLE" and MISSING.format("tensorrt") in plan["reason"], plan
    # The control: a config Triton cannot parse is listed without a state, and the log says why.
    assert "state" not in index["broken_config"]
    assert 'no field named "nme"' in log.read_text()


def test_every_config_passes_tritons_validation_on_the_python_backend(triton):
    _, index, _ = triton
    twins = sorted(name for name in index if name.endswith(TWIN) and not name.startswith("invalid"))
    assert sorted(t[: -len(TWIN)] for t in twins) == ["efficientnet_lite0_fp16", "efficientnet_lite0_fp16-engine",
                                                      "efficientnet_lite0_fp32", "efficientnet_lite0_int8",
                                                      "efficientnet_lite0_int8-trt"]
    for name in twins:
        assert index[name]["state"] == "READY", (name, index[name])
    invalid = index["invalid" + TWIN]
    assert invalid["state"] == "UNAVAILABLE" and "dimension must be integer >= 1" in invalid["reason"], invalid


def test_image_models_load_in_the_python_backend(triton):
    _, index, log = triton
    images = sorted(name for name in index if name.endswith(IMAGE_SUFFIX))
    assert images == ["efficientnet_lite0_fp16_image", "efficientnet_lite0_fp32_image", "efficientnet_lite0_int8-trt_image",
                      "efficientnet_lite0_int8_image"]
    for name in images:
        assert index[name]["state"] == "READY", (index[name], log.read_text()[-3000:])


def test_triton_and_serve_show_the_same_model_metadata(triton, repository):
    from tledge_runtime import Classifier
    from tledge_runtime.serve.config import ServeConfig
    from tledge_runtime.serve.server import Server

    url, _, _ = triton
    for name in ("efficientnet_lite0_fp32_image", "efficientnet_lite0_int8_image"):
        status, theirs = _get(f"{url}/v2/models/{name}")
        assert status == 200
        graph = repository / name[: -len(IMAGE_SUFFIX)] / "1" / "model.onnx"
        with Classifier(graph, device="cpu") as clf, Server(clf, ServeConfig(port=0)) as srv:
            ours = _get(f"{srv.url}/v2/models/{name}")[1]
        assert ours == theirs


def _stub_numpy_major() -> int:
    out = subprocess.run([str(PYTHON), "-c", "import numpy; print(numpy.__version__)"], capture_output=True, text=True,
                         check=False)
    return int(out.stdout.split(".")[0]) if out.returncode == 0 else 0


def test_triton_answers_encoded_images_through_tritonclient(triton, repository, exported):
    if _stub_numpy_major() >= 2:
        pytest.skip("Triton 2.51's Python backend stub (nvidia-pytriton 0.7.0) is built against numpy 1 and misreads "
                    "numpy 2 arrays (every element becomes the first byte); set TLEDGE_TRITON_PYTHON to a Python with "
                    "numpy<2, Pillow, onnxruntime and tledge-runtime to run this")
    import io

    import tritonclient.http as th
    from PIL import Image

    from tledge_runtime import Classifier

    url, _, _ = triton
    rng = np.random.default_rng(3)
    encoded = []
    for colour in ((220, 30, 40), (30, 200, 50), (40, 50, 210)):
        pixels = np.clip(np.asarray(colour) + rng.integers(-30, 31, (48, 40, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG")
        encoded.append([buf.getvalue()])
    client = th.InferenceServerClient(url.split("//")[1])
    try:
        inp = th.InferInput("image", [3, 1], "BYTES")
        inp.set_data_from_numpy(np.array(encoded, dtype=np.object_))
        name = "efficientnet_lite0_int8_image"
        result = client.infer(name, [inp], outputs=[th.InferRequestedOutput("label"),
                                                    th.InferRequestedOutput("probabilities")])
        with Classifier(repository / "efficientnet_lite0_int8" / "1" / "model.onnx", device="cpu") as clf:
            expected = np.stack([clf.scores(e[0]) for e in encoded])
            labels = [clf.labels[i].encode() for i in expected.argmax(axis=1)]
        assert result.as_numpy("label").reshape(-1).tolist() == labels
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
        junk = th.InferInput("image", [1, 1], "BYTES")
        junk.set_data_from_numpy(np.array([[b"junk"]], dtype=np.object_))
        with pytest.raises(Exception, match="image 0: not an image"):
            client.infer(name, [junk])
    finally:
        client.close()
