"""Post-training int8 against quantization-aware int8 on a real ELPV run, side by side in one process.

    python benchmarks/qat_elpv.py runs/effl0_224/best.pt [--target cpu] [--steps 100] [--train-images 320]
        [--out benchmarks/results/qat_elpv_cpu.json]

For the run's checkpoint: the fp32 ONNX, the post-training int8 QDQ model (ONNX Runtime,
minmax, on the same stratified 300 training images `tledge export` calibrates on, no
nodes kept in float) and the QAT int8 model (:func:`tledge_export.int8.qat.qat_int8` on the
run's training images, the same calibration images). Each is run with ONNX Runtime on
the images `tledge export` verifies on (the run's val + test split) and compared with
PyTorch fp32: accuracy, accuracy delta, top-1 agreement and the images that changed class.
Latency: batch 1, ONNX Runtime CPU (all cores), median of --iters runs, the two int8
models interleaved so both see the same machine load. Also the wall time of the QAT step.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np

CALIB_IMAGES = 300  # what `tledge export` calibrates int8 on (a stratified sample of the train split, seed 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--target", choices=("cpu", "tensorrt"), default="cpu")
    ap.add_argument("--steps", type=int, default=100, help="QAT optimizer steps (0: post-training int8 only)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--label-weight", type=float, default=0.0)
    ap.add_argument("--train-images", type=int, default=0, help="QAT on this many training images (0: all)")
    ap.add_argument("--iters", type=int, default=200, help="timed batch-1 runs per model")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("tledge", "tledge_export.int8.quantize", "tledge_export.convert.onnx_export"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import onnx
    import onnxruntime as ort
    import torch

    from tledge.data.folders import Splits, stratified_sample
    from tledge.data.imagecache import decode_images
    from tledge.train.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_of
    from tledge_export.convert.onnx_export import export_onnx
    from tledge_export.int8.qat import QATConfig, qat_int8
    from tledge_export.int8.quantize import Quantizer
    from tledge_runtime.image.preprocess import Normalizer

    ckpt = load_checkpoint(args.checkpoint)
    prep, labels = preprocess_of(ckpt), list(ckpt["labels"])
    model = model_from_checkpoint(ckpt).eval()
    splits = Splits.from_json((args.checkpoint.parent / "split.json").read_text())
    held = decode_images(splits.val + splits.test, prep, workers=args.workers, desc="decode held-out")
    train_samples = splits.train
    if args.train_images:
        train_samples = stratified_sample(train_samples, args.train_images, seed=0)
    train = decode_images(train_samples if args.steps else [], prep, workers=args.workers, desc="decode train")
    calib = decode_images(stratified_sample(splits.train, CALIB_IMAGES, seed=0), prep, workers=args.workers,
                          desc="decode calibration")
    normalize = Normalizer(prep)
    x_held, y_held = normalize(held.images), held.labels
    with torch.no_grad():
        ref = torch.cat([model(torch.from_numpy(x_held[i:i + 64])) for i in range(0, len(x_held), 64)]).numpy()
    x_calib = normalize(calib.images)
    print(f"{args.checkpoint}: {ckpt['arch']} {prep.height}px, {len(labels)} classes; held-out {len(x_held)}, "
          f"train {len(train)}, calibration {len(x_calib)}", flush=True)

    fp32 = export_onnx(model, prep, len(labels))
    # A copy: ONNX Runtime's quant_pre_process moves the initializers of the proto it is given to external data.
    with Quantizer(onnx.ModelProto.FromString(fp32.SerializeToString()), x_calib, target=args.target,
                   method="minmax") as q:
        ptq = q.quantize()
    cfg = QATConfig(target=args.target, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    temperature=args.temperature, label_weight=args.label_weight)
    models = {"fp32": fp32, "int8 post-training": ptq}
    qat, qat_seconds = None, 0.0
    if args.steps:
        print(f"QAT: {cfg}", flush=True)
        t0 = time.perf_counter()
        qat = qat_int8(model, train.images, prep, labels=train.labels, calib_images=calib.images, config=cfg)
        qat_seconds = time.perf_counter() - t0
        models["int8 QAT"] = qat.model
    sessions = {name: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                for name, m in models.items()}
    rows = {}
    for name, sess in sessions.items():
        logits = np.concatenate([sess.run(None, {"input": x_held[i:i + 64]})[0] for i in range(0, len(x_held), 64)])
        rows[name] = _compare(logits, ref, y_held)
    latency = _latency({k: v for k, v in sessions.items() if k != "fp32"}, x_held[:1], args.iters)
    for name, ms in latency.items():
        rows[name]["latency_ms_p50"] = ms
    result = {"machine": f"{platform.processor() or platform.machine()}, {_cpus()} CPU(s)",
              "onnxruntime": ort.__version__, "torch": torch.__version__, "checkpoint": str(args.checkpoint),
              "arch": ckpt["arch"], "img_size": prep.height, "target": args.target,
              "held_out_images": len(x_held), "pytorch_accuracy": float((ref.argmax(1) == y_held).mean() * 100),
              "formats": rows, "qat": {**qat.details, "wall_seconds": round(qat_seconds, 1)} if qat else None}
    _print(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def _compare(logits: np.ndarray, ref: np.ndarray, labels: np.ndarray) -> dict:
    pred, want = logits.argmax(1), ref.argmax(1)
    acc, ref_acc = float((pred == labels).mean() * 100), float((want == labels).mean() * 100)
    changed = pred != want
    return {"accuracy": round(acc, 3), "delta_points": round(acc - ref_acc, 3),
            "agreement": round(float((~changed).mean() * 100), 3), "changed": int(changed.sum()),
            "changed_to_right": int((changed & (pred == labels)).sum()),
            "changed_to_wrong": int((changed & (want == labels)).sum()),
            "max_abs_logit_diff": round(float(np.abs(logits - ref).max()), 4)}


def _latency(sessions: dict, x1: np.ndarray, iters: int) -> dict[str, float]:
    """Median batch-1 latency (ms) of each session, runs interleaved round-robin after a warm-up."""
    for sess in sessions.values():
        for _ in range(10):
            sess.run(None, {"input": x1})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(iters):
        for name, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, {"input": x1})
            times[name].append((time.perf_counter() - t) * 1000)
    return {k: round(float(np.median(v)), 3) for k, v in times.items()}


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def _print(r: dict) -> None:
    print(f"\n{r['arch']} {r['img_size']}px, int8 target {r['target']}, {r['held_out_images']} held-out images, "
          f"PyTorch accuracy {r['pytorch_accuracy']:.2f}% ({r['machine']}, onnxruntime {r['onnxruntime']})")
    print(f"{'format':<20} {'accuracy':>9} {'delta':>7} {'agreement':>10} {'changed (->right/->wrong)':>26} {'p50 ms':>8}")
    for name, row in r["formats"].items():
        lat = f"{row['latency_ms_p50']:.2f}" if "latency_ms_p50" in row else "-"
        print(f"{name:<20} {row['accuracy']:>8.2f}% {row['delta_points']:>+7.2f} {row['agreement']:>9.2f}% "
              f"{row['changed']:>9} ({row['changed_to_right']}/{row['changed_to_wrong']}){'':>10} {lat:>8}")
    q = r["qat"]
    if q is None:
        return
    print(f"QAT: {q['library']}, {q['steps']} steps x {q['batch_size']}, lr {q['lr']}, {q['distillation']}; "
          f"loss {q['loss_first']:.4f} -> {q['loss_last']:.4f}; wall {q['wall_seconds']:.0f} s {q['phase_seconds']}")


if __name__ == "__main__":
    main()
