"""`stop` on a board where system_powerdown reaches no guest (boards.cannot(board)["powerdown"])
says so and goes on to QMP quit at once, instead of waiting out the ACPI timeout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vmlab import BOOT_TIMEOUT, BOOTED, jq, ok, row, vmroot  # noqa: F401

from qlaunch.vm.api import VM

pytestmark = pytest.mark.boot


def test_malta_stop_skips_the_power_button(vmroot: Path) -> None:  # noqa: F811
    ok("start", "mips64el-malta", "--name", "malta")
    VM.get("malta").wait_console(BOOTED, BOOT_TIMEOUT)
    r = ok("stop", "malta", "--json")
    steps = [(s["action"], s["result"]) for s in json.loads(r.stdout)["steps"]]
    # No agent step: the guest init runs no qemu-ga, so none answers.
    assert steps == [
        (
            "acpi powerdown",
            "skipped: malta has no way to ask the guest to power off (system_powerdown "
            "does nothing there)",
        ),
        ("qmp quit", "QEMU quit"),
    ], steps
    assert "qlaunch: malta: acpi powerdown: skipped: malta has no way" in r.stderr
    assert jq("status", "malta")["exits"][-1]["reason"] == "host-qmp-quit"
    assert row("malta")["state"] == "stopped"
    assert "stop: acpi powerdown: skipped" in ok("log", "malta", "--lifecycle").stdout


def test_a_board_with_a_button_still_gets_it_pressed(vmroot: Path) -> None:  # noqa: F811
    # arm virt: the GPIO power key, which the guest init answers by powering off.
    ok("start", "arm-virt", "--name", "virt")
    VM.get("virt").wait_console(BOOTED, BOOT_TIMEOUT)
    r = ok("stop", "virt", "--json")
    steps = [(s["action"], s["result"]) for s in json.loads(r.stdout)["steps"]]
    assert steps == [("acpi powerdown", "the guest powered off")], steps
