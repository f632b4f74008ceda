"""The on-device check and `device="auto"` on real exported models, one run, one machine.

Given an export folder (``tledge export RUN/best.pt --fp16 --int8``):

1. ``tledge-runtime check`` of every model on ort-cpu, openvino (f32) and openvino-bf16 (where the CPU has it):
   what held, what differed, and the bytes each model's reference set adds (against its 5% / 512 KB cap);
2. tampered copies of the fp32 model: metadata mean/std changed, resize (crop ratio) changed, one weight tensor
   scaled by 1.5: which stage the check names;
3. ``device="auto"`` on the int8 model: which backend it picks and why, the first start (measures and caches)
   and the cold start of a new process with the cached choice (import + load + first prediction, median of 5).

    python benchmarks/device_check.py RUN/export [--image IMAGE] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import onnx
from onnx import numpy_helper

from tledge_export.artifact import embed_meta, read_meta
from tledge_export.verify.references import MAX_BYTES, MAX_FRACTION, size_of
from tledge_runtime.backends.ov import cpu_supports_bf16
from tledge_runtime.model_check import check_model

COLD = """
import time; t0 = time.perf_counter()
from tledge_runtime import Classifier
clf = Classifier({model!r})
clf.predict({image!r})
print(time.perf_counter() - t0, clf.backend_name)
"""


def check_formats(export: Path) -> list[dict]:
    backends = ["ort-cpu", "openvino"] + (["openvino-bf16"] if cpu_supports_bf16() else [])
    rows = []
    for path in sorted(export.glob("model*.onnx")):
        refs = read_meta(path).reference_set
        report = check_model(path, backends)
        cap = min(int(MAX_FRACTION * path.stat().st_size), MAX_BYTES)
        rows.append({"model": path.name, "bytes_added": size_of(refs), "cap": cap, "references": len(refs.items),
                     "images": refs.images, "preprocessing": all(s.ok for s in report.preprocessing),
                     "backends": {b.backend: (b.ok, b.detail) for b in report.backends}})
    return rows


def tampered(fp32: Path, work: Path) -> list[dict]:
    model = onnx.load(str(fp32))
    meta = read_meta(model)
    copies = {"mean/std changed": meta.with_(preprocess=replace(meta.preprocess, mean=(0.45, 0.45, 0.45))),
              "resize changed (crop ratio 0.875)": meta.with_(preprocess=replace(meta.preprocess, crop_ratio=0.875))}
    rows = []
    for what, changed in copies.items():
        copy = onnx.load(str(fp32))
        embed_meta(copy, changed)
        rows.append((what, copy))
    scaled = onnx.load(str(fp32))
    conv = next(n for n in scaled.graph.node if n.op_type == "Conv")
    weight = next(t for t in scaled.graph.initializer if t.name == conv.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    rows.append((f"weight {weight.name} x1.5", scaled))
    out = []
    for what, proto in rows:
        path = work / "tampered.onnx"
        onnx.save(proto, str(path))
        report = check_model(path, ["ort-cpu"])
        out.append({"copy": what, "ok": report.ok, "failures": report.failures()})
    return out


def auto(int8: Path, image: Path, work: Path) -> dict:
    env = {**os.environ, "TLEDGE_CACHE": str(work / "cache"), "TLEDGE_AUTO_MEASURE": "1"}
    model = work / int8.name
    shutil.copy(int8, model)
    t0 = time.perf_counter()
    first = subprocess.run([sys.executable, "-c", COLD.format(model=str(model), image=str(image))], env=env,
                           capture_output=True, text=True, check=True)
    first_s = time.perf_counter() - t0
    cold = []
    for _ in range(5):
        proc = subprocess.run([sys.executable, "-c", COLD.format(model=str(model), image=str(image))], env=env,
                              capture_output=True, text=True, check=True)
        seconds, backend = proc.stdout.split()
        cold.append(float(seconds))
    choices = json.loads((work / "cache" / "auto" / "choices.json").read_text())
    (entry,) = choices.values()
    return {"backend": backend, "measured_ms": entry["ms"], "first_start_s_in_process": float(first.stdout.split()[0]),
            "first_start_s_wall": round(first_s, 3), "cold_start_cached_s_median": round(statistics.median(cold), 3),
            "cold_start_cached_s_all": [round(c, 3) for c in cold]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path)
    parser.add_argument("--image", type=Path, default=None, help="an image for the cold starts [default: one "
                                                                  "the export's first reference image]")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tledge-check-") as tmp:
        work = Path(tmp)
        image = args.image
        if image is None:
            refs = read_meta(args.export / "model.onnx").reference_set
            image = work / "reference.jpg"
            image.write_bytes(next(i for i in refs.items if not i.synthetic).encoded())
        results = {"formats": check_formats(args.export), "tampered": tampered(args.export / "model.onnx", work),
                   "auto": auto(args.export / "model.int8.onnx", image, work)}
    print("| model | references (images) | bytes added | cap | preprocessing | " + " | ".join(
        results["formats"][0]["backends"]) + " |")
    print("|---" * (5 + len(results["formats"][0]["backends"])) + "|")
    for r in results["formats"]:
        verdicts = [("ok" if ok else "DIFFERS: ") + ("" if ok else detail) for ok, detail in r["backends"].values()]
        print(f"| {r['model']} | {r['references']} ({r['images']}) | {r['bytes_added']:,} | {r['cap']:,} | "
              f"{'ok' if r['preprocessing'] else 'DIFFERS'} | " + " | ".join(verdicts) + " |")
    print("\n| tampered copy of model.onnx | check |\n|---|---|")
    for r in results["tampered"]:
        print(f"| {r['copy']} | {'passes (!)' if r['ok'] else 'fails: ' + '; '.join(r['failures'])} |")
    a = results["auto"]
    print(f"\nauto on model.int8.onnx: {a['backend']} (measured: {a['measured_ms']} ms at batch 1); first start "
          f"{a['first_start_s_in_process']:.2f} s in process ({a['first_start_s_wall']:.2f} s with interpreter start); "
          f"cold start with the cached choice {a['cold_start_cached_s_median']:.3f} s (median of 5: "
          f"{a['cold_start_cached_s_all']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
