"""Save and restore a running VM: a counter running in the guest goes on from where it was,
under a new name, with the guest's memory (a tmpfs file) intact; damaged files are refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from vmlab import BOOT_TIMEOUT, BOOTED, jq, ok, ql, row, vmroot  # noqa: F401

from qlaunch.vm.api import VM

pytestmark = pytest.mark.boot

# Unanchored, with an end mark: a shell prompt may precede a line, and a save may cut one.
TICK = re.compile(rb"tick-(\d+)-end\r?\n")


def ticks(vm: VM) -> list[int]:
    return [int(n) for n in TICK.findall(vm.console.text().encode())]


def test_save_then_restore_continues_the_guest(vmroot: Path) -> None:  # noqa: F811
    ok("start", "default", "--name", "src", "--restart", "on-failure")
    vm = VM.get("src")
    vm.console.expect(BOOTED, BOOT_TIMEOUT)
    vm.console.sendline("echo kept-in-ram > /tmp/marker")
    vm.console.sendline("(i=0; while :; do i=$((i+1)); echo tick-$i-end; sleep 1; done) &")
    vm.console.expect(rb"tick-3-end\r?\n", 60)
    # A hotplugged NIC is part of the machine the saved state belongs to.
    assert ok("attach-nic", "src").stdout.strip() == "hpnet1"
    vm.console.sendline("ls /sys/class/net")
    vm.console.expect(rb"eth0", 60)
    vm.close()

    saved = vmroot / "src.qlsave"
    report = json.loads(ok("save", "src", str(saved), "--json").stdout)
    assert report["was_running"] is True and report["bytes"] == saved.stat().st_size
    # The VM has ended and says where it went; its console shows the last tick it made.
    assert row("src")["state"] == "stopped"
    assert jq("status", "src")["exits"][-1]["reason"] == "host-qmp-quit"
    rec = json.loads((vmroot / "src" / "state.json").read_text())
    assert rec["saved"]["file"] == str(saved)
    last = ticks(vm)[-1]
    assert last >= 3

    # Refused: an existing file; a save that never finished; a VM that is not running.
    r = ql("save", "src", str(saved))
    assert r.returncode == 2 and "exists" in r.stderr
    r = ql("save", "src", str(vmroot / "again.qlsave"))
    assert r.returncode == 5 and "is not running" in r.stderr
    cut = vmroot / "cut.qlsave"
    cut.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    r = ql("restore", str(cut), "--name", "broken")
    assert r.returncode == 2 and "no trailer" in r.stderr
    assert "broken" not in [x["name"] for x in jq("list")]
    flipped = bytearray(saved.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    bad = vmroot / "bad.qlsave"
    bad.write_bytes(bytes(flipped))
    r = ql("restore", str(bad), "--name", "broken")
    assert r.returncode == 2 and "damaged" in r.stderr

    r = ok("restore", str(saved), "--name", "dst")
    assert r.stdout.strip() == "dst"
    assert "restored from" in r.stderr
    new = VM.get("dst")
    assert new.qmp("query-status")["status"] == "running"
    assert row("dst")["state"] == "running"
    # The loop runs on from the number after the last one it printed before the save.
    # (last + 2 when the pause caught the guest in the middle of writing last + 1)
    m = new.console.expect(TICK, 60)
    assert last < int(m.group(1)) <= last + 2
    new.console.expect(rf"tick-{int(m.group(1)) + 2}-end\r?\n".encode(), 60)
    new.console.sendline("cat /tmp/marker; ls /sys/class/net")
    new.console.expect(rb"\nkept-in-ram", 30)
    new.console.expect(rb"eth0", 30)
    new.close()
    st = jq("status", "dst")
    assert [d["id"] for d in st["hotplug"]] == ["hpnet1"]
    assert st["restart_policy"] == "on-failure" and st["restarts"] == 0
    # A later restart boots afresh instead of waiting for a migration that never comes.
    argv = json.loads((vmroot / "dst" / "argv.json").read_text())
    assert "-incoming" not in argv
    ok("stop", "dst", "--force")
