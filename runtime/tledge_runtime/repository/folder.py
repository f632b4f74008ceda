"""The files of a model folder, read as hostile input: no links followed, bounded in count and depth, hashed in chunks.

A model folder arrives over the air from wherever the fleet's update agent got it. Nothing in it is
followed out of it (a link, a device file, a FIFO is refused by name), the walk stops at
``MAX_FILES`` files and ``MAX_DEPTH`` levels before it allocates more, and each file is hashed in
1 MiB chunks. :func:`snapshot` also records what identifies each file on disk (inode, size, change
time), so whoever verified a folder can tell afterwards that the files it loaded are the ones it
verified: ``st_ctime`` changes on every write, rename or chmod and cannot be set back by a user.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from tledge_runtime.errors import ModelError

MAX_FILES = 4096  # a model folder holds a handful; an export folder with a Triton repository a few dozen
MAX_DEPTH = 8
CHUNK = 1 << 20


@dataclass(frozen=True)
class FileInfo:
    """One regular file of a folder, as ``os.lstat`` saw it."""

    rel: str  # POSIX path relative to the folder
    size: int
    ino: int
    ctime_ns: int
    mtime_ns: int


@dataclass(frozen=True)
class Snapshot:
    """Every regular file under a folder, sorted by relative path."""

    root: Path
    files: tuple[FileInfo, ...]

    @property
    def identity(self) -> tuple:
        """What changes when any file is added, removed, rewritten, replaced or renamed."""
        return tuple((f.rel, f.size, f.ino, f.ctime_ns) for f in self.files)

    @property
    def newest_change_ns(self) -> int:
        return max((f.ctime_ns for f in self.files), default=0)

    def names(self) -> set[str]:
        return {f.rel for f in self.files}


def snapshot(root: Path) -> Snapshot:
    """The regular files under ``root``; a link, a special file, or too many files or levels is a ModelError."""
    try:
        st = os.lstat(root)
    except OSError as e:
        raise ModelError(f"{root}: cannot read the folder ({e.strerror or e})", hint="check the path") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ModelError(f"{root}: not a folder (links are not followed)", hint="pass the model folder itself")
    files: list[FileInfo] = []
    _walk(root, "", 0, files)
    return Snapshot(root, tuple(sorted(files, key=lambda f: f.rel)))


def _walk(folder: Path, prefix: str, depth: int, out: list[FileInfo]) -> None:
    if depth > MAX_DEPTH:
        raise ModelError(f"{folder}: more than {MAX_DEPTH} levels of folders", hint="a model folder is flat")
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise ModelError(f"{folder}: cannot list the folder ({e.strerror or e})", hint="check its permissions") \
            from None
    for entry in entries:
        rel = prefix + entry.name
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            raise ModelError(f"{rel} is a link; tledge does not follow links in model folders",
                             hint="copy the file itself into the folder")
        if stat.S_ISDIR(st.st_mode):
            _walk(Path(entry.path), rel + "/", depth + 1, out)
        elif stat.S_ISREG(st.st_mode):
            if len(out) >= MAX_FILES:
                raise ModelError(f"{folder}: more than {MAX_FILES} files", hint="a model folder holds a few files")
            out.append(FileInfo(rel, st.st_size, st.st_ino, st.st_ctime_ns, st.st_mtime_ns))
        else:
            raise ModelError(f"{rel} is not a regular file (a device, FIFO or socket)",
                             hint="model folders hold regular files only")


def sha256_file(path: Path, expected_size: int | None = None) -> str:
    """Hex SHA-256 of a regular file, read in chunks without following a link; ``expected_size``: refuse a file
    that is not that size (it changed since it was listed) before hashing past it."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ModelError(f"{path}: cannot open ({e.strerror or e})", hint="check the file") from None
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or (expected_size is not None and st.st_size != expected_size):
            raise ModelError(f"{path}: changed while it was being read", hint="wait until the copy is complete")
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
