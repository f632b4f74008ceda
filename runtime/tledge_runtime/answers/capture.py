"""``--capture DIR``: keep the inputs a model flags unknown or unsure, so a person can sort them and fine-tune again.

Each kept input is its own encoded file (the bytes the device received; arrays and PIL images as PNG), named by
the SHA-256 of its content (never by anything a client sent), beside a one-line JSON file (time, the model's
SHA-256, label, score, the prediction set, ``unknown``, ``ood_score``, every class's probability), in
``DIR/unknown/`` or ``DIR/<nearest label>/``: move the files into class folders and they are a dataset.

Bounded: at most ``max_files`` inputs and ``max_bytes`` bytes (oldest dropped first); one input of more than
``max_file_bytes`` is not kept. Written atomically, never through a link (a linked folder is refused at start; a
link planted later is replaced, not followed). A folder that cannot be written is an error at start; a disk
that fills up while capturing pauses capture (one log line) and predictions go on.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import stat
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from tledge_runtime.errors import TledgeError
from tledge_runtime.fileio import atomic_write

log = logging.getLogger("tledge_runtime")

PAUSE_S = 60.0  # after a failed write (disk full, read-only), how long capture rests before it tries again
_UNSAFE = re.compile(r"[^\w.-]+")


def folder_name(label: str) -> str:
    """A class label as a folder name that cannot climb out of the capture folder (``/``, ``..``, control
    characters and spaces become ``_``)."""
    name = _UNSAFE.sub("_", label).strip(".") or "_"
    return name[:128]


class Capture:
    """Keeps flagged inputs in ``folder``; :meth:`offer` decides and writes. Safe to share between threads."""

    def __init__(self, folder: str | os.PathLike, *, model_path: Optional[Path] = None, max_files: int = 1000,
                 max_bytes: int = 512 << 20, max_file_bytes: int = 32 << 20):
        self.folder = Path(folder)
        self.max_files, self.max_bytes, self.max_file_bytes = max_files, max_bytes, max_file_bytes
        self._model_path = model_path
        self._shas: dict[Path, str] = {}  # model file -> SHA-256 (serve swaps models: one per version)
        self._lock = threading.Lock()
        self._paused_until = 0.0
        self._open()
        self._index: OrderedDict[Path, int] = self._scan()  # image file -> bytes (with its sidecar), oldest first

    def _open(self) -> None:
        where = self.folder
        if where.is_symlink():
            raise TledgeError(f"capture folder {where} is a link", hint="pass a real folder that tledge may write")
        try:
            where.mkdir(parents=True, exist_ok=True)
            probe = atomic_write(where / ".tledge-capture", b"inputs flagged unknown or unsure, kept by tledge\n")
        except OSError as e:
            raise TledgeError(f"capture folder {where} cannot be written ({e.strerror or e})",
                              hint="pass a folder this user may write, or leave --capture out") from None
        if not probe.is_file():
            raise TledgeError(f"capture folder {where} cannot be written", hint="pass a writable folder")

    def _scan(self) -> OrderedDict[Path, int]:
        """What earlier runs kept (bounded: a folder of a million files is not walked whole)."""
        found = []
        for sub in list(self.folder.iterdir())[:10_000]:
            if not sub.is_dir() or sub.is_symlink():
                continue
            for meta in list(sub.glob("*.json"))[: 2 * self.max_files]:
                image = next((p for p in sub.glob(meta.stem + ".*") if p.suffix != ".json"), None)
                if image is not None:
                    st = image.lstat()
                    found.append((st.st_mtime, image, st.st_size + meta.lstat().st_size))
        return OrderedDict((image, size) for _, image, size in sorted(found))

    def offer(self, source: Any, prediction: Any, probs: Sequence[float], labels: Sequence[str],
              model_path: Optional[Path] = None) -> Optional[Path]:
        """Keep ``source`` (file path, bytes, PIL image or HxWx3 array) when ``prediction`` is unknown or unsure;
        returns the file written, or None. Never raises for a write that fails: capture pauses instead.
        ``model_path``: the model that answered (default: the one given at start)."""
        if not (prediction.unknown or prediction.unsure) or time.monotonic() < self._paused_until:
            return None
        try:
            data, suffix = _encoded(source, self.max_file_bytes)
        except (OSError, ValueError) as e:
            log.debug("capture: input not kept (%s)", e)
            return None
        if data is None:
            return None
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "model_sha256": self._sha(model_path or self._model_path),
                  **prediction.to_dict(), "unsure": prediction.unsure,
                  "scores": {label: round(float(p), 6) for label, p in zip(labels, probs)}}
        try:
            return self._write(data, suffix, "unknown" if prediction.unknown else folder_name(prediction.label), record)
        except OSError as e:
            self._paused_until = time.monotonic() + PAUSE_S
            log.warning("capture paused for %.0f s: cannot write to %s (%s); predictions go on", PAUSE_S, self.folder,
                        e.strerror or e)
            return None

    def _write(self, data: bytes, suffix: str, sub: str, record: dict) -> Path:
        name = hashlib.sha256(data).hexdigest()[:32]
        folder = self.folder / sub
        with self._lock:
            if folder.is_symlink() or (folder.exists() and not stat.S_ISDIR(folder.lstat().st_mode)):
                raise OSError(f"{folder} is not a plain folder")  # planted: never written through
            folder.mkdir(exist_ok=True)
            image = atomic_write(folder / f"{name}{suffix}", data)
            meta = atomic_write(folder / f"{name}.json", (json.dumps({"file": image.name, **record}) + "\n").encode())
            self._index.pop(image, None)
            self._index[image] = len(data) + meta.stat().st_size
            self._evict()
        return image

    def _evict(self) -> None:
        while self._index and (len(self._index) > self.max_files or sum(self._index.values()) > self.max_bytes):
            oldest, _ = self._index.popitem(last=False)
            for path in (oldest, oldest.with_suffix(".json")):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass

    def _sha(self, model: Optional[Path]) -> str:
        if model is None:
            return ""
        if model not in self._shas:
            h = hashlib.sha256()
            with open(model, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            if len(self._shas) > 64:  # a long-running server sees many versions: keep the recent ones
                self._shas.clear()
            self._shas[model] = h.hexdigest()
        return self._shas[model]


def _encoded(source: Any, limit: int) -> tuple[Optional[bytes], str]:
    """The input's bytes and a file ending: a file or bytes as received, anything else as PNG; (None, "") when
    larger than ``limit``."""
    from PIL import Image

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.stat().st_size > limit:
            return None, ""
        data = path.read_bytes()
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        picture = source if isinstance(source, Image.Image) else Image.fromarray(np.ascontiguousarray(source))
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
        data = buf.getvalue()
    if len(data) > limit:
        return None, ""
    suffix = _suffix(data)
    if suffix is None:  # a format without a common file ending (PPM, ICO, ...): kept as PNG, so it reads as a dataset
        buf = io.BytesIO()
        with Image.open(io.BytesIO(data)) as picture:
            picture.save(buf, format="PNG")
        data, suffix = buf.getvalue(), ".png"
    return data, suffix


def _suffix(data: bytes) -> Optional[str]:
    """The file ending of encoded image bytes, by their magic number (never a name a client chose)."""
    for magic, suffix in ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
                          (b"II*\x00", ".tif"), (b"MM\x00*", ".tif")):
        if data.startswith(magic):
            return suffix
    return ".webp" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else None
