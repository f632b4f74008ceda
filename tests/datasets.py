"""Tiny real image folders for every test area, and one shared tiny fine-tuning run (fixture in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Three classes a 32-px ImageNet backbone tells apart at once: dominant colour.
COLOURS = {"red": (200, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 200)}


def write_images(folder: Path, colour: tuple[int, int, int], n: int, *, seed: int, size=(40, 48), fmt="png") -> list[Path]:
    """``n`` noisy images of one colour, as real PNG/JPEG files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = size
        base = np.array(colour, dtype=np.float64) * rng.uniform(0.7, 1.0)
        pixels = (base[None, None, :] + rng.normal(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)
        path = folder / f"img{i:03d}.{fmt}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def grey_images(folder: Path, n: int) -> Path:
    """``n`` flat mid-grey 40x40 PNG files: calibration data that clips every real activation of int8."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((40, 40, 3), 120 + i, dtype=np.uint8)).save(folder / f"g{i}.png")
    return folder


def make_dataset(root: Path, *, per_class: int = 14, layout: str = "folder", classes=("red", "green", "blue"),
                 seed: int = 0) -> Path:
    """``root/<class>/*`` or ``root/{train,val,test}/<class>/*`` with real image files."""
    for k, name in enumerate(classes):
        if layout == "folder":
            write_images(root / name, COLOURS[name], per_class, seed=seed + k)
        else:
            for j, (split, n) in enumerate((("train", per_class), ("val", 4), ("test", 4))):
                write_images(root / split / name, COLOURS[name], n, seed=seed + 10 * k + j)
    return root


# The tests' tiny model trains on a recipe of its own (what the defaults were before issue 23): the export and
# runtime tests read its predictions, and a change of the default recipe should not move them.
TINY = dict(arch="efficientnet_lite0", img_size=32, epochs=4, freeze_epochs=2, batch_size=16, workers=2, seed=0,
            crop_scale=0.35, backbone_lr_scale=0.1, vflip=False, rot90=False)


def cli_options(options: dict) -> list[str]:
    """``FinetuneConfig`` keyword arguments as ``tledge finetune`` options (booleans as ``--x`` / ``--no-x``)."""
    args: list[str] = []
    for key, value in options.items():
        flag = key.replace("_", "-")
        args += [f"--{'' if value else 'no-'}{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
    return args


def tiny_run_fixture(tmp_path_factory: pytest.TempPathFactory):
    """One real fine-tuning run (ImageNet EfficientNet-Lite0, 32 px), shared by the tests that only read it."""
    from tledge.train.finetune import FinetuneConfig, finetune

    root = tmp_path_factory.mktemp("tiny")
    data = make_dataset(root / "data", per_class=16)
    return finetune(FinetuneConfig(data=str(data), out=str(root / "run"), **TINY))
