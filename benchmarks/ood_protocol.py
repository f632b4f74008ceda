"""The "unknown" protocol of issue 20: which out-of-distribution detector, how well, at fp32 and int8, for what cost.

    python benchmarks/ood_protocol.py RUN --data DATA [--export RUN/export] [--outside-folder DIR] [--no-digits]

RUN is a fine-tuned run folder (best.pt, split.json). In-distribution: its test split. Outside
(benchmarks/ood_sets.py): scikit-image's and scikit-learn's bundled pictures, 300 scikit-learn digits upscaled,
synthetic frames; ``--outside-folder`` adds the images of another dataset (the ELPV test split for a digits
model), ``--no-digits`` leaves the digits out (for a digits model). Near-distribution shifts of the test images
are reported, never used to choose.

For every method of tledge.answers.ood (fitted on the run's training images, threshold on its validation split):
AUROC and FPR at 95% TPR against the outside images, with PyTorch's fp32 features and, with ``--export``, with
the int8 model's own features (its pooled-feature tensor read from the int8 graph); the exported method's
in-graph score at fp32 and int8. Also: ECE and NLL before/after temperature scaling, conformal coverage and set
size (LAC and APS) on the test split, and the cost of the second output: batch-1 latency with and without it
(the same fp32 graph otherwise, interleaved, one run) and the bytes it adds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ood_sets  # noqa: E402 - the benchmark's own helper beside it


def _prepared(images, prep):
    from tledge_runtime.image.preprocess import prepare_image

    return np.stack([prepare_image(a, prep) for a in images])


def _outputs(net, images, labels, prep, desc):
    import torch

    from tledge.answers.features import split_outputs
    from tledge.train.transforms import Normalize

    return split_outputs(net, images, labels, Normalize(prep), batch_size=32, device=torch.device("cpu"), desc=desc)


def _rates(det, inside, outside_sets, shift_sets, val):
    from tledge.answers.ood import auroc, fpr_at_tpr, threshold

    s_in = det.score(inside.features, inside.logits)
    everything = np.concatenate([det.score(o.features, o.logits) for o in outside_sets.values()])
    thr = threshold(det.score(val.features, val.logits), 0.95)
    row = {"auroc": auroc(s_in, everything), "fpr95": fpr_at_tpr(s_in, everything, 0.95),
           "test_kept": float((s_in < thr).mean())}
    row["outside_unknown"] = {k: float((det.score(o.features, o.logits) >= thr).mean()) for k, o in outside_sets.items()}
    row["shift_unknown"] = {k: float((det.score(o.features, o.logits) >= thr).mean()) for k, o in shift_sets.items()}
    return row


def _load(args):
    """The run's model and splits, the outside sets and the shifts, all through the device's preprocessing."""
    from tledge.data.folders import Sample, Splits, list_images
    from tledge.data.imagecache import decode_images
    from tledge.train.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_of

    ckpt = load_checkpoint(args.run / "best.pt")
    net, prep = model_from_checkpoint(ckpt), preprocess_of(ckpt)
    splits = Splits.from_json((args.run / "split.json").read_text())
    decoded = {name: decode_images(getattr(splits, name), prep, workers=2, desc=f"decode {name}")
               for name in ("train", "val", "test")}
    outside = {"photos": ood_sets.photos(), "synthetic": ood_sets.synthetic()}
    if not args.no_digits:
        outside["digits"] = ood_sets.digits()
    if args.outside_folder is not None:
        files = list_images(args.outside_folder)
        outside[args.outside_folder.name] = list(decode_images([Sample(f, 0) for f in files], prep, workers=2,
                                                               desc="decode outside").images)
    test_images = list(decoded["test"].images)
    return ckpt, net, prep, decoded, outside, ood_sets.shifts(test_images)


def _feature_tensor(model) -> str:
    """The tensor the out-of-distribution head reads: the pooled features (``/ood/`` nodes' outside input)."""
    produced = {o for n in model.graph.node if n.name.startswith("/ood/") for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    first = next(n for n in model.graph.node if n.name.startswith("/ood/"))
    return next(i for i in first.input if i not in produced and i not in inits)


def _onnx_outputs(path: Path, inputs: dict, prep):
    """Features, logits and in-graph scores of an exported model (ONNX Runtime, CPU) for each named input set."""
    import onnx

    from tledge.answers.fit import Split
    from tledge_export.graph_run import run, session, with_outputs
    from tledge_runtime.image.preprocess import Normalizer

    model = onnx.load(str(path))
    feat = _feature_tensor(model)
    sess = session(with_outputs(model, [feat]))
    out = {}
    for name, (images, labels) in inputs.items():
        logits, score, features = run(sess, Normalizer(prep)(images), outputs=["logits", "ood_score", feat])
        out[name] = (Split(features.reshape(len(features), -1).astype(np.float64), logits.astype(np.float64),
                           labels), score.reshape(-1).astype(np.float64))
    return out


def _latency(net, detector, prep, rounds: int = 300) -> dict:
    """Batch-1 ONNX Runtime latency of the fp32 graph with and without the second output, interleaved."""
    from tledge.exporting import _with_score
    from tledge_export.convert.onnx_export import export_onnx
    from tledge_export.graph_run import session

    plain = export_onnx(net, prep, net.head.out_features)
    scored = export_onnx(_with_score(net, detector), prep, net.head.out_features)
    sessions = {"without": session(plain, threads=2), "with": session(scored, threads=2)}
    x = np.random.default_rng(0).standard_normal((1, 3, prep.height, prep.width)).astype(np.float32)
    times = {k: [] for k in sessions}
    for r in range(rounds):
        for k in (("without", "with") if r % 2 == 0 else ("with", "without")):
            t0 = time.perf_counter()
            sessions[k].run(None, {"input": x})
            times[k].append(time.perf_counter() - t0)
    med = {k: 1000 * float(np.median(v[rounds // 10:])) for k, v in times.items()}
    return {"p50_ms_without": med["without"], "p50_ms_with": med["with"], "ratio": med["with"] / med["without"],
            "bytes_added": len(scored.SerializeToString()) - len(plain.SerializeToString()),
            "fp32_model_bytes": len(plain.SerializeToString())}


def _calibration_and_sets(val, test) -> dict:
    from tledge.answers.calibrate import calibration_report, fit_temperature
    from tledge.answers.conformal import fit_conformal, set_report
    from tledge_runtime.answers.decision import probabilities

    t = fit_temperature(val.logits, val.labels)
    out = {"temperature": t, **calibration_report(test.logits, test.labels, t)}
    for score in ("lac", "aps"):
        sets, _ = fit_conformal(probabilities(val.logits, t), val.labels, 0.95, score)
        out[f"sets_{score}"] = set_report(probabilities(test.logits, t), test.labels, sets)
    return out


def main() -> int:
    from tledge.answers.features import max_ood_bytes
    from tledge.answers.ood import METHODS, auroc, fit, fpr_at_tpr
    from tledge.evaluation.bench_table import machine_info

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="the in-distribution dataset (for the record)")
    ap.add_argument("--export", type=Path, default=None, help="export folder: model.onnx and model.int8.onnx")
    ap.add_argument("--outside-folder", type=Path, default=None, help="another dataset's images, as outside")
    ap.add_argument("--no-digits", action="store_true", help="leave scikit-learn's digits out (a digits model)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    ckpt, net, prep, decoded, outside, shifts = _load(args)
    split = {k: _outputs(net, d.images, d.labels, prep, k) for k, d in decoded.items()}
    outside_fp32 = {k: _outputs(net, _prepared(v, prep), np.zeros(len(v), int), prep, k) for k, v in outside.items()}
    shift_fp32 = {k: _outputs(net, _prepared(v, prep), decoded["test"].labels, prep, k) for k, v in shifts.items()}
    cal = _calibration_and_sets(split["val"], split["test"])
    result = {"run": str(args.run), "data": str(args.data), "machine": machine_info(), "calibration": cal,
              "outside_images": {k: len(v) for k, v in outside.items()}, "fp32": {}, "int8": {}}
    detectors = {}
    for method in METHODS:
        detectors[method] = fit(method, split["train"].features, split["train"].labels, cal["temperature"],
                                max_ood_bytes(net))
        result["fp32"][method] = {**_rates(detectors[method], split["test"], outside_fp32, shift_fp32, split["val"]),
                                  "bytes": detectors[method].nbytes}
    if args.export is not None:
        inputs = {"val": (decoded["val"].images, decoded["val"].labels),
                  "test": (decoded["test"].images, decoded["test"].labels),
                  **{k: (_prepared(v, prep), np.zeros(len(v), int)) for k, v in outside.items()},
                  **{k: (_prepared(v, prep), decoded["test"].labels) for k, v in shifts.items()}}
        for fmt, name in (("fp32-graph", "model.onnx"), ("int8", "model.int8.onnx")):
            got = _onnx_outputs(args.export / name, inputs, prep)
            outs = {k: got[k][0] for k in outside}
            result.setdefault(fmt, {})
            if fmt == "int8":
                for method, det in detectors.items():
                    result["int8"][method] = _rates(det, got["test"][0], outs, {k: got[k][0] for k in shifts},
                                                    got["val"][0])
            graph_in, graph_out = got["test"][1], np.concatenate([got[k][1] for k in outside])
            result[fmt]["in_graph"] = {"auroc": auroc(graph_in, graph_out), "fpr95": fpr_at_tpr(graph_in, graph_out)}
    result["latency"] = _latency(net, detectors[_best(result)], prep)
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _best(result: dict) -> str:
    from tledge.answers.ood import best_method

    return best_method({m: r for m, r in result["fp32"].items() if m != "msp"})


def _print(r: dict) -> None:
    m = r["machine"]
    print(f"{r['run']} on {m['cpu']}, {m['cores']} cores, {m['date']}; outside images: {r['outside_images']}")
    c = r["calibration"]
    print(f"calibration (test, {c['images']} images): T {c['temperature']:.3f}; ECE {100 * c['ece_before']:.2f}% -> "
          f"{100 * c['ece_after']:.2f}%; NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f}")
    for score in ("lac", "aps"):
        s = c[f"sets_{score}"]
        print(f"conformal {score} at 0.95: coverage {100 * s['coverage']:.2f}%, mean set size {s['mean_set_size']:.3f}, "
              f"singletons {100 * s['singletons']:.1f}%")
    print("| method | precision | AUROC | FPR@95 | test kept | " + " | ".join(f"unknown: {k}" for k in r["outside_images"])
          + " | bytes |")
    for fmt in ("fp32", "int8"):
        for method, row in r.get(fmt, {}).items():
            if method == "in_graph":
                continue
            cells = [f"{100 * row['outside_unknown'][k]:.1f}%" for k in r["outside_images"]]
            print(f"| {method} | {fmt} | {row['auroc']:.4f} | {100 * row['fpr95']:.1f}% | {100 * row['test_kept']:.1f}% | "
                  + " | ".join(cells) + f" | {row.get('bytes', '')} |")
    for fmt in ("fp32-graph", "int8"):
        if "in_graph" in r.get(fmt, {}):
            g = r[fmt]["in_graph"]
            print(f"in-graph ood_score, {fmt}: AUROC {g['auroc']:.4f}, FPR@95 {100 * g['fpr95']:.1f}%")
    shifts = r["fp32"][_best(r)]["shift_unknown"]
    print(f"near shifts flagged unknown ({_best(r)}, fp32): " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in shifts.items()))
    lat = r["latency"]
    print(f"cost: batch-1 p50 {lat['p50_ms_without']:.2f} ms without, {lat['p50_ms_with']:.2f} ms with the second "
          f"output: x{lat['ratio']:.3f}; +{lat['bytes_added']} bytes on a {lat['fp32_model_bytes']}-byte fp32 model")


if __name__ == "__main__":
    raise SystemExit(main())
