"""Kill a command at a chosen moment: the helpers behind the SIGKILL tests and benchmarks/interruptions.py."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional


def run_and_kill(cmd: list[str], after_s: float, env: dict) -> Optional[int]:
    """Start ``cmd``, SIGKILL it ``after_s`` seconds later; None when it was killed, else its exit code
    (it finished first)."""
    return run_and_kill_when(cmd, lambda: True, after_s, env)


def run_and_kill_when(cmd: list[str], event: Callable[[], bool], after_s: float, env: dict,
                      give_up_s: float = 600.0) -> Optional[int]:
    """Start ``cmd``; once ``event()`` is true, wait ``after_s`` more seconds and SIGKILL it. None when it
    was killed, else its exit code (it finished first).

    Waiting for an event the process causes (a checkpoint appearing) rather than for a guessed time makes
    a kill land in the phase a test wants on a fast machine and on an overloaded one alike.
    """
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = time.monotonic()
        while not event():
            if proc.poll() is not None:
                return proc.returncode
            if time.monotonic() - started > give_up_s:
                raise TimeoutError(f"{cmd[:4]}: the awaited event did not happen within {give_up_s:.0f} s")
            time.sleep(0.01)
        time.sleep(after_s)
        if proc.poll() is not None:
            return proc.returncode
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def file_version(path: Path) -> Optional[tuple[int, int]]:
    """What identifies one write of ``path`` (inode and mtime; an atomic replace changes both), or None."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def rewritten(path: Path) -> Callable[[], bool]:
    """An event: ``path`` now exists in a version it was not in when this was called."""
    before = file_version(path)
    return lambda: file_version(path) not in (None, before)
