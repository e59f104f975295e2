"""`qlaunch migrate` between two hosts of an sshlab (network namespaces, each with its own sshd
and qlaunch state), on shared storage: a counter in the guest goes on across the move, the
VM's record (uuid, restart policy) goes along, and refusals leave the VM running with nothing
on the destination. One VM for the module; --copy-storage is test_remote_copy_storage."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sshlab import COUNTER, TICK, Host, Lab, close_masters, error_line, nothing_of, ql
from vmlab import BOOT_TIMEOUT, BOOTED

from qlaunch.vm.api import VM

pytestmark = pytest.mark.boot


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[Lab, Host, Host]]:
    local = Path(tempfile.mkdtemp(prefix="qlvm-", dir="/tmp"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLAUNCH_STATE", str(local))
        try:
            with Lab() as lab:
                a, b = lab.host("a"), lab.host("b")
                lab.link(a, b)
                yield lab, a, b
        finally:
            close_masters(local)
            shutil.rmtree(local, ignore_errors=True)


@pytest.fixture(scope="module")
def mover(hosts: tuple[Lab, Host, Host]) -> VM:
    """VM mover on host a, its disk on storage both hosts share, a counter running."""
    lab, a, _ = hosts
    disk = lab.root / "shared" / "mover.qcow2"
    disk.parent.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    r = ql(
        "--connect", a.uri, "start", "default", "--name", "mover", "--restart", "on-failure",
        "--set", f"disk.0.path={disk}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    vm = VM("mover", a.state)
    vm.console.expect(BOOTED, BOOT_TIMEOUT)
    vm.console.sendline(COUNTER)
    vm.console.expect(rb"tick-3-end\r?\n", 60)
    vm.close()
    return vm


def test_refusals_leave_it_running_and_nothing_there(
    hosts: tuple[Lab, Host, Host], mover: VM
) -> None:
    _, a, b = hosts
    r = ql("--connect", a.uri, "migrate", "nosuch", b.uri_from(a))
    assert r.returncode == 5 and "no VM named nosuch" in error_line(r)
    r = ql("--connect", a.uri, "migrate", "mover", "http://elsewhere")
    assert r.returncode == 2
    # --copy-storage never writes over a file: on shared storage the disk is there already.
    r = ql("--connect", a.uri, "migrate", "mover", b.uri_from(a), "--copy-storage")
    line = error_line(r)
    assert r.returncode == 5 and "exists there already" in line, r.stderr
    assert "mover runs on here as before" in line
    # ...and a host without qlaunch refuses before anything starts.
    r = ql("--connect", a.uri, "migrate", "mover", b.uri_at(b.peers["a"], command="/nope"))
    assert r.returncode == 3 and "has no qlaunch" in error_line(r)
    nothing_of(b, "mover")
    assert mover.live().state == "running"


def test_live_migration_keeps_the_guest_going(hosts: tuple[Lab, Host, Host], mover: VM) -> None:
    _, a, b = hosts
    rec = mover.record()
    last = max(int(n) for n in TICK.findall(mover.console.text().encode()))
    r = ql("--connect", a.uri, "migrate", "mover", b.uri_from(a), "--json", "--max-downtime", "300")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["name"] == "mover" and report["copy_storage"] is False
    assert report["ram_bytes"] > 0 and report["downtime_ms"] > 0 and report["seconds"] > 0
    print(f"shared storage: {report}")
    # Gone from a, record and all; running on b under its own uuid and restart policy.
    assert json.loads(ql("--connect", a.uri, "list", "--json").stdout) == []
    nothing_of(a, "mover")
    there = VM("mover", b.state)
    st = json.loads(ql("--connect", b.uri, "status", "mover", "--json").stdout)
    assert st["state"] == "running" and st["qmp"]["status"] == "running"
    assert st["uuid"] == rec.uuid and st["restart_policy"] == "on-failure"
    assert "-incoming" not in json.loads((b.state / "mover" / "argv.json").read_text())
    # The counter goes on from where it was, in the same guest.
    m = there.console.expect(TICK, 60)
    assert int(m.group(1)) > last
    there.console.expect(rf"tick-{int(m.group(1)) + 2}-end\r?\n".encode(), 60)
    there.console.sendline("cat /proc/uptime")
    there.close()
