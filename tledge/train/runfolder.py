"""The run folder: where it is, proof that tledge owns it, its log, its decoded-image cache and its text files.

tledge writes only into a folder that is new, empty, or marked as a tledge run by :data:`RUN_MARKER`
(written before any other file), and removes only the files it wrote there.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any, Optional

from tledge import __version__
from tledge.errors import ConfigError
from tledge_runtime.fileio import atomic_write
from tledge_runtime.text import printable, printable_lines

log = logging.getLogger(__name__)

# Written first into every run folder: tledge writes (and removes its cache) only in a folder that holds it.
RUN_MARKER = ".tledge-run"


def run_dir(out: Optional[str]) -> Path:
    return Path(out) if out else next_free_run_dir("exp")


def next_free_run_dir(name: str, base: Path = Path("runs")) -> Path:
    """``runs/<name>``, or ``runs/<name>2``, ``runs/<name>3``... whichever does not exist yet."""
    for i in range(1, 10_000):
        candidate = base / (name if i == 1 else f"{name}{i}")
        if not candidate.exists():
            return candidate
    raise ConfigError(f"{base} holds 10,000 runs named {name}*", hint="pass --out")


def check_owned(out: Path) -> None:
    """Refuse, before touching it, an existing non-empty ``--out`` that is not a tledge run folder."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --out exists and is not a folder", hint="choose another --out")
    if out.is_dir() and not (out / RUN_MARKER).is_file() and any(out.iterdir()):
        raise ConfigError(f"{out}: folder is not empty and is not a tledge run (no {RUN_MARKER}); "
                          "tledge writes only into folders it created",
                          hint="choose a new or empty --out folder")


def claim(out: Path, data: str) -> None:
    """Create the run folder and mark it as tledge's, before any other file goes in."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / RUN_MARKER).is_file():  # resumed runs from before the marker existed get one too
        atomic_write(out / RUN_MARKER, json.dumps({"tledge": __version__, "data": data}).encode())


def remove_cache(cache: Path) -> None:
    """Remove the memory-mapped image caches of large datasets: the ``*.u8.npy`` files imagecache wrote,
    then the folder if nothing else is in it. Never through a symbolic link, never another file."""
    if cache.is_symlink() or not cache.is_dir():
        return
    for f in cache.glob("*.u8.npy"):
        if f.is_file() and not f.is_symlink():
            f.unlink(missing_ok=True)
    try:
        cache.rmdir()
    except OSError:  # not empty: someone else's files, left alone
        pass


def write_skipped(path: Path, skipped: list[tuple[Path, str, str]]) -> None:
    """One line per skipped file, tab-separated: a newline or tab in a file name is escaped (printable), so
    the line count is the file count; a name that is not valid UTF-8 shows its bytes as \\xNN."""
    lines = "".join("\t".join(printable(v) for v in (p, kind, msg)) + "\n" for p, kind, msg in skipped)
    atomic_write(path, lines.encode("utf-8"))


def count_skipped(out: Path) -> int:
    path = out / "skipped.txt"
    if not path.is_file():
        return 0
    with path.open() as f:
        return sum(1 for _ in f)


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    if history:
        writer = csv.DictWriter(buf, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    atomic_write(path, buf.getvalue().encode())


def log_to_file(path: Path) -> None:
    """Also keep the run's log lines next to its checkpoints, until :func:`stop_logging_to_files`."""
    root = logging.getLogger("tledge")
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(_PrintableFileFormatter("%(asctime)s %(levelname)s %(message)s"))
        handler.tledge_run_log = True  # type: ignore[attr-defined]  # what stop_logging_to_files removes
        root.addHandler(handler)
        root.setLevel(min(root.level or logging.INFO, logging.INFO))


def stop_logging_to_files() -> None:
    """Detach and close the run-folder log files: a run that ended writes no more lines (a later run in the same
    process, or anything else it logs, would otherwise land in every earlier run's train.log)."""
    root = logging.getLogger("tledge")
    for handler in [h for h in root.handlers if getattr(h, "tledge_run_log", False)]:
        root.removeHandler(handler)
        handler.close()


class _PrintableFileFormatter(logging.Formatter):
    """train.log lines name classes and files: their control characters are escaped like on the terminal."""

    def format(self, record: logging.LogRecord) -> str:
        return printable_lines(super().format(record))
