"""The sub-commands of ``tledge-runtime`` and their options (argparse: the device package needs nothing more)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tledge_runtime.cli import commands


def add_commands(sub: Any) -> None:
    """Every sub-command, in the order ``--help`` lists them."""
    for add in (_add_predict, _add_info, _add_check, _add_build, _add_serve, _add_verify):
        add(sub)


def _command(sub: Any, name: str, run: Any, *, help: str, model_help: str) -> argparse.ArgumentParser:
    """A sub-command that takes a model file first and calls ``run(args)``."""
    p = sub.add_parser(name, help=help)
    p.add_argument("model", type=Path, help=model_help)
    p.set_defaults(run=run)
    return p

def _add_predict(sub: Any) -> None:
    p = _command(sub, "predict", commands.predict, help="classify image files",
                 model_help=".onnx or .engine file written by tledge export")
    p.add_argument("images", nargs="+", type=Path, help="image files")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    p.add_argument("--topk", type=_positive_int, default=1, metavar="K", help="list the K best classes (default: 1)")
    _add_model_options(p)

def _add_info(sub: Any) -> None:
    p = _command(sub, "info", commands.info, help="show a model's metadata and the backends usable on this machine",
                 model_help=".onnx or .engine file")
    p.add_argument("--json", action="store_true", help="print JSON")

def _add_check(sub: Any) -> None:
    p = _command(sub, "check", commands.check, help="replay the model's embedded reference set on this device: decode, "
                 "resize, normalization and numerics against PyTorch; exit 1 if anything differs",
                 model_help=".onnx or .engine file written by tledge export")
    p.add_argument("--backend", default="auto", choices=("auto", "all") + _backend_names(),
                   help="backend to check, or all that can run this file here (default: auto)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu", "cuda"), help="for --backend auto")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads per inference")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

def _add_build(sub: Any) -> None:
    p = _command(sub, "build", commands.build, help="build a TensorRT engine for this device from a tledge ONNX file (same "
                 "precision and metadata), written only if its reference check passes",
                 model_help=".onnx file written by tledge export (fp16 or TensorRT-flavour int8)")
    p.add_argument("--out", type=Path, default=None, help="engine file (default: the model's path with .engine)")
    p.add_argument("--max-batch", type=_positive_int, default=32, help="largest batch of the engine (default: 32)")

def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve the model over HTTP: Open Inference Protocol v2 (as Triton), /predict, "
                       "/metrics; or the versions of a model repository, swapped live (--model-dir)")
    p.add_argument("model", type=Path, nargs="?", help=".onnx or .engine file (or --model-dir)")
    p.set_defaults(run=commands.serve)
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
    p.set_defaults(run=commands.verify)

def _backend_names() -> tuple[str, ...]:
    from tledge_runtime.backends.loader import BACKENDS

    return BACKENDS

def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--capture", type=Path, default=None, metavar="DIR",
                   help="keep the inputs answered unknown or unsure in DIR/<nearest label or unknown>/, each with a "
                        "JSON line, to sort into class folders and fine-tune on (bounded; oldest dropped first)")
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
