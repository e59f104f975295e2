"""The stop ladder escalates, and says so, when the guest or QEMU does not cooperate."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from vmlab import BOOT_TIMEOUT, BOOTED, alive, jq, ok, row, vmroot  # noqa: F401

from qlaunch.vm.api import VM

pytestmark = pytest.mark.boot


def test_guest_ignoring_acpi_gets_quit(vmroot: Path) -> None:  # noqa: F811
    # acpi=off: the kernel runs without ACPI, so the power button QEMU presses reaches no one.
    ok("start", "default", "--name", "deaf", "--set", "boot.append=acpi=off")
    VM.get("deaf").wait_console(BOOTED, BOOT_TIMEOUT)
    r = ok("stop", "deaf", "--timeout", "3")
    lines = [x for x in r.stderr.splitlines() if x.startswith("qlaunch: deaf: ")]
    assert lines[:2] == [
        "qlaunch: deaf: acpi powerdown: sent; the guest did not power off within 3 s",
        "qlaunch: deaf: qmp quit: QEMU quit",
    ]
    last = jq("status", "deaf")["exits"][-1]
    assert last["code"] == 0 and last["reason"] == "host-qmp-quit"
    assert row("deaf")["state"] == "stopped"
    assert "stop: acpi powerdown: sent" in ok("log", "deaf", "--lifecycle").stdout


def test_hung_qemu_is_error_then_signalled(vmroot: Path) -> None:  # noqa: F811
    # A QEMU stopped by SIGSTOP answers nothing: a live pid with a dead monitor is `error`,
    # and stop has to go all the way down the ladder.
    ok("start", "default", "--name", "hung", "--paused")
    pid = row("hung")["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        assert row("hung")["state"] == "error"
        st = jq("status", "hung")
        assert st["state"] == "error" and "QMP" in st["note"]
        r = ok("stop", "hung", "--force", "--json")
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGCONT)
    import json

    report = json.loads(r.stdout)
    assert [s["action"] for s in report["steps"]] == ["qmp quit", "SIGTERM", "SIGKILL"]
    assert "no greeting" in report["steps"][0]["result"]
    assert report["steps"][1]["result"].startswith("sent; QEMU still there")
    assert report["steps"][2]["result"] == "QEMU ended"
    assert report["exit"]["signal"] == signal.SIGKILL
    assert report["state"] == "stopped"
    assert not alive(pid)
