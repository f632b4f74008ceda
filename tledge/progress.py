"""The one progress helper: tqdm bars on a terminal, a plain line every few seconds in logs and CI.

Core code wraps long loops in :func:`progress` and calls ``set_postfix`` with its
numbers; it never prints. Set ``TLEDGE_PROGRESS=0`` to silence progress entirely.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, Optional


def _mode() -> str:
    if os.environ.get("TLEDGE_PROGRESS", "1") == "0":
        return "off"
    if os.environ.get("CI") or not sys.stderr.isatty():
        return "lines"
    return "bar"


class _LineProgress:
    """tqdm's interface, minus the carriage returns: one line per ``interval`` seconds and one at the end."""

    def __init__(self, iterable: Optional[Iterable], total: Optional[int], desc: str, unit: str,
                 interval: float = 10.0, enabled: bool = True):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n, self.interval, self.enabled = 0, interval, enabled
        self.start = self._last = time.perf_counter()
        self.postfix: dict[str, Any] = {}
        self._shown: Optional[tuple[int, str]] = None  # the last line's count and numbers: never printed twice

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "_LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self._emit()

    def set_postfix(self, ordered_dict: Optional[dict] = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if self.enabled:
            if self._shown != (self.n, self._extra()):
                self._emit()
            self.enabled = False

    def _emit(self) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total else ""
        eta = ""
        if self.total and rate > 0 and self.n < self.total:
            eta = f", ETA {(self.total - self.n) / rate:.0f}s"
        # Slower than one unit a second (an export step, a training batch on a busy CPU): seconds per unit, as tqdm
        # says it; "0.0 step/s" says nothing.
        speed = f"{1 / rate:.1f} s/{self.unit}" if 0 < rate < 1 else f"{rate:.1f} {self.unit}/s"
        extra = self._extra()
        self._shown = (self.n, extra)
        print(f"{self.desc}: {self.n}{of} {self.unit} [{elapsed:.0f}s, {speed}{eta}] {extra}".rstrip(),
              file=sys.stderr, flush=True)


    def _extra(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.postfix.items())


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
             unit: str = "it", leave: bool = True) -> Any:
    """Wrap ``iterable`` (or a manual ``update()`` counter) in the progress display suited to the terminal."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    mode = _mode()
    if mode == "bar":
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
    return _LineProgress(iterable, total, desc, unit, enabled=(mode == "lines"))
