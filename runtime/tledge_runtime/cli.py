"""``tledge-runtime``: predict, info and serve from the command line.

A thin map onto the Python API (argparse, so the device package needs nothing
more). Exit status and error line follow :mod:`tledge_runtime.exits`, the same as
``tledge``: 0 ok, 1 a check failed, 2 bad input or usage, 130 interrupted, and every
error is one line on stderr, ``error: <message> (<hint>)``, never a traceback.
Labels, file names and metadata strings come from outside and are printed with their
control characters escaped. Logging (the backend choice, the server's address) goes
to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

from tledge_runtime import __version__, exits
from tledge_runtime.errors import ImageError, TledgeError
from tledge_runtime.text import printable, printable_lines

EXIT_USER_ERROR = exits.BAD_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
        _log_to_stderr(logging.WARNING if args.quiet else logging.INFO)
        return args.run(args)
    except TledgeError as e:
        print(exits.tledge_error_line(e), file=sys.stderr)
        return exits.exit_status(e)
    except KeyboardInterrupt:
        print(exits.error_line("interrupted"), file=sys.stderr)
        return exits.INTERRUPTED
    except BrokenPipeError:  # `tledge-runtime predict ... | head`: the reader left, nothing is wrong
        return exits.OK


class _Parser(argparse.ArgumentParser):
    """argparse with tledge's error line: ``error: <message> (see `<command> --help`)``, exit status 2.

    (argparse's own prints the whole usage block first; sub-command parsers inherit this class.)
    """

    def error(self, message: str) -> NoReturn:
        self.exit(exits.BAD_INPUT, exits.error_line(message, f"see `{self.prog} --help`") + "\n")


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (the CLI may run many times in one process, as in tests)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(printable_lines(self.format(record)), file=sys.stderr)  # messages carry file names


def _log_to_stderr(level: int) -> None:
    # Only tledge_runtime's own messages; other libraries' INFO chatter stays off.
    logger = logging.getLogger("tledge_runtime")
    logger.setLevel(level)
    logger.propagate = False
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tledge-runtime", description="Run tledge-exported image classifiers.",
                     epilog="Exit status: 0 ok, 1 a check failed, 2 bad input or usage, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"tledge-runtime {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_predict(sub)
    _add_info(sub)
    _add_check(sub)
    _add_build(sub)
    _add_serve(sub)
    _add_verify(sub)
    return parser


def _command(sub: Any, name: str, run: Any, *, help: str, model_help: str) -> argparse.ArgumentParser:
    """A sub-command that takes a model file first and calls ``run(args)``."""
    p = sub.add_parser(name, help=help)
    p.add_argument("model", type=Path, help=model_help)
    p.set_defaults(run=run)
    return p


def _add_predict(sub: Any) -> None:
    p = _command(sub, "predict", _predict, help="classify image files",
                 model_help=".onnx or .engine file written by tledge export")
    p.add_argument("images", nargs="+", type=Path, help="image files")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    p.add_argument("--topk", type=_positive_int, default=1, metavar="K", help="list the K best classes (default: 1)")
    _add_model_options(p)


def _add_info(sub: Any) -> None:
    p = _command(sub, "info", _info, help="show a model's metadata and the backends usable on this machine",
                 model_help=".onnx or .engine file")
    p.add_argument("--json", action="store_true", help="print JSON")


def _add_check(sub: Any) -> None:
    p = _command(sub, "check", _check, help="replay the model's embedded reference set on this device: decode, "
                 "resize, normalization and numerics against PyTorch; exit 1 if anything differs",
                 model_help=".onnx or .engine file written by tledge export")
    p.add_argument("--backend", default="auto", choices=("auto", "all") + _backend_names(),
                   help="backend to check, or all that can run this file here (default: auto)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu", "cuda"), help="for --backend auto")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads per inference")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_build(sub: Any) -> None:
    p = _command(sub, "build", _build, help="build a TensorRT engine for this device from a tledge ONNX file (same "
                 "precision and metadata), written only if its reference check passes",
                 model_help=".onnx file written by tledge export (fp16 or TensorRT-flavour int8)")
    p.add_argument("--out", type=Path, default=None, help="engine file (default: the model's path with .engine)")
    p.add_argument("--max-batch", type=_positive_int, default=32, help="largest batch of the engine (default: 32)")


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve the model over HTTP: Open Inference Protocol v2 (as Triton), /predict, "
                       "/metrics; or the versions of a model repository, swapped live (--model-dir)")
    p.add_argument("model", type=Path, nargs="?", help=".onnx or .engine file (or --model-dir)")
    p.set_defaults(run=_serve)
    p.add_argument("--model-dir", type=Path, default=None, metavar="DIR",
                   help="serve DIR/<name>/<version>/ (Triton's layout, as tledge export --triton writes it): the "
                        "highest version that verifies, passes its reference check and warms up; new versions are "
                        "swapped in live")
    p.add_argument("--poll", type=_positive_float, default=None, metavar="SECONDS",
                   help="with --model-dir: look for new versions every SECONDS (default: only on "
                        "POST /v2/repository/models/<name>/load)")
    p.add_argument("--allow-rollback", action="store_true",
                   help="with --model-dir: accept versions lower than one that has served (default: refused)")
    p.add_argument("--settle", type=_positive_float, default=2.0, metavar="SECONDS",
                   help="with --model-dir: a version's files must be unchanged this long before it is read (a copy "
                        "in progress is left alone; default: 2)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1; any other address needs --token or --insecure)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    p.add_argument("--name", default=None,
                   help="model name in /v2/models/<name> (default: the name tledge export --triton gives the file)")
    p.add_argument("--token", default=None,
                   help="require 'Authorization: Bearer TOKEN' (default: $TLEDGE_TOKEN; prefer the variable, "
                        "a command line is visible to other users)")
    p.add_argument("--insecure", action="store_true",
                   help="serve off loopback without a token: anyone who reaches the port may run the model")
    p.add_argument("--ssl-certfile", default=None, help="PEM certificate: serve HTTPS")
    p.add_argument("--ssl-keyfile", default=None, help="PEM private key of --ssl-certfile")
    p.add_argument("--max-bytes", type=_positive_int, default=10 << 20,
                   help="largest request body in bytes (default: 10 MiB)")
    p.add_argument("--max-queue", type=_positive_int, default=64,
                   help="inference requests in flight before answering 503 (default: 64)")
    p.add_argument("--max-batch", type=_positive_int, default=8, help="images per model run under load (default: 8)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds a request may take, upload included; slow senders are cut off (default: 30)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds requests in flight may finish after SIGTERM/SIGINT (default: 10)")
    p.add_argument("--topk", type=_positive_int, default=5, metavar="K", help="classes in each answer (default: 5)")
    _add_model_options(p)


def _add_verify(sub: Any) -> None:
    p = sub.add_parser("verify", help="check a signed model folder (model.sig, OpenSSF model-signing) against "
                       "trusted public keys: every file present and unchanged, nothing unsigned; exit 1 if not")
    p.add_argument("path", type=Path, help="a signed folder (an export, a repository's version folder) or a model "
                                           "file in one")
    p.add_argument("--public-key", action="append", required=True, type=Path, metavar="PUB",
                   help="PEM public key to trust (repeat for several)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=_verify)


def _backend_names() -> tuple[str, ...]:
    from tledge_runtime.backends.loader import BACKENDS

    return BACKENDS


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu", "cuda"),
                   help="where to run (default: auto)")
    p.add_argument("--backend", default=None, choices=_backend_names(),
                   help="force a backend (default: chosen by --device)")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads per inference (default: all cores)")
    p.add_argument("--check", action="store_true",
                   help="replay the model's reference set on this backend first; refuse the model if it differs")
    p.add_argument("--trusted-key", action="append", type=Path, default=None, metavar="PUB",
                   help="PEM public key (repeat for several): refuse a model whose folder is not signed by one of "
                        "them (model.sig, see `tledge-runtime verify`), before loading it")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"{value:g} is not a number of seconds in (0, 86400]")
    return value


def _classifier(args: argparse.Namespace) -> Any:
    from tledge_runtime.classifier import Classifier

    return Classifier(args.model, device=args.device, backend=args.backend, threads=args.threads, check=args.check,
                      trusted_keys=args.trusted_key)


# ------------------------------------------------------------------------- predict


def _predict(args: argparse.Namespace) -> int:
    import numpy as np

    with _classifier(args) as clf:
        prepared, names, failed = [], [], 0
        for path in args.images:
            try:
                prepared.append(clf.prepare(path))
                names.append(str(path))
            except ImageError as e:  # report, carry on with the other images, exit 2 at the end
                print(exits.tledge_error_line(e), file=sys.stderr)
                failed += 1
        probs = clf.infer(np.stack(prepared)) if prepared else []
        k = min(args.topk, len(clf.labels))
        # The table shows names and labels escaped; --json keeps them exact (json.dumps escapes them itself).
        shown = [printable(n) for n in names]
        width = max([len(n) for n in shown] + [5])
        if not args.json and names:
            print(f"{'IMAGE':<{width}}  {'LABEL':<16} SCORE" + ("   TOP-K" if k > 1 else ""))
        for name, show, row in zip(names, shown, probs):
            top, best = clf.rank(row, k), clf.answer(row)
            if args.json:
                record = {"image": name, **best.to_dict()}
                if k > 1:
                    record["topk"] = [p.to_dict() for p in top]
                print(json.dumps(record))
            else:
                extra = "   " + ", ".join(f"{printable(p.label)} {p.score:.4f}" for p in top) if k > 1 else ""
                print(f"{show:<{width}}  {printable(best.label):<16} {best.score:.4f}{extra}")
    return exits.BAD_INPUT if failed else exits.OK


# ------------------------------------------------------------------------- info


def _info(args: argparse.Namespace) -> int:
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


# ------------------------------------------------------------------------- check


def _check(args: argparse.Namespace) -> int:
    from tledge_runtime.model_check import check_model

    backends = ["all"] if args.backend == "all" else [args.backend]
    report = check_model(args.model, backends, device=args.device, threads=args.threads)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(printable_lines(report.table()))
    report.raise_for_failures()  # CheckFailed: one error line, exit status 1
    return 0


def _build(args: argparse.Namespace) -> int:
    from tledge_runtime.backends.trt_build import build_engine_file

    print(printable(f"wrote {build_engine_file(args.model, args.out, max_batch=args.max_batch)}"))
    return 0


def _verify(args: argparse.Namespace) -> int:
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


# ------------------------------------------------------------------------- serve


def _serve(args: argparse.Namespace) -> int:
    import os

    from tledge_runtime.serve.config import ServeConfig, check_exposure
    from tledge_runtime.serve.server import Server

    config = ServeConfig(host=args.host, port=args.port, name=args.name,
                         token=args.token if args.token is not None else os.environ.get("TLEDGE_TOKEN") or None,
                         insecure=args.insecure, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
                         max_bytes=args.max_bytes, max_queue=args.max_queue, max_batch=args.max_batch,
                         timeout_s=args.timeout, grace_s=args.grace, topk=args.topk, poll_s=args.poll)
    check_exposure(config)  # before the model loads: a refused bind costs nothing
    if (args.model is None) == (args.model_dir is None):
        raise TledgeError("serve takes a model file or --model-dir DIR, one of the two",
                          hint="tledge-runtime serve model.onnx, or tledge-runtime serve --model-dir DIR")
    if args.model_dir is None:
        if args.poll is not None or args.allow_rollback:
            raise TledgeError("--poll and --allow-rollback need --model-dir", hint="serve a model repository")
        with _classifier(args) as clf:
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


if __name__ == "__main__":
    sys.exit(main())
