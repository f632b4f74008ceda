"""Load test of tledge-runtime: many threads on one Classifier, then the HTTP server against the old one.

    python benchmarks/runtime_load.py [--model model.onnx] [--threads 8] [--per-thread 1000] [--http-seconds 10]

Part 1: ``--threads`` threads share one Classifier and make ``--per-thread`` predictions
each on camera-sized JPEG bytes and RGB/BGR arrays, with bad inputs mixed in (2%):
every good answer must equal the serial one, every bad input must raise ImageError,
anything else is an error. RSS is sampled before, halfway and after, to show memory
is stable.

Part 2: ``tledge-runtime serve`` (uvicorn + starlette) beside the server it replaced (the
http.server one of commit a5d733c, loaded from git history into a temporary module), each in
a process of its own, same model, same clients, same run:
  a. keep-alive clients (one connection each, reused while the server allows it) at 8 and 64
     concurrency for ``--http-seconds``: requests/s, p50/p99, answers, connection errors;
  b. 256 clients connecting at once: connection errors;
  c. 64 clients each sending a maximum-size body (a JPEG padded to ``--max-bytes``): answers
     and the server's peak RSS against the stated budget;
  d. 16 slow senders (one body byte a second) while 8 clients are served: their throughput
     and latency, and whether and when the slow senders are cut off;
  e. SIGTERM with slow senders and idle connections open: seconds until the process exits.

Without ``--model`` a small convolutional classifier (224x224, 3 classes, made here
with onnx.helper) stands in, so the numbers show the runtime's own cost: decoding,
preprocessing, threading and HTTP.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import re
import signal
import socket
import subprocess
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

COLOURS = {"red": (220, 30, 40), "green": (30, 200, 50), "blue": (40, 50, 210)}


# --------------------------------------------------------------------------- inputs and the stand-in model


def stand_in_model(path: Path, size: int = 224) -> Path:
    """Conv(3->16, 7x7, /2) -> ReLU -> Conv(16->32, 3x3, /2) -> ReLU -> GAP -> Gemm, with tledge metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tledge_runtime.model.meta import ONNX_KEY, ModelMeta, Preprocess, Provenance

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


def run_threads(target, n: int) -> float:
    """Run ``target(i)`` for i in 0..n-1 on n threads at once; the wall time until the last one ends."""
    start = time.perf_counter()
    pool = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return time.perf_counter() - start


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

    elapsed = run_threads(worker, threads)
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


# --------------------------------------------------------------------------- part 2: HTTP, new server and old

OLD_COMMIT = "a5d733c"  # the last commit with the http.server implementation
ROOT = Path(__file__).resolve().parents[1]
RSS_BUDGET_MIB = 400  # DESIGN.md: the runtime process stays under 400 MB under hostile load
OLD_RUNNER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("tledge_runtime.serve_old", sys.argv[1])
old = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = old
spec.loader.exec_module(old)
from tledge_runtime import Classifier
clf = Classifier(sys.argv[2])
ready = lambda server: print("listening on " + server.url, file=sys.stderr, flush=True)
old.serve(clf, old.ServeConfig(port=0, max_bytes=int(sys.argv[3]), max_queue=64), on_ready=ready)
"""


class Connection(http.client.HTTPConnection):
    """http.client with TCP_NODELAY, as curl, urllib3 and tritonclient set it: a keep-alive client that writes
    headers and body apart with Nagle on waits for the server's delayed ACK, 40 ms a request."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ServerProcess:
    """A server in a process of its own (its GIL and memory apart from the clients'), on a free loopback port."""

    def __init__(self, kind: str, cmd: list[str]):
        self.kind = kind
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        lines = []
        while True:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"{kind} server did not start:\n" + "".join(lines))
            lines.append(line)
            if m := re.search(r"on http://([\d.]+):(\d+)", line):
                self.host, self.port = m.group(1), int(m.group(2))
                break
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()  # keep the pipe drained

    def status_kib(self, key: str) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
        return float("nan")

    def cpu_s(self) -> float:
        """CPU time the server process has used (user + system), seconds: its cost, whatever else runs."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mib(self) -> float:
        return self.status_kib("VmHWM") / 1024.0

    def stop(self, sig: int = signal.SIGTERM, wait_s: float = 30.0) -> float | None:
        """Seconds from the signal to the exit, or None when it had to be killed after ``wait_s``."""
        start = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=wait_s)
            return time.monotonic() - start
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


def old_server_source(folder: Path) -> Path | None:
    try:
        text = subprocess.run(["git", "show", f"{OLD_COMMIT}:runtime/tledge_runtime/serve/server.py"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"(the old server is not available from git: {e}; its columns stay empty)")
        return None
    path = folder / "serve_old.py"
    path.write_text(text)
    return path


def start(kind: str, model: Path, old_source: Path | None, max_bytes: int, *, timeout_s: float = 30.0,
          grace_s: float = 10.0) -> ServerProcess | None:
    if kind == "old":
        if old_source is None:
            return None
        return ServerProcess("old", [sys.executable, "-c", OLD_RUNNER, str(old_source), str(model), str(max_bytes)])
    return ServerProcess("new", [sys.executable, "-m", "tledge_runtime.cli", "serve", str(model), "--port", "0",
                                 "--max-bytes", str(max_bytes), "--timeout", str(timeout_s), "--grace", str(grace_s)])


def keepalive_load(server: ServerProcess, clients: int, seconds: float, good: list[tuple[bytes, str]]) -> dict:
    """Each client keeps one connection and reuses it (http.client reconnects when a server closes it)."""
    statuses, errors = Counter(), Counter()
    latencies: list[float] = []
    wrong: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(c: int) -> None:
        conn = Connection(server.host, server.port, timeout=30)
        i = c
        while time.monotonic() < deadline:
            body, label = good[i % len(good)]
            i += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/predict", body=body)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as e:
                with lock:
                    errors[type(e).__name__] += 1
                conn.close()
                conn = Connection(server.host, server.port, timeout=30)
                continue
            took = (time.perf_counter() - t0) * 1000.0
            with lock:
                statuses[resp.status] += 1
                if resp.status == 200:
                    latencies.append(took)
                    if json.loads(data)["label"] != label:
                        wrong.append(f"{label}: {data[:80]!r}")
        conn.close()

    cpu_before = server.cpu_s()
    elapsed = run_threads(client, clients)
    cpu_ms = (server.cpu_s() - cpu_before) * 1000.0 / max(1, sum(statuses.values()))
    return {"ok_rps": statuses[200] / elapsed, "p50": pct(latencies, 50), "p99": pct(latencies, 99), "cpu_ms": cpu_ms,
            "statuses": dict(sorted(statuses.items())), "errors": sum(errors.values()), "error_kinds": dict(errors),
            "wrong": len(wrong)}


def burst(server: ServerProcess, clients: int) -> dict:
    """``clients`` connections opened at the same moment, one GET /health each."""
    barrier = threading.Barrier(clients)
    ok, errors = Counter(), Counter()
    lock = threading.Lock()

    def client() -> None:
        barrier.wait()
        try:
            with socket.create_connection((server.host, server.port), timeout=30) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                reply = b"".join(iter(lambda: s.recv(65536), b""))
            with lock:
                ok[reply.split(b" ", 2)[1].decode() if reply else "empty"] += 1
        except OSError as e:
            with lock:
                errors[type(e).__name__] += 1

    run_threads(lambda _: client(), clients)
    return {"answers": dict(ok), "errors": sum(errors.values()), "error_kinds": dict(errors)}


def big_bodies(server: ServerProcess, clients: int, body: bytes, rounds: int = 2, patience_s: float = 60.0) -> dict:
    """``clients`` clients at once, each getting ``rounds`` maximum-size bodies answered; the server's peak RSS.

    Clients behave as well-made ones do: a 503 is retried after its Retry-After, a refused or reset
    connection after a second, each body for at most ``patience_s``.
    """
    statuses, errors = Counter(), Counter()
    served = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client() -> None:
        barrier.wait()
        for _ in range(rounds):
            give_up = time.monotonic() + patience_s
            while time.monotonic() < give_up:
                conn = Connection(server.host, server.port, timeout=60)
                wait = 0.0
                try:
                    conn.request("POST", "/predict", body=body)
                    resp = conn.getresponse()
                    resp.read()
                    with lock:
                        statuses[resp.status] += 1
                    if resp.status != 503:
                        with lock:
                            served[resp.status] += 1
                        break
                    wait = float(resp.getheader("Retry-After") or 1)
                except (OSError, http.client.HTTPException) as e:
                    with lock:
                        errors[type(e).__name__] += 1
                    wait = 1.0
                finally:
                    conn.close()
                time.sleep(wait)

    before = server.peak_rss_mib()
    seconds = run_threads(lambda _: client(), clients)
    return {"served": dict(sorted(served.items())), "statuses": dict(sorted(statuses.items())),
            "errors": sum(errors.values()), "rss_before": before, "peak_rss": server.peak_rss_mib(),
            "seconds": seconds}


class SlowSenders:
    """Clients that announce a body and send one byte of it a second, until the server cuts them off."""

    def __init__(self, server: ServerProcess, count: int, declared: int = 100_000, interval_s: float = 1.0):
        self.cut_after: list[float] = []
        self.replies: Counter = Counter()
        self._stop = threading.Event()
        self._sockets = []
        self._threads = [threading.Thread(target=self._run, args=(server, declared, interval_s), daemon=True)
                         for _ in range(count)]
        for th in self._threads:
            th.start()

    def _run(self, server: ServerProcess, declared: int, interval_s: float) -> None:
        start_t = time.monotonic()
        try:
            s = socket.create_connection((server.host, server.port), timeout=interval_s)
        except OSError:
            self.replies["could not connect"] += 1
            return
        self._sockets.append(s)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % declared)
        while not self._stop.is_set():
            try:
                s.sendall(b"x")
                reply = s.recv(65536)  # a timeout here means the server is still waiting for us
                self.replies[reply.split(b" ", 2)[1].decode() if reply else "closed"] += 1
                self.cut_after.append(time.monotonic() - start_t)
                return
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():  # closed by us at the end of the run: the server never cut it off
                    break
                self.replies["reset"] += 1
                self.cut_after.append(time.monotonic() - start_t)
                return
        self.replies["still connected at the end"] += 1

    def close(self) -> None:
        self._stop.set()
        for s in self._sockets:
            s.close()
        for th in self._threads:
            th.join(5)


def sigterm_with_slow_clients(server: ServerProcess, slow: int, idle: int) -> float | None:
    senders = SlowSenders(server, slow)
    idle_socks = [socket.create_connection((server.host, server.port), timeout=5) for _ in range(idle)]
    time.sleep(1.0)  # the slow requests are admitted and waiting for their bodies
    took = server.stop(signal.SIGTERM, wait_s=30.0)
    senders.close()
    for s in idle_socks:
        s.close()
    return took


def http_comparison(model: Path, seconds: float, max_bytes: int) -> None:
    frames = camera_frames(9)
    good = [(jpeg(f), ["red", "green", "blue"][i % 3]) for i, f in enumerate(frames)]
    big = good[0][0] + b"\0" * (max_bytes - len(good[0][0]))  # a real JPEG padded to the limit: Pillow stops at EOI
    with tempfile.TemporaryDirectory() as tmp:
        old_source = old_server_source(Path(tmp))
        kinds = ["new", "old"]
        print(f"\n## Part 2: HTTP, tledge-runtime serve (uvicorn + starlette, this tree) vs the old http.server "
              f"server ({OLD_COMMIT}), each in its own process, same run")
        print(f"requests: POST /predict with 640x480 JPEG bytes; --max-bytes {max_bytes}")

        print(f"\n### a. keep-alive clients, {seconds:.0f} s each, twice in alternating order (the machine is shared)")
        print("server CPU ms/request: the server process's CPU time over the requests it answered (decode, "
              "model, HTTP), a cost that does not depend on what else the machine runs")
        print("| server | clients | run | requests/s (200) | p50 ms | p99 ms | server CPU ms/request | answers | "
              "connection errors | wrong labels |")
        print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
        for clients in (8, 64):
            for run, order in enumerate((kinds, kinds[::-1]), 1):
                for kind in order:
                    server = start(kind, model, old_source, max_bytes)
                    if server is None:
                        continue
                    r = keepalive_load(server, clients, seconds, good)
                    server.stop(signal.SIGKILL)
                    print(f"| {kind} | {clients} | {run} | {r['ok_rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | "
                          f"{r['cpu_ms']:.1f} | {r['statuses']} | {r['errors']}{' ' + str(r['error_kinds']) if r['errors'] else ''} | "
                          f"{r['wrong']} |")

        print("\n### b. 256 clients connecting at once (GET /health)")
        print("| server | answers | connection errors |")
        print("|---|---|---:|")
        for kind in kinds:
            server = start(kind, model, old_source, max_bytes)
            if server is None:
                continue
            r = burst(server, 256)
            server.stop(signal.SIGKILL)
            print(f"| {kind} | {r['answers']} | {r['errors']}{' ' + str(r['error_kinds']) if r['errors'] else ''} |")

        print(f"\n### c. 64 clients x 2 bodies of {max_bytes / 2**20:.0f} MiB each, retrying 503s (Retry-After) and "
              f"connection errors (budget: peak RSS under {RSS_BUDGET_MIB} MiB)")
        print("| server | bodies answered | all answers | connection errors (retried) | took s | RSS before MiB | "
              "peak RSS MiB | within budget |")
        print("|---|---|---|---:|---:|---:|---:|---|")
        for kind in kinds:
            server = start(kind, model, old_source, max_bytes)
            if server is None:
                continue
            r = big_bodies(server, 64, big)
            server.stop(signal.SIGKILL)
            print(f"| {kind} | {r['served']} | {r['statuses']} | {r['errors']} | {r['seconds']:.1f} | "
                  f"{r['rss_before']:.0f} | {r['peak_rss']:.0f} | {'yes' if r['peak_rss'] < RSS_BUDGET_MIB else 'NO'} |")

        print(f"\n### d. 16 slow senders (1 body byte/s) while 8 keep-alive clients are served for {seconds:.0f} s "
              "(new: --timeout 5)")
        print("| server | requests/s (200) | p50 ms | p99 ms | connection errors | slow senders cut off | "
              "cut off after s (median) | their answers |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for kind in kinds:
            server = start(kind, model, old_source, max_bytes, timeout_s=5.0)
            if server is None:
                continue
            senders = SlowSenders(server, 16)
            r = keepalive_load(server, 8, seconds, good)
            senders.close()
            cut = list(senders.cut_after)
            server.stop(signal.SIGKILL)
            median = f"{float(np.median(cut)):.1f}" if cut else "-"
            print(f"| {kind} | {r['ok_rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['errors']} | {len(cut)}/16 | "
                  f"{median} | {dict(senders.replies)} |")

        print("\n### e. SIGTERM with 16 slow senders and 16 idle connections open (new: --grace 3)")
        print("| server | exited after s |")
        print("|---|---:|")
        for kind in kinds:
            server = start(kind, model, old_source, max_bytes, grace_s=3.0)
            if server is None:
                continue
            took = sigterm_with_slow_clients(server, 16, 16)
            print(f"| {kind} | {f'{took:.1f}' if took is not None else 'did not exit in 30 s (killed)'} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a tledge .onnx model (default: a small stand-in made here)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--per-thread", type=int, default=1000)
    parser.add_argument("--http-seconds", type=float, default=10.0)
    parser.add_argument("--max-bytes", type=int, default=10 << 20, help="the servers' body limit (default: 10 MiB)")
    parser.add_argument("--ort-threads", type=int, default=None, help="intra-op threads per inference (part 1)")
    parser.add_argument("--skip-threads", action="store_true", help="run part 2 only")
    args = parser.parse_args()
    print("# tledge-runtime load test")
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or stand_in_model(Path(tmp) / "stand_in.onnx")
        print(f"model: {model.name}" + (" (stand-in: 2 convolutions, 224x224, 3 classes)" if not args.model else ""))
        if not args.skip_threads:
            with Classifier(model, threads=args.ort_threads) as clf:
                thread_load(clf, args.threads, args.per_thread)
        http_comparison(model, args.http_seconds, args.max_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
