"""`tledge data elpv OUT`: the pip-installed ELPV solar-cell dataset as an image folder.

ELPV (Buerhop-Lutz et al., Deitsch et al.; CC BY-NC-SA 4.0) holds 2,624 300x300 grayscale
electroluminescence images of solar cells, each with an expert's defect probability
(0, 1/3, 2/3, 1) and the module type (mono, poly). Following the published baselines,
a cell is ``defective`` when its probability is >= 0.5, else ``functional``, and the images
are split 75/25 into train/test, stratified by class and module type, with a fixed seed.
The images are copied from the installed package; they are never part of this repository.

Writes stay inside OUT: a name already there is removed and created afresh (``O_EXCL``,
which never follows a link), so a symbolic or hard link at that name is replaced, never
written through; a sub-folder of OUT that is a symbolic link is refused.
"""

from __future__ import annotations

import csv
import io
import os
import random
from dataclasses import dataclass
from pathlib import Path

from tledge.errors import DataError
from tledge.progress import progress
from tledge_runtime.fileio import atomic_write

CLASSES = ("functional", "defective")
THRESHOLD = 0.5


@dataclass(frozen=True)
class ElpvSummary:
    out: Path
    counts: dict[str, dict[str, int]]  # split -> class -> images


def _package_labels() -> Path:
    try:
        import elpv_dataset
    except ImportError:
        raise DataError("the ELPV dataset package is not installed",
                        hint="pip install elpv-dataset  (or: pip install -e '.[elpv]')") from None
    labels = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    if not labels.is_file():
        raise DataError(f"{labels}: missing from the installed elpv-dataset package", hint="pip install --force-reinstall elpv-dataset")
    return labels


def materialize(out: Path, *, test_split: float = 0.25, seed: int = 0, overwrite: bool = False) -> ElpvSummary:
    """Write ``out/{train,test}/{functional,defective}/cellNNNN.png`` and ``out/labels.csv``."""
    labels = _package_labels()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out}: folder exists and is not empty", hint="choose another folder, or pass --overwrite")
    rows = []
    for line in labels.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            rows.append((labels.parent / parts[0], float(parts[1]), parts[2]))
    # Stratify by (class, module type) so both splits keep the mono/poly mix.
    groups: dict[tuple[str, str], list] = {}
    for path, prob, kind in rows:
        groups.setdefault((CLASSES[prob >= THRESHOLD], kind), []).append((path, prob, kind))
    rng = random.Random(seed)
    assignments = []
    for key in sorted(groups):
        items = sorted(groups[key])
        rng.shuffle(items)
        n_test = round(len(items) * test_split)
        assignments += [("test", *r) for r in items[:n_test]] + [("train", *r) for r in items[n_test:]]
    counts: dict[str, dict[str, int]] = {"train": dict.fromkeys(CLASSES, 0), "test": dict.fromkeys(CLASSES, 0)}
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["path", "split", "class", "probability", "module_type"])
    for split in counts:
        for cls in CLASSES:
            _own_folder(out, split, cls)
    for split, path, prob, kind in progress(sorted(assignments, key=lambda a: a[1].name), desc="elpv", unit="img"):
        cls = CLASSES[prob >= THRESHOLD]
        dest = out / split / cls / path.name
        _write_new(dest, path.read_bytes())
        counts[split][cls] += 1
        writer.writerow([dest.relative_to(out).as_posix(), split, cls, f"{prob:.4f}", kind])
    atomic_write(out / "labels.csv", table.getvalue().encode())
    atomic_write(out / "LICENSE.txt", (
        "ELPV dataset: Buerhop-Lutz, Deitsch et al., https://github.com/zae-bayern/elpv-dataset\n"
        "License: CC BY-NC-SA 4.0 (https://creativecommons.org/licenses/by-nc-sa/4.0/)\n"
        "Materialized by `tledge data elpv` from the pip package elpv-dataset.\n").encode())
    return ElpvSummary(out=out, counts=counts)


def _write_new(dest: Path, data: bytes) -> None:
    """Write ``dest`` as a new file: whatever had that name (a file, a link to a file elsewhere) is unlinked first."""
    dest.unlink(missing_ok=True)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _own_folder(out: Path, *parts: str) -> Path:
    """``out/part/...`` as real folders: created if missing, refused if one is a symbolic link (it leads out of OUT)."""
    folder = out
    out.mkdir(parents=True, exist_ok=True)
    for part in parts:
        folder = folder / part
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise DataError(f"{folder}: is a symbolic link or a file, not a folder; tledge writes only inside {out}",
                            hint="remove it, or choose another folder")
        folder.mkdir(exist_ok=True)
    return folder
