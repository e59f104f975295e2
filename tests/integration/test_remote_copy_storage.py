"""`qlaunch migrate --copy-storage` between two sshlab hosts whose image directories are their
own (the same path, other files): a migration whose destination QEMU is killed halfway leaves
the VM running on the source and nothing on the destination (no VM, no data, no disk); the
next one moves the disk with the guest, and `qemu-img compare` finds the copy equal to the
source's disk as it was at the switch-over (a known pattern written before, checked after,
also by the guest). One VM for the module."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sshlab import COUNTER, TICK, Host, Lab, close_masters, error_line, nothing_of, ql
from vmlab import BOOT_TIMEOUT, BOOTED, QLAUNCH, wait_until

from qlaunch.vm import state
from qlaunch.vm.api import VM

pytestmark = pytest.mark.boot

SUM = re.compile(rb"\nsum-([0-9a-f]{32})")
# 8 MiB of random data on the disk, then its checksum as the guest reads it.
PATTERN = (
    "dd if=/dev/urandom of=/dev/vda bs=1M count=8 conv=fsync 2>/dev/null; "
    "md5sum /dev/vda | sed 's/^/sum-/; s/ .*//'"
)


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[Lab, Host, Host]]:
    local = Path(tempfile.mkdtemp(prefix="qlvm-", dir="/tmp"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLAUNCH_STATE", str(local))
        try:
            with Lab() as lab:
                a = lab.host("a", binds={"images": "a-images"})
                b = lab.host("b", binds={"images": "b-images"})
                lab.link(a, b)
                yield lab, a, b
        finally:
            close_masters(local)
            shutil.rmtree(local, ignore_errors=True)


@pytest.fixture(scope="module")
def guest(hosts: tuple[Lab, Host, Host]) -> tuple[VM, str]:
    """VM copy on host a, with a disk in a's own image directory holding a known pattern (and
    its checksum), 32 MiB of random data in guest RAM (so that a capped stream takes a while),
    and a counter running."""
    lab, a, _ = hosts
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(lab.root / "a-images" / "d.qcow2"), "64M"],
        check=True,
    )
    disk = lab.root / "images" / "d.qcow2"  # a's and b's own, at the same path
    r = ql("--connect", a.uri, "start", "default", "--name", "copy", "--set", f"disk.0.path={disk}")
    assert r.returncode == 0, r.stderr
    vm = VM("copy", a.state)
    vm.console.expect(BOOTED, BOOT_TIMEOUT)
    vm.console.sendline(PATTERN)
    want = vm.console.expect(SUM, 120).group(1).decode()
    vm.console.sendline("head -c 32M /dev/urandom > /tmp/fill; echo filled-up")
    vm.console.expect(rb"\nfilled-up", 120)
    vm.console.sendline(COUNTER)
    vm.console.expect(rb"tick-2-end\r?\n", 60)
    vm.close()
    return vm, want


def test_without_copy_storage_a_disk_that_is_not_there_is_refused(
    hosts: tuple[Lab, Host, Host], guest: tuple[VM, str]
) -> None:
    lab, a, b = hosts
    r = ql("--connect", a.uri, "migrate", "copy", b.uri_from(a))
    line = error_line(r)
    assert r.returncode == 5 and "is not there" in line and "--copy-storage" in line
    nothing_of(b, "copy")
    assert not any((lab.root / "b-images").iterdir())
    assert guest[0].live().state == "running"


def test_destination_killed_halfway_leaves_it_running_here(
    hosts: tuple[Lab, Host, Host], guest: tuple[VM, str]
) -> None:
    lab, a, b = hosts
    vm, _ = guest
    proc = subprocess.Popen(
        [*QLAUNCH, "--connect", a.uri, "migrate", "copy", b.uri_from(a), "--copy-storage"]
        + ["--bandwidth", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The destination has started and takes the stream: then its QEMU dies.
        wait_until(lambda: (b.state / "copy" / "migrate.sock").exists(), 120, "the destination")
        time.sleep(3)
        rec = state.read_record(b.state / "copy")
        assert rec.qemu is not None
        os.kill(rec.qemu.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 4, err
    line = error_line(subprocess.CompletedProcess([], 4, out, err))
    print(f"killed halfway: {err}")
    assert "migration of copy to" in line and "copy runs on here as before" in line
    # Nothing there: no VM, no data, not the disk it made.
    nothing_of(b, "copy")
    assert not (lab.root / "b-images" / "d.qcow2").exists()
    # Here the guest goes on.
    assert json.loads(ql("--connect", a.uri, "status", "copy", "--json").stdout)["state"] == (
        "running"
    )
    last = max(int(n) for n in TICK.findall(vm.console.text().encode()))
    vm.console.expect(rf"tick-{last + 2}-end\r?\n".encode(), 60)
    vm.close()


def test_copy_storage_moves_the_disk_with_the_guest(
    hosts: tuple[Lab, Host, Host], guest: tuple[VM, str]
) -> None:
    lab, a, b = hosts
    vm, want = guest
    r = ql("--connect", a.uri, "migrate", "copy", b.uri_from(a), "--copy-storage", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["copy_storage"] is True and report["disk_bytes"] == 64 << 20
    print(f"copy storage: {report}")
    nothing_of(a, "copy")
    # The source's disk is as it was at the switch-over (its QEMU has quit); the copy equals it.
    src, dst = lab.root / "a-images" / "d.qcow2", lab.root / "b-images" / "d.qcow2"
    cmp = subprocess.run(["qemu-img", "compare", "-U", str(src), str(dst)], capture_output=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    there = VM("copy", b.state)
    there.console.expect(TICK, 60)
    there.console.sendline("md5sum /dev/vda | sed 's/^/sum-/; s/ .*//'")
    assert there.console.expect(SUM, 120).group(1).decode() == want
    there.close()
    assert json.loads(ql("--connect", b.uri, "status", "copy", "--json").stdout)["state"] == (
        "running"
    )
