"""QLAUNCH_TRACE=1: where `qlaunch exec`'s time goes, as time stamps on stderr.

Host times count from the start of the qlaunch process (Python's own start and imports
included, read from /proc/self/stat), so the first line already says what starting Python
cost; beside them, the CPU time qlaunch itself has used (a figure a busy host changes less).
The guest init adds its own steps (`qlaunch.trace` on the kernel command line), with the
guest's uptime beside the host time they arrived at.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "QLAUNCH_TRACE"


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def _process_start() -> float:
    """CLOCK_BOOTTIME at which this process started (clock-tick resolution, 10 ms)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.clock_gettime(time.CLOCK_BOOTTIME)


_START = _process_start() if enabled() else 0.0


def since_start() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME) - _START


def mark(event: str) -> None:
    if enabled():
        cpu = time.process_time()
        print(
            f"qlaunch: trace {since_start():7.3f} s ({cpu:.3f} s CPU)  {event}",
            file=sys.stderr,
            flush=True,
        )
