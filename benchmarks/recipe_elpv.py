"""ELPV test accuracy of a tledge recipe over several 75/25 splits, against the published baselines.

For each seed: ``tledge data elpv DATA --seed S`` (75/25 stratified by class and module type, defective = defect
probability >= 0.5, the protocol of Deitsch et al. 2019), ``tledge finetune DATA [options]`` (tledge carves its
validation split out of train/), and the test accuracy of best.pt. With ``--export``, also ``tledge export
--int8`` (post-training int8, then quantization-aware training if the budget is missed) and its numbers.

Prints one row per seed, then mean and spread, against the fine-tuned VGG-19's 88.42%.

    python benchmarks/recipe_elpv.py --seeds 0 1 2 [--extra "--arch efficientnet_lite2"] [--export] \\
        [--out /tmp/tledge-elpv] [--json rows.json]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

BASELINE = 0.8842  # VGG-19 fine-tuned, Deitsch et al. 2019


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # 1: an export format over its budget, reported in the JSON
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def one_seed(seed: int, out: Path, extra: list[str], export: bool) -> dict:
    data, folder = out / f"data-{seed}", out / f"run-{seed}"
    if not data.exists():
        run(["tledge", "data", "elpv", str(data), "--seed", str(seed)])
    t0 = time.perf_counter()
    if not (folder / "metrics.json").exists():
        run(["tledge", "finetune", str(data), "--out", str(folder), *extra])
    metrics = json.loads((folder / "metrics.json").read_text())
    row = {"seed": seed, "test_accuracy": metrics["test_accuracy"], "val_accuracy": metrics["val_accuracy"],
           "hflip": metrics.get("hflip"), "train_seconds": metrics["train_seconds"],
           "arch": metrics["arch"], "img_size": metrics["config"]["img_size"]}
    if export:
        report = json.loads(run(["tledge", "export", str(folder / "best.pt"), "--int8", "--json"]).stdout)
        int8 = next(f for f in report["formats"] if f["format"] == "int8")
        v = int8["verification"]
        row["int8"] = {"status": int8["status"], "agreement": v["agreement"], "delta_points": v["accuracy_delta_points"],
                       "qat": "qat" in int8, "qat_seconds": int8.get("qat", {}).get("seconds"),
                       "post_training_agreement": max((a["agreement"] for a in int8.get("post_training", {})
                                                       .get("attempts", [])), default=None)}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--extra", default="", help="tledge finetune options (default: none, the default recipe)")
    parser.add_argument("--export", action="store_true", help="also export int8 and report it")
    parser.add_argument("--out", type=Path, default=Path("/tmp/tledge-elpv"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = [one_seed(s, args.out, shlex.split(args.extra), args.export) for s in args.seeds]
    print(f"recipe: tledge finetune DATA {args.extra or '(defaults)'}")
    print("| seed | test accuracy | val accuracy | hflip | train min | int8 |\n|---|---|---|---|---|---|")
    for r in rows:
        int8 = r.get("int8")
        note = "-" if int8 is None else (f"{int8['status']}, agreement {100 * int8['agreement']:.2f}%, "
                                          f"Δ {int8['delta_points']:+.2f} pt" + (", QAT" if int8["qat"] else ""))
        print(f"| {r['seed']} | {100 * r['test_accuracy']:.2f}% | {100 * r['val_accuracy']:.2f}% | {r['hflip']} | "
              f"{r['train_seconds'] / 60:.1f} | {note} |")
    accs = [r["test_accuracy"] for r in rows]
    spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"mean {100 * statistics.mean(accs):.2f}% ± {100 * spread:.2f} (sd over {len(accs)} splits); "
          f"published VGG-19 baseline {100 * BASELINE:.2f}%")
    if args.json:
        args.json.write_text(json.dumps({"extra": args.extra, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
