"""Kill a command at a chosen moment: the one helper behind the SIGKILL tests and benchmarks/interruptions.py."""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Optional


def run_and_kill(cmd: list[str], after_s: float, env: dict) -> Optional[int]:
    """Start ``cmd``, SIGKILL it ``after_s`` seconds later; None when it was killed, else its exit code
    (it finished first)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(after_s)
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return None
