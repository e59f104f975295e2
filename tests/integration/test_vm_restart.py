"""Restart policy: a killed QEMU comes back and its exit is recorded; a crash loop ends
in `failed`."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from vmlab import BOOT_TIMEOUT, BOOTED, jq, ok, row, vmroot, wait_until  # noqa: F401

from qlaunch.boot import assets
from qlaunch.vm.api import VM

pytestmark = pytest.mark.boot


def test_kill9_with_on_failure_restarts(vmroot: Path) -> None:  # noqa: F811
    ok("start", "default", "--name", "phoenix", "--restart", "on-failure")
    vm = VM.get("phoenix")
    vm.console.expect(BOOTED, BOOT_TIMEOUT)
    first = row("phoenix")["pid"]
    os.kill(first, signal.SIGKILL)  # from outside, as a crash would

    def back() -> dict[str, object] | None:
        r = row("phoenix")
        return r if r["restarts"] == 1 and r["state"] == "running" and r["pid"] else None

    again = wait_until(back, 60, "the restart")
    assert again["pid"] != first
    st = jq("status", "phoenix")
    last = st["exits"][-1]
    assert last["pid"] == first and last["signal"] == signal.SIGKILL and last["code"] is None
    assert last["describe"] == "killed by SIGKILL"
    assert "restarting in" in ok("log", "phoenix", "--lifecycle").stdout
    # The guest boots again behind the same sockets, and QMP answers there.
    vm.console.expect(BOOTED, BOOT_TIMEOUT)
    assert vm.qmp("query-status")["status"] == "running"
    # A stop is not a failure: nothing restarts after it.
    report = vm.stop(force=True)
    assert report.state == "stopped"
    assert row("phoenix")["restarts"] == 1


def test_crash_loop_ends_failed(vmroot: Path) -> None:  # noqa: F811
    kernel = vmroot / "kernel"
    shutil.copy(assets.require("x86_64").kernel, kernel)
    ok(
        "start", "default", "--name", "loop", "--paused", "--restart", "on-failure",
        "--set", f"boot.kernel={kernel}",
    )  # fmt: skip
    pid = row("loop")["pid"]
    # From now on QEMU cannot start: every restart fails at once.
    kernel.unlink()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: row("loop")["state"] == "failed", 120, "state failed")
    st = jq("status", "loop")
    assert "crash loop" in st["failed_reason"]
    assert st["restarts"] == 4 and st["pid"] is None and st["supervisor"]["alive"] is False
    assert st["exits"][0]["signal"] == signal.SIGKILL
    assert all(e["code"] == 1 for e in st["exits"][1:])
    assert "could not open kernel file" in ok("log", "loop", "--lifecycle").stdout
    # Failed is final: stop is a no-op, rm clears it.
    assert "already failed" in ok("stop", "loop").stderr
    ok("rm", "loop")
