"""End-to-end parity, checked from outside: `tledge evaluate --predictions` (PyTorch on training's code path)
against the runtime's fp32 ONNX probabilities on the same image files.

    python benchmarks/predictions_parity.py RUN/best.pt DATA/test [--model RUN/export/model.onnx]

Prints the largest |Δp| over every image and class (target <= 1e-3), the mean, and how many images' top-1
class differs (target 0). The test images of ELPV are 300x300, so the resize to the model input is exercised.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--model", type=Path, default=None, help="[default: <run>/export/model.onnx]")
    args = parser.parse_args()
    model = args.model or args.checkpoint.parent / "export" / "model.onnx"
    from tledge_runtime import Classifier

    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "predictions.csv"
        subprocess.run(["tledge", "evaluate", str(args.checkpoint), str(args.data), "--predictions", str(csv_path)],
                       check=True, stdout=subprocess.DEVNULL)
        with csv_path.open(newline="") as f:
            rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    torch_p = np.array([[float(v) for v in row[3:]] for row in body])
    with Classifier(model, backend="ort-cpu") as clf:
        if list(clf.labels) != header[3:]:
            sys.exit(f"label order differs: {clf.labels} vs {header[3:]}")
        device_p = clf.scores_batch([row[0] for row in body])
    diff = np.abs(torch_p - device_p)
    flips = int((torch_p.argmax(1) != device_p.argmax(1)).sum())
    print(f"{len(body)} images, {model.name} on ort-cpu against tledge evaluate (PyTorch): max |Δp| {diff.max():.2e}, "
          f"mean |Δp| {diff.mean():.2e}, top-1 differs on {flips}; target max |Δp| <= 1e-3: "
          f"{'met' if diff.max() <= 1e-3 else 'NOT met'}")


if __name__ == "__main__":
    main()
