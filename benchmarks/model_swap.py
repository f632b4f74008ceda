"""Model updates under load: ``tledge-runtime serve --model-dir`` while signed versions arrive (issue 21).

One run on loopback, side by side in time:

1. a model of the demo's size and kind: EfficientNet-Lite0 at 224 px (ImageNet weights from the
   efficientnet-lite0 package, a short frozen-backbone fine-tune on generated colour images), exported to
   fp32 ONNX by ``tledge export`` (about 13 MB, with its reference set);
2. version 1, signed with a fresh P-256 key, serves (``--trusted-key``, ``--poll 0.25``, ``--settle 0.5``);
3. 32 clients POST JPEGs to ``/predict`` at full rate (each sends its next request when answered) for the
   whole run: a steady phase first, then 26 versions arrive, renamed into place one every few seconds:
   20 valid ones (each adds its own offset to the head's bias and carries its own reference logits, so
   the scores say which version computed them), and interleaved: two tampered after signing (a flipped
   byte, a truncated file), one signed by another key, one signed but failing its reference check (a
   weight scaled after the logits were recorded), one older than the version serving, one unsigned, and
   one of the valid ones copied in place in chunks (half-copied for 2 s);
4. reported: failed requests, answers whose scores do not match the version they name (softmax of the
   base logits plus that version's bias offset), p50/p99 inside swap windows (2 s from each arrival)
   against the steady phase, each bad version's state in the repository index and the refusal counters
   of /metrics, the server's RSS after the first and after the 20th swap, signature verification time
   (in the server, and standalone beside model_signing's own verifier) and swap time (arrival -> first
   answer naming the version), with the steps the server logged.

    python benchmarks/model_swap.py [--clients 32] [--work DIR]     # ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "runtime"))

NAME = "efficientnet_lite0_fp32"
BIAS_STEP = 0.05  # logit offset per version on class 0: every version answers differently


# ----------------------------------------------------------------------------- the model and its versions


def export_demo_model(work: Path) -> Path:
    from tests.datasets import make_dataset
    from tledge.exporting import export_checkpoint
    from tledge.train.finetune import FinetuneConfig, finetune
    from tledge_export import ExportConfig

    data = make_dataset(work / "data", per_class=12)
    run = finetune(FinetuneConfig(data=str(data), out=str(work / "run"), arch="efficientnet_lite0", img_size=224,
                                  epochs=1, freeze_epochs=1, batch_size=16, workers=2, seed=0))
    export_checkpoint(run.best, ExportConfig(out=str(work / "export")), workers=2)
    return work / "export" / "model.onnx"


def versioned(base, offset: float, *, scale_after: float = 1.0):
    """``base`` (an ONNX proto) with ``offset`` added to class 0's bias and reference logits of its own."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from tledge_export.artifact import embed_meta, read_meta
    from tledge_runtime.check.trace import trace

    model = onnx.ModelProto()
    model.CopyFrom(base)
    gemm = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    inits = {i.name: i for i in model.graph.initializer}
    bias = numpy_helper.to_array(inits[gemm.input[2]]).copy()
    bias[0] += offset
    inits[gemm.input[2]].CopyFrom(numpy_helper.from_array(bias, gemm.input[2]))
    meta = read_meta(model)
    refs = meta.reference_set
    x = np.concatenate([trace(item, meta.preprocess).tensor for item in refs.items])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {meta.input.name: x})[0]
    items = tuple(type(item)(tuple(map(float, row)), item.fingerprint, item.image, item.seed, item.label)
                  for item, row in zip(refs.items, logits))
    if scale_after != 1.0:  # numerics that no longer match the reference the version carries
        w = next(i for i in model.graph.initializer if i.name == gemm.input[1])
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * scale_after, w.name))
    return embed_meta(model, meta.with_(reference_set=type(refs)(items, refs.tolerance)))


@dataclass
class Arrival:
    number: int  # the version folder's name
    kind: str  # valid | tampered | truncated | other-key | check-fails | older | unsigned | half-copied
    offset: float = 0.0
    at: float = 0.0  # when it was complete in place (monotonic)
    first_answer: float | None = None


def plan(n_valid: int) -> list[Arrival]:
    """20 valid versions with the bad ones interleaved; numbers rise by 10 so an older one fits below."""
    bad = {2: "tampered", 5: "other-key", 8: "check-fails", 11: "older", 14: "truncated", 17: "unsigned"}
    arrivals, number, valid = [], 10, 1
    for i in range(1, n_valid + len(bad) + 1):
        number += 10
        kind = bad.get(i, "half-copied" if i == 9 else "valid")
        if kind == "older":
            arrivals.append(Arrival(number - 25, kind, 0.0))  # below the version serving, never used before
            continue
        if kind in ("valid", "half-copied"):
            valid += 1
        arrivals.append(Arrival(number, kind, BIAS_STEP * valid if kind in ("valid", "half-copied") else 0.3))
    return arrivals


def publish(root: Path, base, a: Arrival, keys: dict) -> None:
    """Write version ``a`` into ``root/NAME/<number>/`` the way an update agent would."""
    import onnx

    from tledge_export.signing import sign_folder

    staging = root / NAME / f".staging-{a.number}"
    staging.mkdir(parents=True)
    onnx.save(versioned(base, a.offset, scale_after=1.5 if a.kind == "check-fails" else 1.0), str(staging / "model.onnx"))
    if a.kind != "unsigned":
        sign_folder(staging, keys["other" if a.kind == "other-key" else "fleet"][0])
    model = staging / "model.onnx"
    if a.kind == "tampered":
        with open(model, "r+b") as f:
            f.seek(model.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x40]))
    elif a.kind == "truncated":
        os.truncate(model, model.stat().st_size - 4096)
    final = root / NAME / str(a.number)
    if a.kind != "half-copied":
        os.rename(staging, final)
        a.at = time.monotonic()
        return
    final.mkdir()  # copied in place, file by file, in chunks: half-copied for ~2 s, never still for --settle
    shutil.copy(staging / "model.sig", final / "model.sig")
    data = model.read_bytes()
    with open(final / "model.onnx", "wb") as f:
        for i in range(10):
            f.write(data[i * len(data) // 10:(i + 1) * len(data) // 10])
            f.flush()
            time.sleep(0.2)
    shutil.rmtree(staging)
    a.at = time.monotonic()


# ----------------------------------------------------------------------------- load


@dataclass
class Load:
    port: int
    bodies: list[bytes]
    expected: list[np.ndarray]  # base logits per body
    stop: threading.Event = field(default_factory=threading.Event)
    samples: list[tuple[float, float, int]] = field(default_factory=list)  # (start, seconds, version)
    failed: list[str] = field(default_factory=list)
    mismatched: list[tuple[int, float]] = field(default_factory=list)
    first_seen: dict[int, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, seed: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        i = seed
        while not self.stop.is_set():
            i += 1
            k = i % len(self.bodies)
            t0 = time.monotonic()
            try:
                conn.request("POST", "/predict?topk=2", body=self.bodies[k])
                resp = conn.getresponse()
                raw = resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException) as e:
                self.failed.append(type(e).__name__)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                continue
            dt = time.monotonic() - t0
            if status != 200:
                self.failed.append(f"{status} {raw[:120]!r}")
                continue
            answer = json.loads(raw)
            version = int(answer["model_version"])
            self._judge(k, version, answer)
            with self.lock:
                self.samples.append((t0, dt, version))
                self.first_seen.setdefault(version, time.monotonic())
        conn.close()

    def _judge(self, k: int, version: int, answer: dict) -> None:
        logits = self.expected[k].copy()
        logits[0] += offset_of(version)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        worst = max(abs(t["score"] - p[t["index"]]) for t in answer["topk"])
        if worst > 1e-4:
            self.mismatched.append((version, worst))


OFFSETS: dict[int, float] = {}


def offset_of(version: int) -> float:
    return OFFSETS[version]


# ----------------------------------------------------------------------------- measurement helpers


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000.0 if values else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v2/health/ready")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become ready")


def machine() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    return f"{model}, {os.cpu_count()} cores"


def verification_times(folder: Path, public: Path) -> dict[str, float]:
    """Standalone: tledge's verifier against model_signing's, median of 7, plus each one's import time."""
    from model_signing import verifying

    from tledge_runtime.repository import load_trusted_keys, verify_folder

    keys = load_trusted_keys([public])
    ours, theirs = [], []
    for _ in range(7):
        t = time.perf_counter()
        verify_folder(folder, keys)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        verifying.Config().use_elliptic_key_verifier(public_key=public).verify(folder, folder / "model.sig")
        theirs.append(time.perf_counter() - t)
    imports = {}
    for label, code in (("tledge", "from tledge_runtime.repository import keys, signature; keys._crypto()"),
                        ("model_signing", "import model_signing.verifying")):
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(ROOT / "runtime"), str(ROOT / "export"), str(ROOT)])})
            runs.append(time.perf_counter() - t)
        imports[label] = min(runs)
    return {"tledge_ms": 1000 * statistics.median(ours), "model_signing_ms": 1000 * statistics.median(theirs),
            "tledge_import_s": imports["tledge"], "model_signing_import_s": imports["model_signing"]}


# ----------------------------------------------------------------------------- the run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--valid", type=int, default=20, help="valid versions arriving after version 1")
    ap.add_argument("--steady", type=float, default=10.0, help="seconds of load before the first arrival")
    ap.add_argument("--gap", type=float, default=2.5, help="seconds between arrivals")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="tledge-swap-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}\nwork: {work}")
    results = run(args, work)
    print(json.dumps(results, indent=2))
    (work / "model_swap.json").write_text(json.dumps(results, indent=2))


def run(args: argparse.Namespace, work: Path) -> dict:
    import onnx
    from fleet_testkit import make_key
    from PIL import Image

    from tledge_runtime import Classifier

    base_path = work / "export" / "model.onnx"
    if not base_path.exists():
        t = time.perf_counter()
        export_demo_model(work)
        print(f"demo-size model exported in {time.perf_counter() - t:.0f} s: {base_path.stat().st_size / 1e6:.1f} MB")
    base = onnx.load(str(base_path))
    keys = {"fleet": make_key(work / "keys", "fleet"), "other": make_key(work / "keys", "other")}
    repo = work / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    first = Arrival(10, "valid", BIAS_STEP)
    publish(repo, base, first, keys)
    arrivals = plan(args.valid)
    OFFSETS.update({a.number: a.offset for a in [first, *arrivals] if a.kind in ("valid", "half-copied")})

    rng = np.random.default_rng(0)
    bodies = []
    for i in range(4):
        buf = io.BytesIO()
        pixels = np.clip(rng.normal(128, 60, (300 + 20 * i, 320, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        bodies.append(buf.getvalue())
    with Classifier(base_path, device="cpu") as clf:
        assert clf.meta.output.kind == "logits"  # a bias offset shifts the softmax's input, nothing else
        expected = [np.log(np.clip(clf.scores(b), 1e-300, None)) for b in bodies]  # base log-probabilities

    port = free_port()
    log_path = work / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "runtime"), str(ROOT / "export"), str(ROOT)])}
    cmd = [sys.executable, "-m", "tledge_runtime.cli", "serve", "--model-dir", str(repo), "--trusted-key",
           str(keys["fleet"][1]), "--poll", "0.25", "--settle", "0.5", "--port", str(port), "--max-queue", "128",
           "--device", "cpu"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(port, proc)
        return drive(args, proc, port, repo, base, arrivals, keys, bodies, expected, log_path, first)
    finally:
        proc.terminate()
        proc.wait(30)


def drive(args, proc, port, repo, base, arrivals, keys, bodies, expected, log_path, first) -> dict:
    load = Load(port, bodies, expected)
    threads = [threading.Thread(target=load.client, args=(i,), daemon=True) for i in range(args.clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(args.steady)
    steady_end = time.monotonic()
    rss: dict[str, float] = {}
    swaps = 0
    for a in arrivals:
        publish(repo, base, a, keys)
        if a.kind in ("valid", "half-copied"):
            end = time.monotonic() + 30
            while a.number not in load.first_seen and time.monotonic() < end:
                time.sleep(0.02)
            a.first_answer = load.first_seen.get(a.number)
            swaps += 1
            if swaps == 1:
                time.sleep(1.0)
                rss["after_first_swap"] = rss_mb(proc.pid)
        time.sleep(max(0.0, args.gap - (time.monotonic() - a.at)))
    time.sleep(2.0)
    rss["after_last_swap"] = rss_mb(proc.pid)
    load.stop.set()
    for t in threads:
        t.join(60)
    wall = time.monotonic() - start
    return report(args, load, arrivals, steady_end, rss, wall, port, log_path, first, repo, keys)


def report(args, load, arrivals, steady_end, rss, wall, port, log_path, first, repo, keys) -> dict:
    windows = [(a.at, a.at + 2.0) for a in arrivals]
    steady = [dt for t0, dt, _ in load.samples if t0 < steady_end]
    during = [dt for t0, dt, _ in load.samples if any(lo <= t0 < hi for lo, hi in windows)]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/v2/repository/index")
    index = {int(v["version"]): v for v in json.loads(conn.getresponse().read())}
    conn.request("GET", "/metrics")
    metrics_text = conn.getresponse().read().decode()
    refused = dict(re.findall(r'tledge_versions_refused_total\{reason="(\w+)"\} ([\d.]+)', metrics_text))
    log_text = log_path.read_text()
    steps = {int(v): dict(re.findall(r"(\w+) (\d+) ms", s)) for v, s in
             re.findall(r"version (\d+) serves \(([^)]*)\)", log_text)}
    valid = [a for a in arrivals if a.first_answer is not None]
    swap_s = [a.first_answer - a.at for a in valid]
    verify_ms = [float(s["verify"]) for s in steps.values() if "verify" in s]
    bad = {a.number: {"kind": a.kind, "state": index.get(a.number, {}).get("state"),
                      "reason": index.get(a.number, {}).get("reason", "")[:160]}
           for a in arrivals if a.kind not in ("valid", "half-copied")}
    standalone = verification_times(repo / NAME / str(first.number), keys["fleet"][1])
    size_mb = (repo / NAME / str(first.number) / "model.onnx").stat().st_size / 1e6
    return {
        "machine": machine(), "clients": args.clients, "wall_s": round(wall, 1), "model_mb": round(size_mb, 1),
        "requests": len(load.samples), "failed": len(load.failed), "failed_examples": load.failed[:5],
        "mismatched": len(load.mismatched), "versions_answered": sorted(load.first_seen),
        "swaps_seen": len(valid), "swap_windows": len(windows),
        "p50_ms": {"steady": round(pct(steady, 50), 1), "during_swaps": round(pct(during, 50), 1)},
        "p99_ms": {"steady": round(pct(steady, 99), 1), "during_swaps": round(pct(during, 99), 1)},
        "p50_ratio": round(pct(during, 50) / pct(steady, 50), 2), "p99_ratio": round(pct(during, 99) / pct(steady, 99), 2),
        "samples": {"steady": len(steady), "during_swaps": len(during)},
        "bad_versions": bad, "refused_metric": refused,
        "half_copied": [{"version": a.number, "state": index.get(a.number, {}).get("state"),
                         "served": a.first_answer is not None} for a in arrivals if a.kind == "half-copied"],
        "rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "rss_ratio": round(rss["after_last_swap"] / rss["after_first_swap"], 3),
        "swap_s": {"median": round(statistics.median(swap_s), 3), "max": round(max(swap_s), 3)} if swap_s else {},
        "server_steps_ms_median": {k: statistics.median(float(s[k]) for s in steps.values() if k in s)
                                   for k in ("verify", "load", "check", "warmup")},
        "verify_ms_in_server": {"median": statistics.median(verify_ms), "max": max(verify_ms)} if verify_ms else {},
        "verify_standalone": {k: round(v, 3) for k, v in standalone.items()},
    }


if __name__ == "__main__":
    main()
