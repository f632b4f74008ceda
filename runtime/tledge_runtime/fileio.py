"""Atomic file writes: a reader sees the old file or the new one, never a torn one.

Every model, engine and checkpoint tledge writes goes through :func:`atomic_write`:
the bytes go to a temporary file in the same folder, are flushed to disk, and
replace the target with one ``os.replace`` (atomic on POSIX and Windows). A crash or
SIGKILL mid-write leaves at most a ``.tmp`` file behind, which the next write of the
same target removes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_open(path: PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file for binary writing; on success it atomically becomes ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would (0666 minus the
        # umask), so a model is readable by the Triton / container user that serves it.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, data: Union[bytes, Callable[[BinaryIO], None]]) -> Path:
    """Write ``data`` (bytes, or a function that writes to a file object) to ``path`` atomically."""
    with atomic_open(path) as f:
        if callable(data):
            data(f)
        else:
            f.write(data)
    return Path(path)


def cache_dir(name: str) -> Path:
    """``$TLEDGE_CACHE/<name>`` (default ``~/.cache/tledge/<name>``), created if missing: where the runtime keeps
    what is slow to make and safe to lose (TensorRT EP engines, the measured choice of ``device="auto"``)."""
    from tledge_runtime.errors import BackendError

    path = Path(os.environ.get("TLEDGE_CACHE", Path.home() / ".cache" / "tledge")) / name
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BackendError(f"cannot create the cache folder {path} ({e.strerror or e})",
                           hint="point TLEDGE_CACHE at a writable folder") from None
    return path
