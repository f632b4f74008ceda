"""Interruption campaign: SIGKILL `tledge finetune` and `tledge export` at random moments, many times.

    python benchmarks/interruptions.py [--finetune-kills 30] [--export-kills 15] [--seed 0]

Part 1 (finetune): a small real run (generated images, EfficientNet-Lite0 from ImageNet weights,
32 px, 6 epochs) is trained once uninterrupted. The same run is then started, killed with
SIGKILL at a random moment within the time a run takes, resumed with `--resume`, killed
again, ... until ``--finetune-kills`` kills have landed, and finally resumed to the end.
After every kill `last.pt` (when present) must load; at the end the history and test
accuracy must equal the uninterrupted run's (same seed, CPU: tledge training is deterministic).

Part 2 (export): a folder already holds a complete export. `tledge export --fp16 --int8` into
that folder is killed at random moments ``--export-kills`` times. After each kill every
visible model file must be a complete model whose metadata says it passed verification (the
old file or the new one, never a torn one), and temporaries must be hidden `.tmp` files.

Prints the counts; exits 1 on any lost or torn file. The same checks, bounded, run in the test
suite (tests/tledge/test_hardening.py, tests/export/test_export_crash.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OPTS = dict(img_size=32, epochs=6, freeze_epochs=2, batch_size=16, workers=2, seed=5)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tledge", *args]


def _finetune_args(data: Path, out: Path) -> list[str]:
    args = ["finetune", str(data), "--out", str(out)]
    for k, v in OPTS.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _comparable(history: list[dict]) -> list[dict]:
    from tests.tledge.test_finetune import _comparable as without_timings  # one definition of "the same run"

    return without_timings(history)


def finetune_campaign(work: Path, kills_wanted: int, rng: random.Random, env: dict) -> dict:
    from tests.datasets import make_dataset
    from tests.kills import run_and_kill
    from tledge.train.checkpoint import load_checkpoint

    data = make_dataset(work / "data", per_class=30)
    t0 = time.monotonic()
    subprocess.run(_cli(*_finetune_args(data, work / "reference")), check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    span = time.monotonic() - t0
    print(f"  uninterrupted run: {span:.1f} s", flush=True)
    out = work / "killed"
    kills = resumed_kills = loads = starts = 0
    while kills < kills_wanted:
        resuming = (out / "last.pt").exists()
        args = _finetune_args(data, out) + (["--resume"] if resuming else [])
        starts += 1
        finished = run_and_kill(_cli(*args), rng.uniform(0.1, 0.9) * span, env)
        if finished is not None:  # it ended before the kill: start over from scratch to keep killing
            if finished != 0:
                raise SystemExit(f"finetune exited {finished} between kills")
            for f in out.iterdir():
                if f.is_file():
                    f.unlink()
            continue
        kills += 1
        resumed_kills += resuming
        if (out / "last.pt").exists():
            load_checkpoint(out / "last.pt")  # raises on a torn checkpoint
            loads += 1
        if kills % 5 == 0:
            print(f"  {kills} kills", flush=True)
    args = _finetune_args(data, out) + (["--resume"] if (out / "last.pt").exists() else [])
    subprocess.run(_cli(*args), check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ref = json.loads((work / "reference" / "metrics.json").read_text())
    got = json.loads((out / "metrics.json").read_text())
    same_history = (_comparable(load_checkpoint(out / "last.pt")["state"]["history"])
                    == _comparable(load_checkpoint(work / "reference" / "last.pt")["state"]["history"]))
    return {"kills": kills, "kills_while_resuming": resumed_kills, "checkpoints_loaded_after_kill": loads,
            "processes_started": starts, "same_history": same_history,
            "test_accuracy": {"uninterrupted": ref["test_accuracy"], "killed_and_resumed": got["test_accuracy"]}}


def _check_export_folder(folder: Path) -> tuple[list[str], list[str]]:
    """(complete model names, problems)."""
    import onnx

    from tledge_export.artifact import read_meta

    names, problems = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            if not path.name.endswith(".tmp"):
                problems.append(f"unexpected hidden file {path.name}")
            continue
        if path.suffix != ".onnx":
            continue
        try:
            onnx.checker.check_model(onnx.load(str(path)))
            if not read_meta(path).verification.passed:
                problems.append(f"{path.name}: metadata says verification failed")
            names.append(path.name)
        except Exception as e:  # a torn file: exactly what must never happen
            problems.append(f"{path.name}: {type(e).__name__}: {str(e)[:120]}")
    return names, problems


def export_campaign(work: Path, kills_wanted: int, rng: random.Random, env: dict) -> dict:
    from tests.kills import run_and_kill

    run = work / "reference"
    out = work / "export"
    export = _cli("export", str(run / "best.pt"), "--out", str(out), "--fp16", "--int8", "--workers", "1")
    t0 = time.monotonic()
    subprocess.run(export, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    span = time.monotonic() - t0
    print(f"  uninterrupted export: {span:.1f} s", flush=True)
    kills = checks = 0
    problems: list[str] = []
    seen_counts: dict[int, int] = {}
    while kills < kills_wanted:
        if run_and_kill(export, rng.uniform(0.2, 1.0) * span, env) is not None:
            continue  # finished before the kill
        kills += 1
        names, bad = _check_export_folder(out)
        checks += 1
        problems += bad
        seen_counts[len(names)] = seen_counts.get(len(names), 0) + 1
    return {"kills": kills, "folder_checks": checks, "torn_or_bad_files": problems,
            "complete_models_after_kill": {str(k): v for k, v in sorted(seen_counts.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--finetune-kills", type=int, default=30)
    ap.add_argument("--export-kills", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    env = {**os.environ, "TLEDGE_PROGRESS": "0"}
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="tledge-kills-") as tmp:
        work = Path(tmp)
        print(f"# finetune: SIGKILL at random moments, {args.finetune_kills} times, resuming each time", flush=True)
        ft = finetune_campaign(work, args.finetune_kills, rng, env)
        print(json.dumps(ft, indent=2))
        print(f"# export: SIGKILL at random moments, {args.export_kills} times, into a folder with a complete export",
              flush=True)
        ex = export_campaign(work, args.export_kills, rng, env)
        print(json.dumps(ex, indent=2))
    ok = ft["same_history"] and ft["test_accuracy"]["uninterrupted"] == ft["test_accuracy"]["killed_and_resumed"] \
        and not ex["torn_or_bad_files"]
    print(f"\n{ft['kills']} finetune kills survived ({ft['checkpoints_loaded_after_kill']} checkpoints checked after a "
          f"kill), resumed run {'equals' if ft['same_history'] else 'DIFFERS FROM'} the uninterrupted one; "
          f"{ex['kills']} export kills, {len(ex['torn_or_bad_files'])} torn or unverified model files")
    if args.json:
        args.json.write_text(json.dumps({"finetune": ft, "export": ex}, indent=2))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
