"""Hotplug on a running q35 VM, as the guest sees it: a disk and a NIC plugged in and out, a
QEMU restart that brings them back, and the refusals of internal snapshots without qcow2."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
from vmlab import BOOT_TIMEOUT, BOOTED, jq, ok, ql, row, vmroot, wait_until  # noqa: F401

from qlaunch.storage import image
from qlaunch.vm.api import VM

pytestmark = pytest.mark.boot


def guest(vm: VM, command: str, timeout: float = 60.0) -> str:
    """Run a shell command on the VM's console; its output (between two markers)."""
    n = os.urandom(3).hex()
    vm.console.sendline(f"echo BEGIN-{n}; {command}; echo END-{n}")
    m = vm.console.expect(rf"(?s)\nBEGIN-{n}\r?\n(.*?)END-{n}".encode(), timeout)
    return m.group(1).decode(errors="replace").replace("\r", "")


def test_disk_and_nic_hotplug(vmroot: Path) -> None:  # noqa: F811
    data = vmroot / "data.img"
    data.write_bytes(b"HOTPLUGGED-DISK-CONTENT".ljust(1 << 20, b"\0"))
    qcow = vmroot / "more.qcow2"
    image.create(str(qcow), 16 << 20, fmt="qcow2")

    ok("start", "default", "--name", "hot", "--restart", "on-failure")
    vm = VM.get("hot")
    vm.console.expect(BOOTED, BOOT_TIMEOUT)
    assert guest(vm, "ls /sys/block").split() == []
    assert guest(vm, "ls /sys/class/net").split() == ["lo"]

    # Without a qcow2 disk there is nothing to hold an internal snapshot.
    r = ql("snapshot", "hot", "create", "s1")
    assert r.returncode == 2 and "no writable qcow2 disk" in r.stderr

    assert ok("attach-disk", "hot", str(data), "--readonly").stdout.strip() == "hpdisk1"
    assert ok("attach-nic", "hot").stdout.strip() == "hpnet1"
    wait_until(lambda: "vda" in guest(vm, "ls /sys/block"), 60, "the guest to see vda")
    assert "HOTPLUGGED-DISK-CONTENT" in guest(vm, "head -c 23 /dev/vda; echo")
    wait_until(lambda: "eth0" in guest(vm, "ls /sys/class/net"), 60, "the guest to see eth0")

    st = jq("status", "hot")
    devs = {d["id"]: d for d in st["hotplug"]}
    assert devs["hpdisk1"]["path"] == str(data) and devs["hpdisk1"]["readonly"] is True
    assert devs["hpnet1"]["mode"] == "user" and devs["hpnet1"]["mac"].startswith("52:54:00:")
    assert guest(vm, "cat /sys/class/net/eth0/address").strip() == devs["hpnet1"]["mac"]
    text = ok("status", "hot").stdout
    assert f"hpdisk1: disk {data}" in text and "hpnet1: nic user NIC" in text

    # The same image twice, a missing one, a raw writable disk under a snapshot: refused.
    r = ql("attach-disk", "hot", str(data))
    assert r.returncode == 2 and "already attached" in r.stderr
    r = ql("attach-disk", "hot", str(vmroot / "nope.img"))
    assert r.returncode == 2 and "nope.img does not exist" in r.stderr
    assert ok("attach-disk", "hot", str(qcow)).stdout.strip() == "hpdisk2"
    raw2 = vmroot / "raw2.img"
    raw2.write_bytes(b"\0" * (1 << 20))
    assert ok("attach-disk", "hot", str(raw2)).stdout.strip() == "hpdisk3"
    r = ql("snapshot", "hot", "create", "s1")
    assert r.returncode == 2 and "raw" in r.stderr and "qcow2" in r.stderr
    ok("detach-disk", "hot", "hpdisk3")
    # q35 gets four hotplug ports, all taken now: a fifth device is refused with a reason.
    ok("attach-disk", "hot", str(raw2))
    r = ql("attach-nic", "hot")
    assert r.returncode == 2 and "hotplug ports are taken" in r.stderr
    ok("detach-disk", "hot", "hpdisk3")
    ok("detach-disk", "hot", "hpdisk2")

    # A restart of QEMU (here a crash) comes back with the hotplugged devices.
    first = row("hot")["pid"]
    vm.close()  # the console connection ends with this QEMU
    os.kill(first, signal.SIGKILL)
    wait_until(
        lambda: row("hot")["restarts"] == 1 and row("hot")["state"] == "running", 60, "restart"
    )
    vm.console.expect(BOOTED, BOOT_TIMEOUT)
    assert "HOTPLUGGED-DISK-CONTENT" in guest(vm, "head -c 23 /dev/vda; echo")
    assert "eth0" in guest(vm, "ls /sys/class/net")

    ok("detach-disk", "hot", "hpdisk1")
    ok("detach-nic", "hot", "hpnet1")
    wait_until(lambda: guest(vm, "ls /sys/block").split() == [], 30, "vda to go")
    assert guest(vm, "ls /sys/class/net").split() == ["lo"]
    assert jq("status", "hot")["hotplug"] == []
    argv = json.loads((vmroot / "hot" / "argv.json").read_text())
    assert not any(re.search(r"hpdisk|hpnet", a) for a in argv)
    r = ql("detach-nic", "hot", "hpnet1")
    assert r.returncode == 2 and "no hotplugged nic 'hpnet1'" in r.stderr
    vm.close()
    ok("stop", "hot", "--force")
