"""The default recipe on a second, different dataset: handwritten digits, against classical baselines, one split.

scikit-learn's digits (1,797 8x8 grey images, 10 classes, shipped inside the package: offline) are written as
PNG files in a class-folder layout with a seeded 75/25 stratified split (DATA/{train,test}/<digit>/). Then,
on exactly the same split:

- ``tledge finetune DATA`` with the default options (EfficientNet-Lite0, ImageNet weights; tledge carves
  its validation split out of train/), test accuracy of best.pt;
- logistic regression and an RBF SVM on the raw 64 pixels (scaled to 0..1), scikit-learn defaults
  (``max_iter`` raised so logistic regression converges), fitted on the same training images.

Mirroring a digit changes its class, so the default ``--hflip auto`` is expected to turn mirroring off here;
the run prints what it decided. ``--extra`` passes more options to tledge finetune (e.g. ``--no-hflip``).

    python benchmarks/recipe_digits.py [--seed 0] [--out /tmp/tledge-digits] [--extra "--epochs 20"]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def split_digits(root: Path, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits' 75/25 split by ``seed`` as raw pixel arrays; the PNG files under ``root`` (written once)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = digits.images, digits.target
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.25, stratify=y, random_state=seed)
    for split, rows in (("train", idx_train), ("test", idx_test)):
        for i in rows:
            path = root / split / str(y[i]) / f"{i:04d}.png"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.round(x[i] * 255 / 16).astype(np.uint8), "L").save(path)
    flat = x.reshape(len(x), -1) / 16.0
    return flat[idx_train], y[idx_train], flat[idx_test], y[idx_test]


def classical(x_train, y_train, x_test, y_test) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    return {"logistic regression (raw pixels)": LogisticRegression(max_iter=5000).fit(x_train, y_train).score(x_test, y_test),
            "RBF SVM (raw pixels)": SVC().fit(x_train, y_train).score(x_test, y_test)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/tledge-digits"))
    parser.add_argument("--extra", default="", help="more tledge finetune options")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    data, run = args.out / f"data-{args.seed}", args.out / f"run-{args.seed}"
    split = split_digits(data, args.seed)
    baselines = classical(*split)
    t0 = time.perf_counter()
    cmd = ["tledge", "finetune", str(data), "--out", str(run), "--json", *shlex.split(args.extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"tledge finetune failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    metrics = json.loads(proc.stdout)
    seconds = time.perf_counter() - t0
    rows = {f"tledge finetune (defaults{', ' + args.extra if args.extra else ''})": metrics["test_accuracy"],
            **baselines}
    print(f"digits, seed {args.seed}: {len(split[1])} train / {len(split[3])} test images; tledge took "
          f"{seconds / 60:.1f} min, hflip decided: {metrics.get('hflip')}")
    print("| method | test accuracy |\n|---|---|")
    for name, acc in rows.items():
        print(f"| {name} | {100 * acc:.2f}% |")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "rows": rows, "hflip": metrics.get("hflip"),
                                         "seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()
