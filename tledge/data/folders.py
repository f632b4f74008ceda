"""Finding a dataset's images and splitting them: ``DATA/<class>/*`` or ``DATA/{train,val,test}/<class>/*``.

Everything here works on file lists; no pixel is decoded. Decoding (and skipping
bad files) happens once, in :mod:`tledge.data.imagecache`. Problems that make training
pointless (no folder, an empty class, a single class, class sets that differ
between splits) are :class:`~tledge.errors.DataError` before any work starts.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tledge.errors import DataError
from tledge_runtime.image.decode import is_image_file
from tledge_runtime.text import printable, unsafe_chars

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class Splits:
    """The run's dataset: class names (index = label) and the three lists of samples."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    origin: str  # "given": the folder had train/val/test; "made": tledge split it (seeded, stratified)

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def to_json(self) -> str:
        """Plain JSON (absolute paths) so a run records exactly which image went where."""
        body = {"classes": self.classes, "origin": self.origin,
                **{name: [[str(s.path), s.label] for s in getattr(self, name)] for name in SPLIT_NAMES}}
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Splits:
        d = json.loads(text)
        lists = {name: [Sample(Path(p), int(y)) for p, y in d[name]] for name in SPLIT_NAMES}
        return cls(classes=list(d["classes"]), origin=d["origin"], **lists)


def list_images(folder: Path) -> list[Path]:
    """Image files below ``folder``, sorted, recursing into sub-folders but never following
    directory symlinks (a symlink loop cannot hang the scan). Hidden files and folders are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            p = Path(dirpath, name)
            if is_image_file(p) and p.is_file():  # is_file() is False for dangling or looping links
                found.append(p)
    return sorted(found)


def scan_class_folders(root: Path) -> dict[str, list[Path]]:
    """``{class name: [image paths]}`` for the class sub-folders of ``root``, names sorted."""
    if not root.is_dir():
        raise DataError(f"{root}: not a folder", hint="pass a folder laid out as DATA/<class>/<image files>")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders found",
                        hint="lay the images out as DATA/<class>/<image files>, one folder per class")
    unsafe = [c for c in classes if unsafe_chars(c)]
    if unsafe:
        # A class name becomes a label: printed by every tool, written one per line (labels.txt), stored in
        # each model. A newline or an escape sequence in it cannot be shown or stored faithfully: refuse it.
        chars = sorted({ch for c in unsafe for ch in unsafe_chars(c)})
        raise DataError(f"{root}: class folder name(s) {', '.join(printable(c) for c in unsafe)} hold control "
                        f"characters ({', '.join(chars)})",
                        hint="rename those folders with printable characters only")
    found = {c: list_images(root / c) for c in classes}
    empty = [c for c, files in found.items() if not files]
    if empty:
        raise DataError(f"{root}: class folder(s) {', '.join(empty)} hold no image files",
                        hint="add images (.jpg, .png, ...) or remove the empty folders")
    return found


def load_splits(root: Path, *, val_split: float = 0.1, test_split: float = 0.2, seed: int = 0) -> Splits:
    """Read ``root`` as a split layout (``train/``, optional ``val/`` and ``test/``) or a class-folder
    layout, and return the three splits. Missing splits are carved out of the training images,
    stratified by class with a seeded shuffle."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such folder", hint="check the dataset path")
    if (root / "train").is_dir():
        return _given_splits(root, val_split=val_split, seed=seed)
    found = scan_class_folders(root)
    classes = _check_classes(list(found), root)
    samples = [Sample(p, i) for i, c in enumerate(classes) for p in found[c]]
    train, val, test = stratified_split(samples, (val_split, test_split), seed=seed)
    return Splits(classes, train, val, test, origin="made")


def _given_splits(root: Path, *, val_split: float, seed: int) -> Splits:
    present = {name: scan_class_folders(root / name) for name in SPLIT_NAMES if (root / name).is_dir()}
    classes = _check_classes(list(present["train"]), root / "train")
    for name, found in present.items():
        if sorted(found) != classes:
            missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
            raise DataError(f"{root / name}: class folders differ from train/ (missing: {missing or '-'}, extra: {extra or '-'})",
                            hint="every split needs the same class folders")
    lists = {name: [Sample(p, classes.index(c)) for c in classes for p in found[c]] for name, found in present.items()}
    train = lists["train"]
    val = lists.get("val")
    if val is None:  # carve a validation split out of train, so test stays untouched until the end
        train, val, _ = stratified_split(train, (val_split, 0.0), seed=seed)
    return Splits(classes, train, val, lists.get("test", []), origin="given")


def _check_classes(classes: list[str], where: Path) -> list[str]:
    if len(classes) < 2:
        raise DataError(f"{where}: only one class folder ({classes[0]}); a classifier needs at least two",
                        hint="add a folder per class, e.g. DATA/ok and DATA/defect")
    return sorted(classes)


def shuffled_by_label(samples: Iterable[Sample], rng: random.Random) -> list[list[Sample]]:
    """The samples of each label (in label order), sorted by path and then shuffled by ``rng``: the one
    place samples are stratified, so a seed gives the same split or sample on every machine."""
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    groups = []
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda s: str(s.path))
        rng.shuffle(items)
        groups.append(items)
    return groups


def stratified_split(samples: Iterable[Sample], fractions: tuple[float, float], *, seed: int
                     ) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Split into (train, a, b) with ``fractions=(frac_a, frac_b)`` of every class, seeded.

    Each class with at least 3 images keeps at least one image in train and gives at
    least one to every split whose fraction is non-zero, so small classes are not lost.
    """
    frac_a, frac_b = fractions
    if not (0 <= frac_a < 1 and 0 <= frac_b < 1 and frac_a + frac_b < 1):
        raise DataError(f"split fractions {fractions} must each be in [0, 1) and sum to less than 1",
                        hint="e.g. --val-split 0.1 --test-split 0.2")
    train, part_a, part_b = [], [], []
    for items in shuffled_by_label(samples, random.Random(seed)):
        n = len(items)
        n_a = _share(n, frac_a)
        n_b = _share(n, frac_b)
        while n_a + n_b >= n and (n_a or n_b):  # keep at least one training image per class
            if n_b >= n_a and n_b:
                n_b -= 1
            else:
                n_a -= 1
        part_a += items[:n_a]
        part_b += items[n_a:n_a + n_b]
        train += items[n_a + n_b:]
    return train, part_a, part_b


def stratified_sample(samples: Iterable[Sample], n: int, *, seed: int = 0, balanced: bool = False) -> list[Sample]:
    """Up to ``n`` samples, seeded: in the proportions of the labels (``balanced=False``, every label keeps
    at least one), or as evenly spread over the labels as their counts allow (``balanced=True``: one per
    label per pass, what int8 calibration uses so a rare class still sets its activation ranges)."""
    groups = shuffled_by_label(samples, random.Random(seed))
    if not balanced:
        total = sum(len(g) for g in groups)
        return [s for g in groups for s in g[:max(1, round(n * len(g) / total))]] if total > n else \
            [s for g in groups for s in g]
    chosen: list[Sample] = []
    while len(chosen) < n and any(groups):  # round robin: one per label per pass
        for g in groups:
            if g and len(chosen) < n:
                chosen.append(g.pop())
    return chosen


def _share(n: int, frac: float) -> int:
    if frac <= 0:
        return 0
    return max(1, round(n * frac)) if n >= 3 else 0
