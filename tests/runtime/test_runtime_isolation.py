"""The runtime stays light: no torch ever, nothing heavy at import time."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import tledge_runtime

PACKAGE = Path(tledge_runtime.__file__).parent


def _run(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_predicting_never_loads_torch(models, images):
    import importlib.util

    assert importlib.util.find_spec("torch") is not None, "torch must be installed for this test to mean anything"
    out = _run(f"""
        import json, sys
        import tledge_runtime
        from tledge_runtime import Classifier
        from tledge_runtime.cli import main
        from tledge_runtime import serve, video
        clf = Classifier({str(models["fp32"])!r})
        p = clf.predict({str(images["red"][0])!r})
        clf.predict_batch([{str(images["blue"][0])!r}])
        main(["-q", "info", {str(models["fp32"])!r}])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "timm", "onnx", "tledge"))
        print(json.dumps({{"label": p.label, "heavy": heavy}}))
    """)
    assert out["label"] == "red"
    assert out["heavy"] == []  # no torch, and not even the onnx package: onnxruntime reads the metadata


def test_import_is_lazy():
    out = _run("""
        import json, sys
        import tledge_runtime
        heavy = ("onnxruntime", "numpy", "PIL", "openvino")
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
    """)
    assert out == []


def test_no_module_in_the_package_imports_torch():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("torch", "torchvision", "tledge", "tledge_export", "onnx"), \
                    f"{path.name} imports {name}"
