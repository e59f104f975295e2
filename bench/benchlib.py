"""What the bench scripts share: timing a process as a whole, alternating pairs, busy loops
for a loaded host, and the environment qlaunch runs in.

Figures are medians, never minima: on a host shared with other work the fastest run says
how fast it can be, not how fast it is. Each run is also timed in CPU seconds (the process
and every child it waited for, QEMU included), which other load changes much less than the
wall time; the load average is printed beside the figures.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QLAUNCH = REPO / ".venv" / "bin" / "qlaunch"


def qlaunch_env() -> dict[str, str]:
    """The environment for qlaunch's side. Users' Pythons write bytecode caches (an installed
    qlaunch ships its .pyc files), so PYTHONDONTWRITEBYTECODE, which this machine sets for its
    tools, is dropped; the caches go to a prefix in /tmp, not into the checkout. The first
    (warm-up) run writes them."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.setdefault("PYTHONPYCACHEPREFIX", os.path.join(tempfile.gettempdir(), "qlaunch-bench-pyc"))
    return env


@dataclass
class Run:
    wall: float
    cpu: float  # user + system of the process and the children it reaped
    code: int
    stdout: bytes
    stderr: bytes


def run(argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 600) -> Run:
    t = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env
        )
        deadline = t + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.002)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Run(wall, usage.ru_utime + usage.ru_stime, proc.returncode, out.read(), err.read())


def check(r: Run, what: str, expect: bytes | None = None, code: int = 0) -> Run:
    if r.code != code or (expect is not None and expect not in r.stdout):
        sys.exit(
            f"{what} failed: exit {r.code}\n--- stdout\n{r.stdout.decode(errors='replace')[-800:]}"
            f"\n--- stderr\n{r.stderr.decode(errors='replace')[-800:]}"
        )
    return r


@dataclass
class Side:
    name: str
    go: Callable[[], Run]
    runs: list[Run] = field(default_factory=list)

    def median(self, attr: str = "wall") -> float:
        return float(statistics.median(float(getattr(r, attr)) for r in self.runs))

    def values(self, attr: str = "wall") -> str:
        return " ".join(f"{getattr(r, attr):.2f}" for r in self.runs)


def alternate(a: Side, b: Side, pairs: int, show: bool = True) -> None:
    """pairs rounds of both, the order swapped each round, so that a drift in the host's load
    falls on both alike."""
    for i in range(pairs):
        order = (a, b) if i % 2 == 0 else (b, a)
        for side in order:
            side.runs.append(side.go())
        if show:
            ra, rb = a.runs[-1], b.runs[-1]
            print(
                f"pair {i + 1}: {a.name} {ra.wall:.2f} s ({ra.cpu:.2f} cpu)   "
                f"{b.name} {rb.wall:.2f} s ({rb.cpu:.2f} cpu)   load {load()}",
                flush=True,
            )


def pair_ratios(a: Side, b: Side, attr: str = "wall") -> list[float]:
    return [getattr(y, attr) / getattr(x, attr) for x, y in zip(a.runs, b.runs, strict=True)]


def load() -> str:
    return "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def _spin() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        pass


@contextlib.contextmanager
def busy(n: int) -> Iterator[None]:
    """n busy loops (one process each) for the duration: a loaded host, made on purpose."""
    pids: list[int] = []
    try:
        for _ in range(n):
            pid = os.fork()
            if pid == 0:
                try:
                    _spin()
                finally:
                    os._exit(0)
            pids.append(pid)
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def header(what: str, busy_loops: int) -> None:
    host = f"{os.cpu_count()} CPUs, load {load()} at the start"
    extra = f", plus {busy_loops} busy loops of ours" if busy_loops else ""
    print(f"{what}: {host}{extra}", flush=True)
    print(
        "qlaunch runs with bytecode caches, as users have them (PYTHONDONTWRITEBYTECODE unset; "
        "caches in PYTHONPYCACHEPREFIX, written by the warm-up run)",
        flush=True,
    )
