"""Fine-tuning speed: tledge's loop against a naive PyTorch loop, same model, data and machine, one run.

The naive loop is the one in PyTorch's transfer-learning tutorial and most blog posts:
torchvision ``ImageFolder`` + ``RandomResizedCrop``/``RandomHorizontalFlip``/``ToTensor``/
``Normalize`` decoded by a ``DataLoader`` every epoch, default float32 contiguous tensors,
``model.train()``, no feature caching, a validation pass per epoch. Two modes:

- frozen backbone ("ConvNet as fixed feature extractor" in the tutorial, 25 epochs there):
  naive = the frozen backbone still runs forward on every image every epoch;
  tledge = backbone features computed once (image + mirror image), head trained on them.
- full fine-tune: every parameter trains, ``--full-epochs`` epochs in both loops
  (tledge: ``--freeze-epochs 0``; its speed comes from decode-once images, channels-last
  memory and BatchNorm in inference mode).

images/s = training images x epochs / wall time of the whole job (decoding, feature
extraction, per-epoch validation and the final test pass included, on both sides). Both are then evaluated on the same test
images with the same eval transform. Prints a table with ratios; nothing is timed twice.

    python benchmarks/finetune_speed.py --data data/elpv          # ELPV: `tledge data elpv data/elpv`
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def subset_folder(src: Path, dst: Path, per_split: dict[str, int], seed: int) -> Path:
    """Copy a stratified subset of a DATA/{train,test}/<class> folder (so both loops read the same files)."""
    rng = random.Random(seed)
    for split, n in per_split.items():
        classes = sorted(d.name for d in (src / split).iterdir() if d.is_dir())
        files = {c: sorted((src / split / c).iterdir()) for c in classes}
        total = sum(len(v) for v in files.values())
        for c in classes:
            take = files[c][:]
            rng.shuffle(take)
            for f in take[: max(1, round(n * len(files[c]) / total))]:
                (dst / split / c).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dst / split / c / f.name)
    return dst


def naive_loop(data: Path, *, arch: str, img_size: int, epochs: int, frozen: bool, batch_size: int, lr: float,
               seed: int, workers: int) -> dict:
    """The tutorial loop. Validation each epoch on DATA/val; returns the trained model and wall time."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    from tledge.models import create_model, default_preprocess

    torch.manual_seed(seed)
    p = default_preprocess(arch, img_size)
    train_tf = T.Compose([T.RandomResizedCrop(img_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(p.mean, p.std)])
    val_tf = T.Compose([T.Resize(img_size), T.CenterCrop(img_size), T.ToTensor(), T.Normalize(p.mean, p.std)])
    loaders = {
        "train": torch.utils.data.DataLoader(ImageFolder(str(data / "train"), train_tf), batch_size=batch_size,
                                             shuffle=True, num_workers=workers),
        "val": torch.utils.data.DataLoader(ImageFolder(str(data / "val"), val_tf), batch_size=batch_size,
                                           num_workers=workers),
    }
    start = time.perf_counter()
    model = create_model(arch, len(loaders["train"].dataset.classes), "imagenet")
    if frozen:
        model.backbone.requires_grad_(False)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for _ in range(epochs):
        model.train()
        for x, y in loaders["train"]:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.no_grad():
            for x, y in loaders["val"]:
                model(x)
    seconds = time.perf_counter() - start
    return {"model": model, "seconds": seconds, "images": len(loaders["train"].dataset) * epochs,
            "preprocess": p, "classes": loaders["train"].dataset.classes}


def tledge_loop(data: Path, out: Path, *, arch: str, img_size: int, epochs: int, frozen: bool, batch_size: int,
                lr: float, seed: int, workers: int) -> dict:
    from tledge.train.checkpoint import load_checkpoint, model_from_checkpoint
    from tledge.train.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(data=str(data), arch=arch, img_size=img_size, epochs=epochs,
                         freeze_epochs=epochs if frozen else 0, batch_size=batch_size, lr=lr,
                         backbone_lr_scale=1.0, patience=0, out=str(out), seed=seed, workers=workers)
    start = time.perf_counter()
    result = finetune(cfg)
    seconds = time.perf_counter() - start
    n_train = len(json.loads((out / "split.json").read_text())["train"])
    ckpt = load_checkpoint(result.best)
    return {"model": model_from_checkpoint(ckpt), "seconds": seconds, "images": n_train * epochs}


def test_accuracy(model: torch.nn.Module, data: Path, arch: str, img_size: int, classes: list[str]) -> float:
    """Accuracy on DATA/test with tledge's eval preprocessing, identical for both models."""
    from tledge.models import default_preprocess
    from tledge_runtime.image.preprocess import preprocess

    p = default_preprocess(arch, img_size)
    model.eval()
    correct = total = 0
    for label, c in enumerate(classes):
        files = sorted((data / "test" / c).iterdir())
        for i in range(0, len(files), 64):
            x = torch.from_numpy(np.concatenate([preprocess(f, p) for f in files[i:i + 64]]))
            with torch.no_grad():
                correct += int((model(x).argmax(1) == label).sum())
            total += len(files[i:i + 64])
    return correct / total


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/elpv"), help="DATA/{train,test}/<class> (ELPV layout)")
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--train-images", type=int, default=600, help="stratified subset of DATA/train")
    ap.add_argument("--val-images", type=int, default=100, help="taken from DATA/train too (disjoint)")
    ap.add_argument("--test-images", type=int, default=400, help="stratified subset of DATA/test")
    ap.add_argument("--frozen-epochs", type=int, default=25, help="PyTorch's tutorial trains its fixed-feature model 25 epochs")
    ap.add_argument("--full-epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (naive) / decode threads (tledge)")
    ap.add_argument("--modes", default="frozen,full")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("TLEDGE_PROGRESS", "0")
    if not (args.data / "train").is_dir():
        sys.exit(f"{args.data}/train not found: run `tledge data elpv {args.data}` first")

    work = Path(tempfile.mkdtemp(prefix="tledge-ftspeed-"))
    try:
        # train+val come from DATA/train (disjoint), test from DATA/test; both loops read these same files.
        pool = subset_folder(args.data, work / "pool", {"train": args.train_images + args.val_images,
                                                         "test": args.test_images}, seed=0)
        data = work / "data"
        for c in sorted(d.name for d in (pool / "train").iterdir()):
            files = sorted((pool / "train" / c).iterdir())
            random.Random(1).shuffle(files)
            n_val = round(len(files) * args.val_images / (args.train_images + args.val_images))
            for split, chunk in (("val", files[:n_val]), ("train", files[n_val:])):
                (data / split / c).mkdir(parents=True, exist_ok=True)
                for f in chunk:
                    shutil.copyfile(f, data / split / c / f.name)
        shutil.copytree(pool / "test", data / "test")
        classes = sorted(d.name for d in (data / "train").iterdir())
        rows = []
        print(f"machine: {machine()}")
        print(f"data: {args.data} subset, train {sum(1 for _ in (data / 'train').rglob('*.png'))}, "
              f"val {sum(1 for _ in (data / 'val').rglob('*.png'))}, test {sum(1 for _ in (data / 'test').rglob('*.png'))}; "
              f"{args.arch} @ {args.img_size}px, batch {args.batch_size}", flush=True)
        for mode in args.modes.split(","):
            frozen = mode == "frozen"
            epochs = args.frozen_epochs if frozen else args.full_epochs
            common = dict(arch=args.arch, img_size=args.img_size, epochs=epochs, frozen=frozen,
                          batch_size=args.batch_size, lr=1e-3 if frozen else 1e-4, seed=0, workers=args.workers)
            naive = naive_loop(data, **common)
            # tledge's finetune ends by evaluating best.pt on the test split inside its timed call, so the
            # naive job's time includes its own test pass too: the whole job on both sides.
            t0 = time.perf_counter()
            naive["accuracy"] = test_accuracy(naive["model"], data, args.arch, args.img_size, classes)
            naive["seconds"] += time.perf_counter() - t0
            print(f"  {mode}: naive loop done in {naive['seconds']:.0f}s", flush=True)
            ours = tledge_loop(data, work / f"run-{mode}", **common)
            print(f"  {mode}: tledge done in {ours['seconds']:.0f}s", flush=True)
            ours["accuracy"] = test_accuracy(ours["model"], data, args.arch, args.img_size, classes)
            rows.append({"mode": mode, "epochs": epochs,
                         "naive": {k: naive[k] for k in ("seconds", "images", "accuracy")},
                         "tledge": {k: ours[k] for k in ("seconds", "images", "accuracy")}})
        print()
        print("| mode | epochs | naive img/s | tledge img/s | speed-up | naive test acc | tledge test acc |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            n, t = r["naive"], r["tledge"]
            n_ips, t_ips = n["images"] / n["seconds"], t["images"] / t["seconds"]
            r["speedup"] = t_ips / n_ips
            print(f"| {r['mode']} | {r['epochs']} | {n_ips:.1f} | {t_ips:.1f} | **{r['speedup']:.1f}x** | "
                  f"{100 * n['accuracy']:.2f}% | {100 * t['accuracy']:.2f}% |")
        if args.json:
            args.json.write_text(json.dumps({"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                             "rows": rows}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
