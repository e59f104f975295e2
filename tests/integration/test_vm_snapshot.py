"""Internal snapshots of a VM on a qcow2 data disk: a revert brings back what the guest had
written before the snapshot (raw blocks, read past the guest's page cache)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_vm_hotplug import guest
from vmlab import BOOT_TIMEOUT, BOOTED, ok, ql, vmroot  # noqa: F401

from qlaunch.vm.api import VM

pytestmark = pytest.mark.boot

WRITE = "echo {} | dd of=/dev/vda bs=512 count=1 conv=sync oflag=direct 2>/dev/null"
READ = "dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -c 12; echo"


def test_snapshot_create_list_revert_delete(vmroot: Path) -> None:  # noqa: F811
    disk = vmroot / "data.qcow2"
    ok(
        "start", "default", "--name", "snap",
        "--set", f"disk.0.path={disk}", "--set", "disk.0.size=16M",
    )  # fmt: skip
    vm = VM.get("snap")
    vm.console.expect(BOOTED, BOOT_TIMEOUT)
    guest(vm, WRITE.format("FIRST-WRITE"))
    assert guest(vm, READ).strip() == "FIRST-WRITE"

    r = ok("snapshot", "snap", "create", "before")
    assert "created snapshot before (disk0)" in r.stderr
    guest(vm, WRITE.format("LATER-WRITE"))
    assert guest(vm, READ).strip() == "LATER-WRITE"
    guest(vm, "echo after-snapshot > /tmp/ram-file")

    listed = json.loads(ok("snapshot", "snap", "list", "--json").stdout)
    assert [s["tag"] for s in listed] == ["before"]
    assert listed[0]["disks"] == ["disk0"] and listed[0]["vm_state_size"] > 0
    table = ok("snapshot", "snap", "list").stdout.splitlines()
    assert table[0].split()[:2] == ["TAG", "DATE"] and table[1].startswith("before ")
    r = ql("snapshot", "snap", "create", "before")
    assert r.returncode == 2 and "already has a snapshot 'before'" in r.stderr

    ok("snapshot", "snap", "revert", "before")
    assert vm.qmp("query-status")["status"] == "running"
    # The disk is back, and so is the guest's memory: the RAM file written later is gone.
    assert guest(vm, READ).strip() == "FIRST-WRITE"
    assert guest(vm, "cat /tmp/ram-file 2>&1").strip().endswith("No such file or directory")

    r = ql("snapshot", "snap", "revert", "nope")
    assert r.returncode == 2 and "no snapshot 'nope'" in r.stderr and "before" in r.stderr
    ok("snapshot", "snap", "delete", "before")
    assert json.loads(ok("snapshot", "snap", "list", "--json").stdout) == []
    vm.close()
    ok("stop", "snap", "--force")
    r = ql("snapshot", "snap", "list")
    assert r.returncode == 5 and "not running" in r.stderr
