"""Load test of tledge-runtime: many threads on one Classifier, then the HTTP server under concurrent clients.

    python benchmarks/runtime_load.py [--model model.onnx] [--threads 8] [--per-thread 1000] [--http-seconds 10]

Part 1: ``--threads`` threads share one Classifier and make ``--per-thread`` predictions
each on camera-sized JPEG bytes and RGB/BGR arrays, with bad inputs mixed in (2%):
every good answer must equal the serial one, every bad input must raise ImageError,
anything else is an error. RSS is sampled before, halfway and after, to show memory
is stable.

Part 2: the HTTP server on loopback, ``--clients`` clients for ``--http-seconds`` seconds,
one request in five bad (junk bytes, empty body, oversized body, wrong method, wrong
path). Reports requests/s, latency percentiles, the answers by status, client-side
errors, and whether the server is still healthy at the end.

Without ``--model`` a small convolutional classifier (224x224, 3 classes, made here
with onnx.helper) stands in, so the numbers show the runtime's own cost: decoding,
preprocessing, threading and HTTP.
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from tledge_runtime import Classifier
from tledge_runtime.errors import ImageError
from tledge_runtime.serve import PredictionServer, ServeConfig

COLOURS = {"red": (220, 30, 40), "green": (30, 200, 50), "blue": (40, 50, 210)}


# --------------------------------------------------------------------------- inputs and the stand-in model


def stand_in_model(path: Path, size: int = 224) -> Path:
    """Conv(3->16, 7x7, /2) -> ReLU -> Conv(16->32, 3x3, /2) -> ReLU -> GAP -> Gemm, with tledge metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from tledge_runtime.meta import ONNX_KEY, ModelMeta, Preprocess, Provenance

    rng = np.random.default_rng(0)
    w1 = np.zeros((16, 3, 7, 7), np.float32)
    for o in range(16):
        w1[o, o % 3] = 1.0 / 49  # channel-averaging filters: the class stays readable from the colour
    w1 += rng.normal(0, 0.002, w1.shape).astype(np.float32)
    w2 = np.zeros((32, 16, 3, 3), np.float32)
    for o in range(32):
        w2[o, o % 16] = 1.0 / 9
    head = np.zeros((32, 3), np.float32)
    for i in range(32):
        head[i, (i % 16) % 3] = 1.0
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(head, "head"), numpy_helper.from_array(np.zeros(3, np.float32), "bias")]
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], strides=[2, 2], pads=[3, 3, 3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "head", "bias"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "stand-in",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = ModelMeta(labels=tuple(COLOURS), preprocess=Preprocess(height=size, width=size, crop_ratio=0.875),
                     provenance=Provenance(architecture="load-test-stand-in", opset=17))
    model.metadata_props.append(onnx.StringStringEntryProto(key=ONNX_KEY, value=meta.to_json()))
    onnx.save(model, str(path))
    return path


def camera_frames(n: int, size: tuple[int, int] = (640, 480)) -> list[np.ndarray]:
    """RGB frames dominated by one colour each, with noise (VGA, like a small camera)."""
    rng = np.random.default_rng(1)
    names = list(COLOURS)
    frames = []
    for i in range(n):
        base = np.asarray(COLOURS[names[i % 3]], np.int16)
        frames.append(np.clip(base + rng.integers(-40, 41, (size[1], size[0], 3)), 0, 255).astype(np.uint8))
    return frames


def jpeg(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


BAD_INPUTS = [b"not an image", b"", np.zeros((3, 64, 64), np.uint8), np.zeros((64, 64, 3), np.float32),
              b"\xff\xd8\xff\xe0" + b"\x00" * 64]


# --------------------------------------------------------------------------- machine and memory


def rss_mib() -> float:
    """Resident set size of this process now, MiB (Linux /proc; peak RSS elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import onnxruntime

    return (f"{cpu}, {usable} usable cores ({os.cpu_count()} logical), {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# --------------------------------------------------------------------------- part 1: threads


def thread_load(clf: Classifier, threads: int, per_thread: int) -> None:
    frames = camera_frames(12)
    inputs = []  # (source, channel_order); expected answers are computed serially below
    for f in frames:
        inputs += [(jpeg(f), "rgb"), (f, "rgb"), (np.ascontiguousarray(f[:, :, ::-1]), "bgr")]
    expected = [clf.predict(src, channel_order=order) for src, order in inputs]
    counts = Counter()
    errors: list[str] = []
    lock = threading.Lock()
    rss = {"before": rss_mib()}
    halfway = threading.Barrier(threads, action=lambda: rss.__setitem__("halfway", rss_mib()))

    def worker(t: int) -> None:
        local = Counter()
        for i in range(per_thread):
            if i == per_thread // 2:
                halfway.wait()
            if i % 50 == 49:  # 2% bad inputs
                try:
                    clf.predict(BAD_INPUTS[(t + i) % len(BAD_INPUTS)])
                    with lock:
                        errors.append(f"thread {t}: bad input {i} was accepted")
                except ImageError:
                    local["bad input -> ImageError"] += 1
                except Exception as e:  # noqa: BLE001 - counted as an error
                    with lock:
                        errors.append(f"thread {t}: {type(e).__name__}: {e}")
                continue
            j = (t * 13 + i) % len(inputs)
            try:
                got = clf.predict(inputs[j][0], channel_order=inputs[j][1])
                if got != expected[j]:
                    with lock:
                        errors.append(f"thread {t} item {i}: {got} != {expected[j]}")
                local["good prediction"] += 1
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(f"thread {t}: {type(e).__name__}: {e}")
        with lock:
            counts.update(local)

    start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    elapsed = time.perf_counter() - start
    rss["after"] = rss_mib()
    total = threads * per_thread
    print(f"\n## Part 1: {threads} threads x {per_thread} predictions on one Classifier ({clf.backend_name})")
    print("inputs: 640x480 JPEG bytes, RGB arrays, BGR arrays; 2% bad inputs mixed in")
    print(f"calls: {total} in {elapsed:.2f} s = {total / elapsed:.0f} predictions/s")
    for key, value in sorted(counts.items()):
        print(f"  {key}: {value}")
    print(f"errors: {len(errors)}" + "".join(f"\n  {e}" for e in errors[:10]))
    half = rss.get("halfway", rss["after"])
    print(f"RSS MiB: before {rss['before']:.1f}, halfway {half:.1f}, after {rss['after']:.1f} "
          f"(growth in the second half: {rss['after'] - half:+.1f})")


# --------------------------------------------------------------------------- part 2: HTTP


def http_load(clf: Classifier, clients: int, seconds: float, max_bytes: int) -> None:
    server = PredictionServer(clf, ServeConfig(port=0, max_bytes=max_bytes, max_queue=64, timeout_s=10.0))
    runner = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    runner.start()
    host, port = server.server_address[:2]
    frames = camera_frames(9)
    good = [(jpeg(f), ["red", "green", "blue"][i % 3]) for i, f in enumerate(frames)]
    bad = [("POST", "/predict", b"junk bytes", 400), ("POST", "/predict", b"", 400),
           ("POST", "/predict", b"\x00" * (max_bytes + 1), 413), ("GET", "/predict", None, 405),
           ("POST", "/nowhere", b"x", 404)]
    statuses, unexpected, conn_errors = Counter(), [], Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    rss_before = rss_mib()

    def client(c: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            i += 1
            if i % 5 == 0:
                method, path, body, want = bad[(c + i) % len(bad)]
                label = None
            else:
                (body, label), method, path, want = good[(c + i) % len(good)], "POST", "/predict", 200
            t0 = time.perf_counter()
            conn = http.client.HTTPConnection(host, port, timeout=30)
            try:
                conn.request(method, path, body=body)
                resp = conn.getresponse()
                data = resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException) as e:
                with lock:
                    conn_errors[type(e).__name__] += 1
                continue
            finally:
                conn.close()
            took = (time.perf_counter() - t0) * 1000.0
            with lock:
                statuses[status] += 1
                if status == 200 and label is not None:
                    latencies.append(took)
                    if b'"label": "%s"' % label.encode() not in data:
                        unexpected.append(f"wrong label for {label}: {data[:80]!r}")
                elif status != want and status != 503:
                    unexpected.append(f"{method} {path}: {status}, expected {want}")

    start = time.perf_counter()
    pool = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for th in pool:
        th.start()
    samples = []  # RSS at each third of the run: growth that continues would show here
    for k in (1, 2):
        time.sleep(max(0.0, start + seconds * k / 3 - time.perf_counter()))
        samples.append(rss_mib())
    for th in pool:
        th.join()
    elapsed = time.perf_counter() - start
    samples.append(rss_mib())
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/health")
    health = conn.getresponse().status
    conn.close()
    server.shutdown()
    runner.join()
    server.close()
    total = sum(statuses.values())
    print(f"\n## Part 2: HTTP server on loopback, {clients} concurrent clients for {seconds:.0f} s, 1 request in 5 bad")
    print(f"requests answered: {total} in {elapsed:.2f} s = {total / elapsed:.0f} requests/s")
    print("answers by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
    print(f"good requests: p50 {pct(latencies, 50):.1f} ms, p99 {pct(latencies, 99):.1f} ms (client-side, per request)")
    print(f"unexpected answers: {len(unexpected)}" + "".join(f"\n  {u}" for u in unexpected[:10]))
    print(f"connection errors: {sum(conn_errors.values())}" + (f" {dict(conn_errors)}" if conn_errors else ""))
    print(f"server healthy afterwards: {health == 200} (GET /health -> {health})")
    print(f"RSS MiB: before {rss_before:.1f}, at 1/3 {samples[0]:.1f}, at 2/3 {samples[1]:.1f}, end {samples[2]:.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a tledge .onnx model (default: a small stand-in made here)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--per-thread", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--http-seconds", type=float, default=10.0)
    parser.add_argument("--ort-threads", type=int, default=None, help="intra-op threads per inference")
    args = parser.parse_args()
    print("# tledge-runtime load test")
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or stand_in_model(Path(tmp) / "stand_in.onnx")
        print(f"model: {model.name}" + (" (stand-in: 2 convolutions, 224x224, 3 classes)" if not args.model else ""))
        with Classifier(model, threads=args.ort_threads) as clf:
            thread_load(clf, args.threads, args.per_thread)
            http_load(clf, args.clients, args.http_seconds, max_bytes=1 << 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
