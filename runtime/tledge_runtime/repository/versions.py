"""The folders of a model repository, ``DIR/<name>/<version>/`` (Triton's layout), read as hostile input.

A version is a folder named by a positive integer holding one model file (``model.onnx``, as ``tledge
export --triton`` writes it, or a tledge ``.engine``) and, when signed, ``model.sig``. Update agents
(Mender, balena, rsync, a Kubernetes volume) copy a version in; a folder is *complete* only when

- its model file is there, and its ``model.sig`` when signatures are required (tledge signs last, so the
  signature is the marker that the rest was written), and
- no file in it changed for ``settle_s`` seconds (``st_ctime``, which every write, rename or chmod moves
  and nobody can set back, so a copy that keeps original modification times is still seen growing).

Until then a version is left alone: not verified, not loaded, not refused. Everything is listed without
following links (:mod:`tledge_runtime.repository.folder`).
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from tledge_runtime.errors import ModelError, TledgeError
from tledge_runtime.repository.folder import Snapshot, snapshot
from tledge_runtime.repository.signature import SIGNATURE_NAME

MODEL_FILE = "model.onnx"
ENGINE_SUFFIX = ".engine"
MAX_VERSION_DIGITS = 18  # fits an int64, as Triton's version numbers do
MAX_ENTRIES = 1024  # model names in a repository, or versions of one model, listed at most
DEFAULT_SETTLE_S = 2.0


@dataclass(frozen=True)
class Found:
    """One version folder as a scan saw it: its files, or why they could not be listed."""

    version: int
    path: Path
    snap: Snapshot | None
    problem: str | None = None  # a link, a special file, too many files: the folder is refused as it is

    @property
    def identity(self) -> tuple:
        return self.snap.identity if self.snap is not None else (self.problem,)


def model_names(root: Path) -> list[str]:
    """Model folders of ``root`` that hold at least one version folder (links are not followed)."""
    names = []
    for entry in _entries(root):
        if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(".") and \
                any(_version(e.name) is not None for e in _entries(Path(entry.path))):
            names.append(entry.name)
    return sorted(names)


def scan(model_dir: Path) -> dict[int, Found]:
    """Every version folder of one model: ``{version: Found}``."""
    found = {}
    for entry in _entries(model_dir):
        version = _version(entry.name)
        if version is None:
            continue  # staging folders (".tmp-3"), config.pbtxt, labels.txt: not versions
        path = Path(entry.path)
        if not entry.is_dir(follow_symlinks=False):
            found[version] = Found(version, path, None, "is a link or a file, not a version folder (links are not "
                                                        "followed)")
            continue
        try:
            found[version] = Found(version, path, snapshot(path))
        except ModelError as e:
            found[version] = Found(version, path, None, e.message)
    return found


def model_file(found: Found) -> str:
    """The one model file of a version folder (relative name), or a ModelError saying what is wrong."""
    names = sorted(f.rel for f in found.snap.files if "/" not in f.rel) if found.snap is not None else []
    models = [n for n in names if n == MODEL_FILE or n.endswith(ENGINE_SUFFIX)]
    if len(models) == 1:
        return models[0]
    if not models and "model.plan" in names:
        raise ModelError(f"version {found.version} holds a raw TensorRT plan (model.plan) without tledge metadata",
                         hint="copy the tledge .engine file (it carries the metadata) into the version folder")
    raise ModelError(f"version {found.version} holds {len(models) or 'no'} model files "
                     f"({', '.join(models) or 'no model.onnx or .engine'})",
                     hint="a version folder holds one model.onnx or one tledge .engine file")


def incomplete(found: Found, signed: bool, settle_s: float, now_ns: int | None = None) -> str | None:
    """Why a version folder is not complete yet (None when it is)."""
    if found.snap is None:
        return None  # a folder that cannot be listed is refused, not waited for
    names = found.snap.names()
    if not any(n == MODEL_FILE or n.endswith(ENGINE_SUFFIX) or n == "model.plan" for n in names):
        return "no model file yet"  # (a Triton plan alone is judged, and refused with its reason)
    if signed and SIGNATURE_NAME not in names:
        return f"no {SIGNATURE_NAME} yet (a signed version is complete once its signature is there)"
    age = ((now_ns if now_ns is not None else time.time_ns()) - found.snap.newest_change_ns) / 1e9
    if age < settle_s:
        return f"files changed {max(age, 0.0):.1f} s ago; waiting until none changes for {settle_s:g} s"
    return None


def _version(name: str) -> int | None:
    if not name.isascii() or not name.isdigit() or len(name) > MAX_VERSION_DIGITS or name != str(int(name)):
        return None  # "007" is not version 7: one folder per number, as Triton reads them
    return int(name) if int(name) > 0 else None


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        st = os.lstat(folder)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise TledgeError(f"{folder}: not a folder (links are not followed)", hint="pass the repository folder")
        with os.scandir(folder) as it:
            entries = []
            for entry in it:
                if len(entries) >= MAX_ENTRIES:
                    raise TledgeError(f"{folder}: more than {MAX_ENTRIES} entries",
                                      hint="a model repository holds a few models with a few versions each")
                entries.append(entry)
    except OSError as e:
        raise TledgeError(f"{folder}: cannot list the model repository ({e.strerror or e})",
                          hint="check that the folder exists and is readable") from None
    return sorted(entries, key=lambda e: e.name)
