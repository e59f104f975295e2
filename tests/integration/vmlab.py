"""Helpers for the background-VM tests: a private state root, the CLI as a user runs it, and
a teardown that leaves no QEMU or supervisor behind, also when a test fails."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qlaunch.errors import QlaunchError
from qlaunch.vm import state

QLAUNCH = [str(Path(sys.executable).parent / "qlaunch")]
BOOTED = r"shell on the console"  # the qlaunch guest init's banner
BOOT_TIMEOUT = 180.0  # TCG on two shared cores: generous, never asserted on


@pytest.fixture
def vmroot(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A state root of the test's own ($QLAUNCH_STATE), short enough for socket paths."""
    d = Path(tempfile.mkdtemp(prefix="qlvm-", dir="/tmp"))
    monkeypatch.setenv("QLAUNCH_STATE", str(d))
    try:
        yield d
    finally:
        reap_all(d)
        shutil.rmtree(d, ignore_errors=True)


def reap_all(root: Path) -> None:
    """End every supervisor and QEMU recorded under root, by identity only."""
    for name in state.names(root):
        d = root / name
        try:
            rec = state.read_record(d)
        except QlaunchError:
            continue
        if rec.supervisor is not None:
            state.signal_identified(rec.supervisor, state.supervisor_marker(d), signal.SIGKILL)
        if rec.qemu is not None:
            state.signal_identified(rec.qemu, state.qemu_marker(rec.uuid), signal.SIGKILL)
            state.wait_gone(rec.qemu.pid, rec.qemu.start_ticks, 10.0)


def ql(
    *args: str, input: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`qlaunch ARGS` in a child process, as a user would run it (stdin not a terminal)."""
    return subprocess.run(
        [*QLAUNCH, *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
        env=dict(os.environ),
    )


def ok(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    r = ql(*args, **kw)
    assert r.returncode == 0, f"qlaunch {' '.join(args)} -> {r.returncode}\n{r.stderr}"
    return r


def jq(*args: str) -> Any:
    return json.loads(ok(*args, "--json").stdout)


def row(name: str) -> dict[str, Any]:
    rows = [r for r in jq("list") if r["name"] == name]
    assert len(rows) == 1, rows
    return rows[0]


def wait_until(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def alive(pid: int) -> bool:
    st = state.read_stat(pid)
    return st is not None and not st.zombie
