"""Runtime speed, cold start and footprint: tledge-runtime against PyTorch and OpenVINO, one run, one machine.

Same ResNet-18 224x224 model in every row:
  1. latency p50/p99 at batch 1 and throughput at batch 8 for PyTorch eager fp32 and
     tledge-runtime fp32 / fp16 / int8 (CPU flavour), and OpenVINO on the same int8 (and fp32)
     files; printed as ratios to PyTorch eager (via `tledge benchmark`'s measurement code);
  2. cold start in a new process (import + load + first prediction) for tledge-runtime and
     for a PyTorch predictor (torch + torchvision transforms), 5 runs each, median;
  3. installed size of a virtual environment holding only tledge-runtime, next to PyTorch's.

The model: `--run DIR` (a tledge run folder with best.pt), else a ResNet-18 fitted here on ELPV
(random-init backbone, head trained on cached features: no ResNet weights are reachable offline;
speed does not depend on the weights, int8 accuracy does a little) and exported fp32/fp16/int8.

    python benchmarks/runtime_speed.py --data data/elpv [--threads 2] [--skip-footprint]
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COLD_RUNTIME = """
import time; t0 = time.perf_counter()
from tledge_runtime import Classifier
clf = Classifier({model!r}, threads={threads})
p = clf.predict({image!r})
print(time.perf_counter() - t0)
"""

COLD_TORCH = """
import time; t0 = time.perf_counter()
import torch, torchvision, torchvision.transforms as T
from PIL import Image
torch.set_num_threads({threads})
ckpt = torch.load({ckpt!r}, map_location="cpu", weights_only=True)
state = ckpt["state_dict"]
model = torchvision.models.resnet18(num_classes=len(ckpt["labels"]))
weights = {{k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}}
model.load_state_dict({{**weights, "fc.weight": state["head.weight"], "fc.bias": state["head.bias"]}})
model.eval()
tf = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
with torch.inference_mode():
    model(tf(Image.open({image!r}).convert("RGB"))[None]).argmax(1)
print(time.perf_counter() - t0)
"""


def make_run(data: Path, work: Path) -> Path:
    from tledge.train.finetune import FinetuneConfig, finetune

    run = work / "resnet18"
    finetune(FinetuneConfig(data=str(data), arch="resnet18", weights="none", img_size=224, epochs=3, freeze_epochs=3,
                            out=str(run), workers=2))
    return run


def export_run(run: Path) -> None:
    from tledge.exporting import export_checkpoint
    from tledge_export import ExportConfig

    if all((run / "export" / n).is_file() for n in ("model.onnx", "model.fp16.onnx", "model.int8.onnx")):
        return
    # Random-init backbones quantize worse than pretrained ones; record what int8 does, do not fail on it.
    export_checkpoint(run / "best.pt", ExportConfig(fp16=True, int8=True, budget=100.0, min_agreement=0.0,
                                                    qat="off"))


def cold_start(code: str, runs: int = 5) -> float:
    """Median seconds from the first import to the first prediction, each in a fresh interpreter."""
    times = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def footprint(work: Path) -> dict[str, float]:
    """MB of site-packages: a venv with only tledge-runtime, and the PyTorch packages of this environment."""
    venv = work / "rt-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = venv / "bin" / "pip"
    subprocess.run([str(pip), "install", "-q", str(REPO / "runtime")], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    runtime_mb = (dir_size(site) - dir_size(site / "pip") - sum(dir_size(p) for p in site.glob("pip-*"))) / 1e6
    import importlib.metadata as md

    torch_mb = 0.0
    for dist in ("torch", "torchvision", "triton") + tuple(d.metadata["Name"] for d in md.distributions()
                                                           if d.metadata["Name"].startswith(("nvidia-", "cuda-"))):
        try:
            files = md.files(dist) or []
        except md.PackageNotFoundError:
            continue
        torch_mb += sum((f.locate().stat().st_size for f in files if f.locate().is_file()), 0) / 1e6
    return {"runtime_venv_mb": runtime_mb, "torch_packages_mb": torch_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/elpv"))
    ap.add_argument("--run", type=Path, default=None, help="a tledge run folder with a ResNet-18 best.pt")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--max-images", type=int, default=300, help="test images for accuracy")
    ap.add_argument("--skip-footprint", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("TLEDGE_PROGRESS", "0")
    from tledge.evaluation.bench_table import machine_info, to_markdown
    from tledge.evaluation.benchmark import benchmark

    work = Path(tempfile.mkdtemp(prefix="tledge-rtspeed-"))
    try:
        run = args.run or make_run(args.data, work)
        export_run(run)
        result = benchmark([run], args.data / "test", backends=("ort-cpu", "openvino"), batch=8, iters=args.iters,
                           threads=args.threads, max_images=args.max_images)
        rows = [r for r in result.rows if r.status != "missing"]
        base = next(r for r in rows if r.backend == "pytorch-eager")
        print(f"machine: {json.dumps(machine_info())}")
        print(f"model: ResNet-18 224x224 from {run}; {result.images} test images; threads {args.threads}")
        print(to_markdown(result))
        print()
        print("| model | backend | p50 ms | latency vs PyTorch | img/s @8 | throughput vs PyTorch |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            if r.p50_ms is None:
                continue
            print(f"| {r.name} | {r.backend} | {r.p50_ms:.2f} | {r.p50_ms / base.p50_ms:.3f}x | {r.throughput:.1f} | "
                  f"{r.throughput / base.throughput:.2f}x |")
        int8_rt = next((r for r in rows if r.name == "model.int8.onnx" and r.backend == "ort-cpu"), None)
        int8_ov = next((r for r in rows if r.name == "model.int8.onnx" and r.backend == "openvino"), None)
        if int8_rt and int8_ov and int8_rt.p50_ms and int8_ov.p50_ms:
            print(f"\nint8 tledge-runtime latency = {int8_rt.p50_ms / base.p50_ms:.3f}x PyTorch eager (target <= 0.2x); "
                  f"{int8_rt.p50_ms / int8_ov.p50_ms:.2f}x OpenVINO on the same file (target <= 1.0x)")

        image = str(next((args.data / "test").rglob("*.png")))
        cold = {
            "tledge-runtime int8": cold_start(COLD_RUNTIME.format(model=str(run / "export" / "model.int8.onnx"),
                                                                  image=image, threads=args.threads)),
            "tledge-runtime fp32": cold_start(COLD_RUNTIME.format(model=str(run / "export" / "model.onnx"),
                                                                  image=image, threads=args.threads)),
            "PyTorch + torchvision": cold_start(COLD_TORCH.format(ckpt=str(run / "best.pt"), image=image,
                                                                  threads=args.threads)),
        }
        print("\ncold start, new process, import + load + first prediction (median of 5):")
        for k, v in cold.items():
            print(f"  {k}: {v:.3f} s")
        sizes = {} if args.skip_footprint else footprint(work)
        if sizes:
            print(f"\ninstalled size: venv with only tledge-runtime {sizes['runtime_venv_mb']:.0f} MB; "
                  f"PyTorch packages of this environment (torch, torchvision, triton, CUDA libs) {sizes['torch_packages_mb']:.0f} MB "
                  f"({sizes['runtime_venv_mb'] / sizes['torch_packages_mb']:.1%})")
        if args.json:
            args.json.write_text(json.dumps({"bench": result.to_dict(), "cold_start_s": cold, "footprint": sizes},
                                            indent=2, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
