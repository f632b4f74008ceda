"""What each ``tledge-runtime`` sub-command does: a thin map from its options onto the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tledge_runtime import exits
from tledge_runtime.errors import ImageError, TledgeError
from tledge_runtime.text import printable, printable_lines


def classifier(args: argparse.Namespace, *, capture: bool = False) -> Any:
    from tledge_runtime.classifier import Classifier

    return Classifier(args.model, device=args.device, backend=args.backend, threads=args.threads, check=args.check,
                      trusted_keys=args.trusted_key, capture=args.capture if capture else None)

def predict(args: argparse.Namespace) -> int:
    import numpy as np

    with classifier(args, capture=True) as clf:
        prepared, names, failed = [], [], 0
        for path in args.images:
            try:
                prepared.append(clf.prepare(path))
                names.append(str(path))
            except ImageError as e:  # report, carry on with the other images, exit 2 at the end
                print(exits.tledge_error_line(e), file=sys.stderr)
                failed += 1
        if prepared:
            probs, scores = clf.infer_scored(np.stack(prepared))
            answers = clf.answerer.predictions(probs, scores)
            if clf.capture is not None:
                for name, answer, row in zip(names, answers, probs):
                    clf.capture.offer(name, answer, row, clf.labels)
            _print_answers(clf, names, answers, probs, args)
    return exits.BAD_INPUT if failed else exits.OK


def _print_answers(clf: Any, names: list, answers: list, probs: Any, args: argparse.Namespace) -> None:
    """A table (names and labels escaped) or one JSON object per image (exact: json.dumps escapes them itself)."""
    k = min(args.topk, len(clf.labels))
    shown = [printable(n) for n in names]
    width = max([len(n) for n in shown] + [5])
    if not args.json:
        print(f"{'IMAGE':<{width}}  {'LABEL':<16} SCORE" + ("   TOP-K" if k > 1 else ""))
    for name, show, row, a in zip(names, shown, probs, answers):
        top = clf.rank(row, k)
        if args.json:
            record = {"image": name, **a.to_dict(), **({"topk": [p.to_dict() for p in top]} if k > 1 else {})}
            print(json.dumps(record))
            continue
        said = printable(a.label)
        if a.unknown:  # nothing the model was trained on: the label is only the nearest class
            said = f"unknown (nearest: {said} {a.score:.4f}, ood_score {a.ood_score:.4g})"
        elif a.unsure:
            said += f" (unsure: {' or '.join(printable(c) for c in a.candidates) or 'no class'})"
        extra = "   " + ", ".join(f"{printable(p.label)} {p.score:.4f}" for p in top) if k > 1 else ""
        print(f"{show:<{width}}  {said:<16} {a.score:.4f}{extra}")


def info(args: argparse.Namespace) -> int:
    from tledge_runtime.backends.engine_file import is_engine_file
    from tledge_runtime.backends.loader import available_backends, read_meta

    meta = read_meta(args.model)
    fmt = "tensorrt-engine" if is_engine_file(args.model) else "onnx"
    backends = available_backends()
    usable = {b.name for b in backends if b.available}
    order = ("tensorrt",) if fmt == "tensorrt-engine" else ("ort-tensorrt", "ort-cuda", "ort-cpu")
    auto = next((name for name in order if name in usable), None)
    if args.json:
        listed = [{"name": b.name, "available": b.available, "detail": b.detail} for b in backends]
        print(json.dumps({"file": str(args.model), "format": fmt, "meta": meta.to_dict(), "auto_backend": auto,
                          "backends": listed}, indent=2))
        return exits.OK
    p, spec = meta.preprocess, meta.input
    rows = [
        ("file", f"{args.model} ({fmt}, {args.model.stat().st_size / 1e6:.1f} MB)"),
        ("schema", f"version {meta.schema_version}, task {meta.task}"),
        ("labels", f"{meta.num_classes}: " + ", ".join(meta.labels[:20]) + (" ..." if meta.num_classes > 20 else "")),
        ("input", f"{spec.name} {spec.layout} {spec.dtype}, batch {spec.batch or 'dynamic'}, {p.height}x{p.width}"
                  + (", preprocessing baked in" if spec.baked_preprocess else "")),
        ("resize", p.resize + (f" (crop ratio {p.crop_ratio:g}, shorter side {p.resize_size})"
                               if p.resize == "crop" else "") + f", {p.interpolation}"),
        ("normalize", f"mean {list(p.mean)}, std {list(p.std)}, scale {p.scale:.6g}, {p.channel_order}"),
        ("output", f"{meta.output.name} ({meta.output.kind})"),
        ("precision", meta.precision + (f", {meta.quantization.target} int8 ({meta.quantization.method}, "
                                        f"{meta.quantization.calibration_images} calibration images)"
                                        if meta.quantization else "")),
        ("provenance", f"{meta.provenance.architecture}, tledge {meta.provenance.tledge_version or '?'}, "
                       f"opset {meta.provenance.opset or '?'}, created {meta.provenance.created or '?'}"),
    ]
    v = meta.verification
    if v is not None:
        worst = v.worst_class
        rows.append(("verification", f"{'passed' if v.passed else 'FAILED'} against {v.reference or 'PyTorch'} on "
                                     f"{v.images} images ({v.budget.describe()}): agreement {100 * v.agreement:.2f}%, "
                                     f"accuracy {v.accuracy_delta_points:+.2f} pt, {v.flips.to_wrong} right->wrong, "
                                     f"{v.flips.to_correct} wrong->right"
                                     + (f", worst class {worst.label} {worst.delta_points:+.2f} pt" if worst else "")))
    for key, value in rows:  # every value holds strings from the model file: printed escaped
        print(f"{key:<13} {printable(value)}")
    print("backends")
    for b in backends:
        print(f"  {'yes' if b.available else 'no ':<4} {b.name:<13} {printable(b.detail)}")
    print(f"auto picks    {auto or 'nothing usable here'}")
    return exits.OK

def check(args: argparse.Namespace) -> int:
    from tledge_runtime.model_check import check_model

    backends = ["all"] if args.backend == "all" else [args.backend]
    report = check_model(args.model, backends, device=args.device, threads=args.threads)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(printable_lines(report.table()))
    report.raise_for_failures()  # CheckFailed: one error line, exit status 1
    return 0

def build(args: argparse.Namespace) -> int:
    from tledge_runtime.backends.trt_build import build_engine_file

    print(printable(f"wrote {build_engine_file(args.model, args.out, max_batch=args.max_batch)}"))
    return 0

def verify(args: argparse.Namespace) -> int:
    import time

    from tledge_runtime.errors import SignatureError
    from tledge_runtime.repository.keys import load_trusted_keys
    from tledge_runtime.repository.signature import verify_path

    keys = load_trusted_keys(args.public_key)  # a bad key file is a usage error (2), before any verdict
    start = time.perf_counter()
    try:
        v = verify_path(args.path, keys)
    except SignatureError as e:
        if args.json:
            print(json.dumps({"path": str(args.path), "verified": False, "error": e.message, "hint": e.hint}))
        raise
    ms = (time.perf_counter() - start) * 1000.0
    print(json.dumps({"path": str(args.path), "verified": True, "key": v.key.fingerprint, "key_file": v.key.path,
                      "files": list(v.files), "ms": round(ms, 1)}) if args.json else
          printable(f"verified {v.folder}: {len(v.files)} files, signed by key {v.key.short} ({v.key.path}), "
                    f"{ms:.0f} ms"))
    return exits.OK

def serve(args: argparse.Namespace) -> int:
    import os

    from tledge_runtime.serve.config import ServeConfig, check_exposure
    from tledge_runtime.serve.server import Server

    config = ServeConfig(host=args.host, port=args.port, name=args.name,
                         token=args.token if args.token is not None else os.environ.get("TLEDGE_TOKEN") or None,
                         insecure=args.insecure, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
                         max_bytes=args.max_bytes, max_queue=args.max_queue, max_batch=args.max_batch,
                         timeout_s=args.timeout, grace_s=args.grace, topk=args.topk, poll_s=args.poll,
                         capture=str(args.capture) if args.capture is not None else None)
    check_exposure(config)  # before the model loads: a refused bind costs nothing
    if (args.model is None) == (args.model_dir is None):
        raise TledgeError("serve takes a model file or --model-dir DIR, one of the two",
                          hint="tledge-runtime serve model.onnx, or tledge-runtime serve --model-dir DIR")
    if args.model_dir is None:
        if args.poll is not None or args.allow_rollback:
            raise TledgeError("--poll and --allow-rollback need --model-dir", hint="serve a model repository")
        with classifier(args) as clf:
            Server(clf, config).run()
        return 0
    from tledge_runtime.repository.repository import ModelRepository

    repo = ModelRepository(args.model_dir, args.name, trusted_keys=args.trusted_key, allow_rollback=args.allow_rollback,
                           device=args.device, backend=args.backend, threads=args.threads,
                           warmup_batch=args.max_batch, settle_s=args.settle)
    try:
        Server(repo, config).run()
    finally:
        repo.close()
    return 0
