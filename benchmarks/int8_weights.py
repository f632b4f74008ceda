"""Why int8 weights use 7 bits: every way ONNX Runtime can quantize a model, on this machine's CPU, side by side.

    python benchmarks/int8_weights.py RUN [--calib-size 300]

RUN is a fine-tuned run folder (best.pt, split.json; its export/model.onnx is used when present). The same fp32
graph is quantized four ways (static QDQ, minmax, per-channel, the classifier output left in float, 300 stratified
training images) and each is judged like an export on the run's held-out images: top-1 agreement with PyTorch
(all, and decided images), accuracy, largest |Δlogit|, and the batch-1 p50 latency with ONNX Runtime on the CPU.

- u8 activations x s8 weights, 7-bit weights (``reduce_range``): what tledge writes;
- u8 x s8, 8-bit weights: saturates on x86 without VNNI (VPMADDUBSW's int16 sums);
- u8 x u8, 8-bit: no saturation, no fast kernel;
- s8 x s8, 8-bit.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnx


def main() -> int:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from tledge.data.folders import stratified_sample
    from tledge.data.imagecache import decode_images
    from tledge.evaluation.bench_table import machine_info
    from tledge.exporting import _held_out, _run_splits
    from tledge.train.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_of
    from tledge_export.convert.onnx_export import export_onnx
    from tledge_export.graph_run import latency_ms, run, session
    from tledge_export.int8.quantize import _Reader
    from tledge_export.verify.run import Reference
    from tledge_runtime.image.preprocess import Normalizer
    from tledge_runtime.model.verification import Budget

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--calib-size", type=int, default=300)
    args = ap.parse_args()
    ckpt = load_checkpoint(args.run / "best.pt")
    prep, net = preprocess_of(ckpt), model_from_checkpoint(ckpt)
    splits = _run_splits(args.run, ckpt["labels"])
    held = _held_out(splits, prep, args.run, 2)
    calib = decode_images(stratified_sample(splits.train, args.calib_size, balanced=True), prep, workers=2).images
    ref = Reference.from_model(net, held.images, held.labels, prep, ckpt["labels"])
    work = Path(tempfile.mkdtemp(prefix="tledge-int8-weights-"))
    onnx.save(export_onnx(net, prep, len(ckpt["labels"])), str(work / "fp32.onnx"))
    quant_pre_process(str(work / "fp32.onnx"), str(work / "prep.onnx"), skip_symbolic_shape=True)
    x_calib = Normalizer(prep)(calib)
    u8, s8 = QuantType.QUInt8, QuantType.QInt8
    variants = {"u8 x s8, 7-bit weights (tledge)": (u8, s8, True), "u8 x s8, 8-bit weights": (u8, s8, False),
                "u8 x u8, 8-bit weights": (u8, u8, False), "s8 x s8, 8-bit weights": (s8, s8, False)}
    m = machine_info()
    print(f"{args.run}: {len(ref.labels)} held-out images; {m['cpu']}, {m['cores']} cores, ISA {m['isa']}, {m['date']}")
    print("| weights | agreement | decided agreement | accuracy (PyTorch) | max abs Δlogit | p50 ms |")
    print("|---|---|---|---|---|---|")
    for i, (name, (act, weight, reduce)) in enumerate(variants.items()):
        out = work / f"q{i}.onnx"
        quantize_static(str(work / "prep.onnx"), str(out), _Reader("input", x_calib, None, 16),
                        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce, activation_type=act,
                        weight_type=weight, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"WeightSymmetric": weight == s8, "ActivationSymmetric": act == s8,
                                       "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]})
        sess = session(onnx.load(str(out)), threads=2)
        v = ref.compare(run(sess, ref.x)[0], Budget.accuracy(1.0, 99.0))
        ms = latency_ms(sess, ref.x[:1], iters=60)
        print(f"| {name} | {100 * v.agreement:.2f}% | {100 * v.agreement_decided:.2f}% of {v.decided} | "
              f"{100 * v.accuracy:.2f}% ({100 * v.accuracy_reference:.2f}%) | {v.max_abs_diff:.3f} | {ms:.2f} |")
    print(f"| fp32 | - | - | - | - | {latency_ms(session(onnx.load(str(work / 'fp32.onnx')), threads=2), ref.x[:1], iters=60):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
