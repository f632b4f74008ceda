"""Hostile inputs through a runtime-only install, before and after: peak memory, time, and what came out.

    python -m venv /work/venv-rt-before && /work/venv-rt-before/bin/pip install /work/before/runtime
    python -m venv /work/venv-rt-after  && /work/venv-rt-after/bin/pip install -e runtime
    python benchmarks/attacks.py --before /work/venv-rt-before/bin/python --after /work/venv-rt-after/bin/python

Every input costs an attacker nothing to make (a few hundred bytes of PNG, a model file with
a crafted metadata document, a sparse multi-gigabyte file): each is fed to ``tledge-runtime``
(``predict`` or ``info``) in a fresh child process of each install, one at a time. A row
gives, per install, the child's peak RSS (``VmHWM`` of the child itself, read at its exit;
polled from /proc while it runs, in case it is killed), its wall time (Python start-up
included), and the outcome: ``ok``, ``error: ...`` (the one-line error, exit status in
brackets), ``TRACEBACK <last line>``, ``RAW ESC`` (a terminal escape code reached the output),
``timeout`` or ``killed``. Targets for every input (224-px model): peak RSS < 400 MB,
< 2 s, no traceback, no raw escape code; ``target`` says whether *after* meets them.

The children run under an address-space limit (``--mem-limit-mb``, default 4000) so that
"before" fails with MemoryError instead of taking the shared machine's memory: a
"before" peak near the limit means "at least this much". Crafting the inputs needs numpy,
Pillow and onnx (the development environment); the children need only the runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

TARGET_MB, TARGET_S = 400, 2.0
SIZE = 224
LABELS = ["red", "green", "blue"]

# The child: the runtime's own CLI entry point, reporting its own peak RSS when it exits (normally, with an
# error, or after an uncaught exception; not when killed, which the parent's polling covers).
RUNNER = r"""
import atexit, os, re, sys
def _peak():
    try:
        kb = re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)
        with open(os.environ["ATTACK_PEAK_FILE"], "w") as f:
            f.write(kb)
    except Exception:
        pass
atexit.register(_peak)
from tledge_runtime.cli import main
sys.argv = ["tledge-runtime", *sys.argv[1:]]
sys.exit(main())
"""


@dataclass
class Outcome:
    peak_mb: Optional[float]
    seconds: float
    status: Optional[int]
    outcome: str

    def meets_targets(self) -> bool:
        bad = ("TRACEBACK", "RAW ESC", "timeout", "killed")
        return (self.peak_mb is not None and self.peak_mb < TARGET_MB and self.seconds < TARGET_S
                and not self.outcome.startswith(bad))

    def cell(self) -> str:
        peak = f"{self.peak_mb:.0f} MB" if self.peak_mb is not None else "? MB"
        return f"{peak}, {self.seconds:.2f} s, {self.outcome}"


@dataclass(frozen=True)
class Attack:
    name: str
    what: str
    argv: list[str]


# ------------------------------------------------------------------ crafting


def _graph(path: Path, meta_json: str, *, classes: int = 3, dynamic_hw: bool = False, width_from_batch: bool = False,
           ) -> Path:
    """A real 224-px classifier graph (GlobalAveragePool -> Flatten -> Gemm) carrying ``meta_json`` as its metadata.

    ``dynamic_hw``: the input's height and width are free, as a fully convolutional export's are.
    ``width_from_batch``: N extra output columns (N = batch) of large logits: the declared output
    shape is (batch, ?), so the load check passes, and the real width depends on the input.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    h, w = ("h", "w") if dynamic_hw else (SIZE, SIZE)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, h, w])
    weights = np.zeros((3, classes), np.float32)
    for i in range(min(3, classes)):
        weights[i, i] = 1.0
    inits = [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(np.zeros(classes, np.float32), "B")]
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"])]
    if width_from_batch:
        inits += [numpy_helper.from_array(np.array([0], np.int64), "zero"),
                  numpy_helper.from_array(np.array([1], np.int64), "one")]
        nodes += [helper.make_node("Gemm", ["flat", "W", "B"], ["z"]),
                  helper.make_node("Shape", ["input"], ["shape"]),
                  helper.make_node("Slice", ["shape", "zero", "one"], ["n"]),
                  helper.make_node("Concat", ["n", "n"], ["nn"], axis=0),
                  helper.make_node("ConstantOfShape", ["nn"], ["big"],
                                   value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1000.0])),
                  helper.make_node("Concat", ["z", "big"], ["logits"], axis=1)]
        y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "classes"])
    else:
        nodes.append(helper.make_node("Gemm", ["flat", "W", "B"], ["logits"]))
        y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])
    model = helper.make_model(helper.make_graph(nodes, "attack", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.metadata_props.add(key="tledge", value=meta_json)
    onnx.save(model, str(path))
    return path


def _meta(labels: list[str] = LABELS, *, height: int = SIZE, width: int = SIZE, crop_ratio: float = 0.875,
          verification: str = "null") -> str:
    """The metadata document tledge export writes (schema 1), as text, with ``verification`` spliced in raw."""
    doc = {"schema_version": 1, "task": "classification", "labels": labels,
           "preprocess": {"height": height, "width": width, "resize": "crop", "crop_ratio": crop_ratio,
                          "interpolation": "bilinear", "channel_order": "RGB", "scale": 1 / 255,
                          "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
           "provenance": {"architecture": "attack", "checkpoint_sha256": "", "tledge_version": "", "opset": 17,
                          "created": ""},
           "input": {"name": "input", "layout": "NCHW", "dtype": "float32", "batch": None, "baked_preprocess": False},
           "output": {"name": "logits", "kind": "logits"}, "precision": "fp32", "quantization": None,
           "verification": "VERIFICATION"}
    return json.dumps(doc).replace('"VERIFICATION"', verification)


def _engine(path: Path, meta_json: str, size: int) -> Path:
    """A tledge engine file (header + metadata + a few plan bytes), then grown to ``size`` bytes as a sparse hole."""
    doc = meta_json.encode()
    path.write_bytes(b"TLEDGE-TRT\x00\x01" + len(doc).to_bytes(4, "little") + doc + b"plan")
    os.truncate(path, size)
    return path


def craft(d: Path) -> list[Attack]:
    """Write every hostile input into ``d``; return the attacks in table order."""
    import numpy as np
    from PIL import Image, PngImagePlugin

    d.mkdir(parents=True, exist_ok=True)
    model = _graph(d / "model.onnx", _meta())
    m = str(model)
    attacks: list[Attack] = []

    def image(name: str, what: str, make: Callable[[Path], None], command: str = "predict") -> None:
        path = d / name
        if not path.exists():
            make(path)
        attacks.append(Attack(name, what, [command, m, str(path)]))

    image("thin-1x20000.png", "1 px wide, 20,000 tall (a few hundred bytes)",
          lambda p: Image.new("L", (1, 20_000)).save(p))
    image("thin-20000x1.png", "20,000 px wide, 1 tall", lambda p: Image.new("L", (20_000, 1)).save(p))
    image("thin-1x1000000.png", "1 x 1,000,000: the resize target overflows",
          lambda p: Image.new("L", (1, 1_000_000)).save(p))
    image("gray16-9000x9000.png", "16-bit 9000x9000 (float64 copies before)",
          lambda p: Image.new("I;16", (9000, 9000)).save(p))
    image("float-6000x6000.tif", "32-bit float TIFF, 6000x6000, deflate",
          lambda p: Image.new("F", (6000, 6000)).save(p, compression="tiff_adobe_deflate"))
    image("rgb-9000x9000.png", "RGB 9000x9000 (81 Mpx, under Pillow's bomb limit)",
          lambda p: Image.new("RGB", (9000, 9000)).save(p))
    image("bomb-1bit-40000x40000.png", "1-bit 40000x40000 (1.6 Gpx, Pillow's bomb check)",
          lambda p: Image.new("1", (40_000, 40_000)).save(p))

    def ztxt(p: Path) -> None:
        info = PngImagePlugin.PngInfo()
        info.add_text("comment", "A" * 50_000_000, zip=True)  # 50 MB of text, ~50 KB compressed
        Image.new("RGB", (8, 8)).save(p, pnginfo=info)
    image("ztxt-bomb.png", "8x8 PNG with a 50 MB compressed text chunk", ztxt)

    def escape_name(p: Path) -> None:
        Image.fromarray(np.full((64, 64, 3), (200, 30, 30), np.uint8)).save(p)
    image("esc\x1b[2J\x1b]0;pwned\x07.png", "a file name holding terminal escape codes", escape_name)

    def model_attack(name: str, what: str, path: Path, commands: tuple[str, ...] = ("info", "predict")) -> None:
        sample = d / "sample.png"
        if not sample.exists():
            Image.fromarray(np.full((300, 400, 3), (30, 200, 50), np.uint8)).save(sample)
        for command in commands:  # "info --json": the JSON printer, "info": the table printer
            argv = [*command.split(), str(path)] + ([str(sample)] if command == "predict" else [])
            attacks.append(Attack(f"{name} ({command})", what, argv))

    deep = 100_000
    model_attack("deep-metadata", "metadata JSON nested 100,000 deep",
                 _graph(d / "deep.onnx", "[" * deep + "]" * deep))
    model_attack("deep-verification", "verification nested 900 deep (parses, cannot be re-encoded)",
                 _graph(d / "deep-verification.onnx", _meta(verification='{"a":' * 900 + "1" + "}" * 900)),
                 commands=("info --json",))
    model_attack("huge-resize", "metadata: 8192 px input, crop ratio 0.1 (81,920-px resize), dynamic-size graph",
                 _graph(d / "huge-resize.onnx", _meta(height=8192, width=8192, crop_ratio=0.1), dynamic_hw=True),
                 commands=("predict",))
    model_attack("largest-allowed-size", "metadata at the new bounds: 2048 px input, crop ratio 0.5 (4096-px resize)",
                 _graph(d / "largest.onnx", _meta(height=2048, width=2048, crop_ratio=0.5), dynamic_hw=True),
                 commands=("predict",))
    model_attack("width-from-input", "output width = 3 + batch (declared dynamic)",
                 _graph(d / "width.onnx", _meta(), width_from_batch=True), commands=("predict",))
    model_attack("escape-labels", "labels holding terminal escape codes",
                 _graph(d / "escape.onnx", _meta(["red\x1b[31m", "\x1b]0;pwned\x07green", "\x1b[2Jblue"])))
    many = [format(i, "x") for i in range(110_000)]
    model_attack("110k-labels", "110,000 labels (under 1 MiB of metadata)",
                 _graph(d / "labels.onnx", _meta(many), classes=len(many)), commands=("predict",))
    engine = d / "huge.engine"
    if not engine.exists():
        _engine(engine, _meta(), 8 << 30)
    attacks.append(Attack("8GB-engine (info)", "8 GB engine file (sparse) for `info`", ["info", str(engine)]))
    return attacks


# ------------------------------------------------------------------ running


def _vmhwm_kb(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            m = re.search(r"VmHWM:\s+(\d+) kB", f.read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def run_one(python: str, argv: list[str], *, timeout: float, mem_limit_mb: int, scratch: Path) -> Outcome:
    peak_file = scratch / "peak"
    peak_file.unlink(missing_ok=True)
    limit = mem_limit_mb << 20

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**child_env(), "ATTACK_PEAK_FILE": str(peak_file), "OMP_NUM_THREADS": "2"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([python, "-c", RUNNER, "-q", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, preexec_fn=limit_memory)
    polled = [0]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            kb = _vmhwm_kb(proc.pid)
            if kb:
                polled[0] = max(polled[0], kb)
            done.wait(0.01)

    threading.Thread(target=poll, daemon=True).start()
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        timed_out = True
    seconds = time.perf_counter() - t0
    done.set()
    reported = int(peak_file.read_text()) if peak_file.exists() and peak_file.read_text().strip() else 0
    peak_kb = max(reported, polled[0])
    return Outcome(peak_kb / 1024 if peak_kb else None, seconds, proc.returncode,
                   _describe(proc.returncode, out, err, timed_out, timeout))


def _describe(status: int, out: bytes, err: bytes, timed_out: bool, timeout: float) -> str:
    if timed_out:
        return f"timeout (> {timeout:.0f} s)"
    text = err.decode("utf-8", "replace")
    if "Traceback (most recent call last)" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        return "TRACEBACK " + _clip(last, 60)
    if b"\x1b" in out or b"\x1b" in err or b"\x07" in out or b"\x07" in err:
        return f"RAW ESC in output [{status}]"
    if status is not None and status < 0:
        return f"killed (signal {-status})"
    if status == 0:
        return "ok"
    line = next((line for line in text.splitlines() if line.startswith("error: ")), text.strip()[:60])
    return f"{_clip(line, 70)} [{status}]"


def _clip(text: str, n: int) -> str:
    text = text.replace("|", "/")  # a Markdown table cell
    return text if len(text) <= n else text[: n - 3] + "..."


def _version(python: str) -> str:
    code = "import tledge_runtime, onnxruntime, PIL; print(tledge_runtime.__file__)"
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=child_env())
    return proc.stdout.strip() or proc.stderr.strip()[-200:]


def child_env() -> dict[str, str]:
    """The environment of a child runtime: its own install only (a PYTHONPATH of the development tree would
    shadow it)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", help="python of a runtime-only install of the starting commit")
    ap.add_argument("--after", required=True, help="python of a runtime-only install of the current tree")
    ap.add_argument("--dir", type=Path, default=None, help="where the hostile files go [default: a temp folder]")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per run before the child is killed")
    ap.add_argument("--mem-limit-mb", type=int, default=4000, help="address-space limit of each child")
    ap.add_argument("--only", default=None, help="run only the attacks whose name contains this")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()

    folder = args.dir or Path(tempfile.mkdtemp(prefix="tledge-attacks-"))
    attacks = [a for a in craft(folder) if not args.only or args.only in a.name]
    installs = {"after": args.after, **({"before": args.before} if args.before else {})}
    print(f"# {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; child address-space limit {args.mem_limit_mb} MB; inputs in {folder}")
    for name, python in installs.items():
        print(f"# {name}: {python} -> {_version(python)}")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for attack in attacks:
            row = {"input": attack.name, "what": attack.what, "command": attack.argv[0]}
            for name in ("before", "after"):
                if name in installs:
                    row[name] = run_one(installs[name], attack.argv, timeout=args.timeout,
                                        mem_limit_mb=args.mem_limit_mb, scratch=Path(scratch))
            rows.append(row)
            print(f"  {_clip(attack.name, 40)}: " + " | ".join(f"{k} {row[k].cell()}" for k in ("before", "after")
                                                                if k in row), file=sys.stderr)
    head = ["input", "what"] + (["before: peak RSS, time, outcome"] if args.before else [])
    head += ["after: peak RSS, time, outcome", f"after < {TARGET_MB} MB, < {TARGET_S:.0f} s, no traceback"]
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        cells = [_clip(row["input"].encode("unicode_escape").decode(), 40), row["what"]]
        cells += [row[k].cell() for k in ("before", "after") if k in row]
        cells.append("yes" if row["after"].meets_targets() else "**NO**")
        print("| " + " | ".join(cells) + " |")
    met = sum(row["after"].meets_targets() for row in rows)
    print(f"\nafter meets the targets on {met} of {len(rows)} inputs")
    if args.json:
        args.json.write_text(json.dumps([{**r, **{k: asdict(r[k]) for k in ("before", "after") if k in r}}
                                         for r in rows], indent=1))


if __name__ == "__main__":
    main()
