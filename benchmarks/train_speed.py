"""Fine-tuning throughput on this CPU: today's default loop against the fast path the probe chooses, side by side.

Throughput (images/s of the full-network phase: augmentation, normalisation, forward, backward, optimizer step,
the code `tledge finetune` runs): each configuration lives in its own worker process (how OpenMP threads wait is
fixed when torch loads, so it cannot change inside one process), all workers hold the same decoded ELPV training
images, and the parent has them train in turns, A, B, A, B, ...: ``--steps`` steps each per turn, ``--rounds``
turns. A shared machine's load hits every configuration alike; read the ratios, not the absolute numbers.

- ``today``: the loop before issue 23: fp32, eager, PyTorch's threads, OpenMP's default waiting, plain BatchNorm,
  PyTorch's default (for-loop) AdamW, glibc's default allocation (``--no-speedups --precision fp32 --compile off``).
- ``fast``: what `tledge finetune` does by default here: the probe's choice (printed), idle threads sleeping.
- ``--ablate``: each piece on top of ``today``, and ``fast`` with bf16 autocast (emulated on a CPU without bf16:
  the rule "bf16 only in hardware" is measured, not assumed), and ``fast`` compiled (compile seconds reported).
- ``--profile``: one training step of ``today`` and of ``fast`` by operator type (torch.profiler).
- ``--paired``: two whole ``tledge finetune`` runs on DATA, today's arithmetic (``--no-speedups --precision fp32
  --compile off``) and the default, same split and seed, then both best.pt on the test split: accuracy of each and
  McNemar's exact p on the images they disagree on. A run folder under ``--work`` (``today``, ``fast``) that holds
  a finished run is reused, not retrained: link recipe_elpv.py's default run there to pair it. Both run with sleeping OpenMP threads: how idle threads wait
  changes no arithmetic, and spinning ones would triple the machine time of today's run on a shared machine.

    python benchmarks/train_speed.py --data data/elpv [--ablate] [--profile] [--paired] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name -> (environment, worker options): today's loop, the default fast path, and the ablations.
CONFIGS = {
    "today": ({"OMP_WAIT_POLICY": None}, dict(speedups=False, precision="fp32", compile="off")),
    "fast": ({"OMP_WAIT_POLICY": "PASSIVE"}, dict(speedups=True, precision="auto", compile="auto")),
    "today+sleeping-threads": ({"OMP_WAIT_POLICY": "PASSIVE"}, dict(speedups=False, precision="fp32", compile="off")),
    "today+speedups": ({"OMP_WAIT_POLICY": None}, dict(speedups=True, precision="fp32", compile="off")),
    "today+bf16": ({"OMP_WAIT_POLICY": None}, dict(speedups=False, precision="bf16", compile="off")),
    "fast+bf16": ({"OMP_WAIT_POLICY": "PASSIVE"}, dict(speedups=True, precision="bf16", compile="off")),
    "fast+compile": ({"OMP_WAIT_POLICY": "PASSIVE"}, dict(speedups=True, precision="auto", compile="on")),
}


# ----------------------------------------------------------------------------------------------- worker side
def worker(args: argparse.Namespace) -> None:
    """Build one configuration's training step on the decoded images, then train ``run K`` steps on command."""
    import torch

    from tledge.train.speed.apply import keep_allocations

    setup = time.perf_counter()
    state = _build(args, json.loads(args.worker))
    kept = state["choice"].speedups and keep_allocations()
    t0 = time.perf_counter()
    _train(state, 1)  # the first step: oneDNN kernels chosen, or the compile
    first = time.perf_counter() - t0
    _reply({"ready": True, "line": state["choice"].line(), "setup_s": round(t0 - setup, 1),
            "first_step_s": round(first, 1), "threads": torch.get_num_threads(), "kept_allocations": kept,
            "omp": os.environ.get("OMP_WAIT_POLICY", "default")})
    for command in sys.stdin:
        verb, _, arg = command.strip().partition(" ")
        if verb == "run":
            t0 = time.perf_counter()
            n = _train(state, int(arg))
            _reply({"images": n, "seconds": time.perf_counter() - t0})
        elif verb == "profile":
            _reply({"profile": _profile(state)})
        else:
            break


def _build(args: argparse.Namespace, options: dict) -> dict:
    import numpy as np
    import torch
    from torch import nn

    from tledge.data.folders import load_splits
    from tledge.data.imagecache import decode_images, train_geometry
    from tledge.models import create_model, default_preprocess
    from tledge.train.config import FinetuneConfig
    from tledge.train.phases import make_optimizer, param_groups
    from tledge.train.speed.probe import choose
    from tledge.train.speed.step import TrainStep
    from tledge.train.transforms import BatchAugment, Normalize

    cfg = FinetuneConfig(data=str(args.data), arch=args.arch, img_size=args.img_size, batch_size=args.batch_size,
                         **options)
    splits = load_splits(args.data, val_split=0.1, test_split=0.2, seed=0)
    samples = [splits.train[i] for i in np.random.default_rng(0).permutation(len(splits.train))[: args.images]]
    prep = default_preprocess(args.arch, args.img_size)
    train = decode_images(samples, train_geometry(prep), prep, workers=2, desc="decode")
    torch.manual_seed(0)
    net = create_model(args.arch, len(splits.classes), "imagenet").to(memory_format=torch.channels_last)
    planned = 9 * 1772  # the default recipe's fine-tuning on ELPV: 9 epochs of 1,772 images (the compile decision)
    normalize = Normalize(prep)
    example = normalize(torch.from_numpy(np.ascontiguousarray(train.views[1][:2])))
    choice = choose(net, cfg, torch.device("cpu"), prep.height, planned, distributed=False, example=example)
    if options["speedups"] is False and choice.threads is not None:  # today's loop left PyTorch's threads alone
        choice = type(choice)(**{**choice.__dict__, "threads": None})
    if choice.threads is not None:
        torch.set_num_threads(choice.threads)
    net.train()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    opt = make_optimizer(cfg, param_groups(net, cfg), fused=choice.speedups)
    step = TrainStep(net, net, choice, label_smoothing=cfg.label_smoothing, example=example)
    return {"choice": choice, "step": step, "opt": opt, "train": train, "normalize": normalize, "cfg": cfg,
            "augment": BatchAugment((prep.height, prep.width), scale=(cfg.crop_scale, 1.0)),
            "gen": torch.Generator().manual_seed(1), "order": torch.Generator().manual_seed(2), "next": 0}


def _train(state: dict, steps: int) -> int:
    """``steps`` batches the way tledge's epoch loop trains them; returns the images trained."""
    import torch

    train, bs, n = state["train"], state["cfg"].batch_size, 0
    labels = torch.from_numpy(train.labels)
    with state["step"].active():
        for _ in range(steps):
            rows = torch.randperm(len(train), generator=state["order"])[:bs]
            batch = state["augment"](torch.from_numpy(train.images[rows.numpy()]), state["gen"])
            state["step"](state["opt"], state["normalize"](batch), labels[rows])
            n += len(rows)
    return n


def _profile(state: dict) -> list[list]:
    """Self CPU time of one step by operator type: [name, ms, share] for the ten largest."""
    from torch.profiler import profile

    with profile() as prof:
        _train(state, 1)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]
    return [[e.key, round(e.self_cpu_time_total / 1e3, 1), round(e.self_cpu_time_total / total, 3)] for e in top]


def _reply(obj: dict) -> None:
    sys.stdout.write("@@" + json.dumps(obj) + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------- parent side
class Worker:
    def __init__(self, name: str, args: argparse.Namespace):
        env_changes, options = CONFIGS[name]
        env = dict(os.environ, TLEDGE_PROGRESS="0")
        for k, v in env_changes.items():
            env.pop(k, None) if v is None else env.__setitem__(k, v)
        cmd = [sys.executable, __file__, "--worker", json.dumps(options), "--data", str(args.data), "--arch", args.arch,
               "--img-size", str(args.img_size), "--batch-size", str(args.batch_size), "--images", str(args.images)]
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        sys.exit(f"worker {self.name} ended (exit {self.proc.wait()})")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def interleave(workers: list[Worker], rounds: int, steps: int) -> dict[str, list[float]]:
    """images/s of each worker per round, taking turns."""
    speeds: dict[str, list[float]] = {w.name: [] for w in workers}
    for r in range(rounds):
        for w in workers:
            got = w.ask(f"run {steps}")
            speeds[w.name].append(got["images"] / got["seconds"])
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.2f} img/s" for n, v in speeds.items())
              + f" (load {os.getloadavg()[0]:.1f})", flush=True)
    return speeds


def compare(names: list[str], args: argparse.Namespace, base: str = "today") -> dict:
    """Start the workers of ``names`` (``base`` first), interleave them, return speeds and ratios against ``base``."""
    workers = []
    try:
        for name in names:
            workers.append(Worker(name, args))
            print(f"  {name}: {workers[-1].ready['line']} (first step {workers[-1].ready['first_step_s']}s, "
                  f"OpenMP wait {workers[-1].ready['omp']})", flush=True)
        speeds = interleave(workers, args.rounds, args.steps)
        profiles = {w.name: w.ask("profile")["profile"] for w in workers} if args.profile else {}
    finally:
        for w in workers:
            w.close()
    rows = {}
    for name in names:
        ratios = [a / b for a, b in zip(speeds[name], speeds[base])]
        rows[name] = {"images_per_s": round(statistics.median(speeds[name]), 2), "per_round": [round(s, 2) for s in speeds[name]],
                      "ratio": round(statistics.median(ratios), 2), "ratios": [round(x, 2) for x in ratios],
                      "line": next(w.ready for w in workers if w.name == name)["line"],
                      "first_step_s": next(w.ready for w in workers if w.name == name)["first_step_s"]}
    return {"rows": rows, "profiles": profiles, "base": base}


def machine() -> dict:
    """lscpu's model name, the flags that decide precision, cores, torch."""
    import torch

    from tledge.train.speed.cpu import read_cpu

    cpu = read_cpu()
    return {"cpu": cpu.describe(), "native_bf16": cpu.native_bf16, "torch": torch.__version__,
            "python": platform.python_version(), "load_at_start": round(os.getloadavg()[0], 1)}


def paired(args: argparse.Namespace, work: Path) -> dict:
    """Two whole `tledge finetune` runs (today's path, the default), same split and seed; McNemar on the test split."""
    runs = {}
    for name, extra, env_changes in (("today", ["--no-speedups", "--precision", "fp32", "--compile", "off"],
                                      {"OMP_WAIT_POLICY": "PASSIVE"}), ("fast", [], {})):
        env = dict(os.environ, TLEDGE_PROGRESS="0")
        for k, v in env_changes.items():
            env.pop(k, None) if v is None else env.__setitem__(k, v)
        out = work / name
        cmd = [sys.executable, "-m", "tledge", "finetune", str(args.data), "--out", str(out), "--seed", "0",
               *args.paired_extra.split(), *extra]
        t0 = time.perf_counter()
        if (out / "metrics.json").exists():  # a finished run (e.g. recipe_elpv.py's run-0, linked here) is reused
            print(f"  {out}: finished earlier, reused", flush=True)
        else:
            print(f"  {' '.join(cmd[2:])}", flush=True)
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        metrics = json.loads((out / "metrics.json").read_text())
        history = [h for h in metrics_history(out) if h["phase"] == "finetune"]
        runs[name] = {"train_s": round(metrics["train_seconds"]), "test_accuracy": metrics["test_accuracy"],
                      "finetune_images_per_s": round(statistics.median(h["images_per_s"] for h in history), 2),
                      "speed": metrics.get("speed", {}), "correct": test_correct(out / "best.pt", args.data)}
    from tledge_runtime.model.verification import mcnemar_p

    a, b = runs["today"].pop("correct"), runs["fast"].pop("correct")
    fixed = sum(1 for x, y in zip(a, b) if not x and y)
    broken = sum(1 for x, y in zip(a, b) if x and not y)
    return {"runs": runs, "test_images": len(a), "fast_right_today_wrong": fixed, "today_right_fast_wrong": broken,
            "mcnemar_p": mcnemar_p(fixed, broken)}


def metrics_history(out: Path) -> list[dict]:
    import csv

    with open(out / "history.csv") as f:
        return [{k: (v if k == "phase" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def test_correct(best: Path, data: Path) -> list[bool]:
    """Per test image (in a fixed order): does ``best`` classify it right?"""
    from tledge.evaluation.evaluate import evaluate

    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "p.csv"
        evaluate(best, data, predictions=csv_path, device="cpu")
        import csv

        with open(csv_path, encoding="utf-8", newline="") as f:
            rows = sorted(csv.DictReader(f), key=lambda r: r["path"])
    return [r["true"] == r["pred"] for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/elpv"))
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=256, help="training images each worker decodes and trains on")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per turn")
    ap.add_argument("--ablate", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--paired", action="store_true")
    ap.add_argument("--no-throughput", action="store_true", help="skip the interleaved throughput comparison")
    ap.add_argument("--paired-extra", default="", help="options for both paired runs, e.g. '--epochs 8'")
    ap.add_argument("--work", type=Path, default=None, help="folder for the paired runs [default: a temporary one]")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        return worker(args)
    if not (args.data / "train").is_dir():
        sys.exit(f"{args.data}/train not found: run `tledge data elpv {args.data}` first")
    result = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"machine: {result['machine']}", flush=True)
    if not args.no_throughput:
        print(f"today vs fast, {args.arch} {args.img_size}px batch {args.batch_size}, {args.rounds} rounds of "
              f"{args.steps} steps each:", flush=True)
        result["main"] = compare(["today", "fast"], args)
    if args.ablate:
        print("ablations (each against today):", flush=True)
        result["ablations"] = compare(["today", "today+sleeping-threads", "today+speedups", "today+bf16"], args)
        print("fast with bf16, fast compiled (against fast):", flush=True)
        result["fast_variants"] = compare(["fast", "fast+bf16", "fast+compile"], args, base="fast")
    if args.paired:
        print("paired ELPV runs:", flush=True)
        work = args.work or Path(tempfile.mkdtemp(prefix="tledge-trainspeed-"))
        result["paired"] = paired(args, work)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def report(result: dict) -> None:
    print()
    for section in ("main", "ablations", "fast_variants"):
        if section not in result:
            continue
        base = result[section]["base"]
        print(f"| configuration | images/s (median) | × {base} (median of rounds) | per round |")
        print("|---|---|---|---|")
        for name, r in result[section]["rows"].items():
            print(f"| {name} | {r['images_per_s']:.2f} | **{r['ratio']:.2f}×** | {', '.join(map(str, r['ratios']))} |")
        print()
        for name, prof in result[section]["profiles"].items():
            print(f"profile of one {name} step: " + ", ".join(f"{k.removeprefix('aten::')} {100 * s:.0f}%"
                                                              for k, _, s in prof))
    if "paired" in result:
        p = result["paired"]
        for name, r in p["runs"].items():
            print(f"{name}: test accuracy {100 * r['test_accuracy']:.2f}%, fine-tuning {r['finetune_images_per_s']} "
                  f"img/s (not interleaved), training {r['train_s']}s (metrics.json)")
        print(f"of {p['test_images']} test images: fast right where today wrong {p['fast_right_today_wrong']}, "
              f"today right where fast wrong {p['today_right_fast_wrong']}, McNemar exact p = {p['mcnemar_p']:.3f}")


if __name__ == "__main__":
    main()
