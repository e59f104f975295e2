"""[resources] and --runas on a real VM: QEMU in its own cgroups with the limits asked for, on
the CPUs asked for, its RAM from hugepages, running as `nobody` under -sandbox; and the clear
refusals where the host cannot give what a profile asks."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmlab import BOOT_TIMEOUT, BOOTED, jq, ok, ql, row, vmroot  # noqa: F401

from qlaunch.vm.api import VM

pytestmark = pytest.mark.boot

PAGES = 64  # 128M of guest RAM in 2M pages
NR = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
FREE = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")


@pytest.fixture
def hugetlbfs() -> Iterator[Path]:
    """A hugetlbfs mount of the test's own and PAGES more 2M pages, both undone after."""
    if os.geteuid() != 0:
        pytest.skip("needs root: it mounts hugetlbfs and reserves hugepages")
    before = int(NR.read_text())
    mnt = Path(tempfile.mkdtemp(prefix="qlhuge-"))
    subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", str(mnt)], check=True)
    try:
        NR.write_text(str(before + PAGES))
        if int(FREE.read_text()) < PAGES:
            pytest.skip(f"the host could not reserve {PAGES} hugepages of 2M")
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        mnt.rmdir()
        NR.write_text(str(before))


def cgroup_dirs(pid: int) -> dict[str, Path]:
    """/proc/PID/cgroup as directories under the v1 mounts (this host's layout)."""
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctls, path = line.split(":", 2)
        for c in ctls.split(","):
            if c in ("cpu", "memory"):
                out[c] = Path(f"/sys/fs/cgroup/{c}{path}")
    return out


def test_refusals_leave_nothing(vmroot: Path) -> None:  # noqa: F811
    r = ql("start", "default", "--name", "res", "--runas", "no-such-user-here")
    assert r.returncode == 2 and "there is no user 'no-such-user-here'" in r.stderr
    r = ql("start", "default", "--name", "res", "--set", "resources.cpu_affinity=[999]")
    assert r.returncode == 3 and "CPU 999 is not one qlaunch may use" in r.stderr
    r = ql("start", "default", "--name", "res", "--set", "resources.memory_limit=100M")
    assert r.returncode == 2 and "does not even hold the guest's 256M" in r.stderr
    r = ql("start", "default", "--name", "res", "--set", "resources.cpu_limit=0")
    assert r.returncode == 2 and "cpu_limit" in r.stderr
    ksm = Path("/sys/kernel/mm/ksm/run")
    if ksm.exists() and ksm.read_text().strip() != "1":
        r = ql("start", "default", "--name", "res", "--set", "resources.mem_merge=true")
        assert r.returncode == 3 and "KSM is not running on this host" in r.stderr
    need = int(FREE.read_text()) + 32
    r = ql(
        "start", "default", "--name", "res", "--set", "resources.hugepages=true",
        "--set", f"machine.memory={need * 2}M",
    )  # fmt: skip
    assert r.returncode == 3 and "hugepages" in r.stderr
    assert f"needs {need} hugepages" in r.stderr or "no hugetlbfs is mounted" in r.stderr
    assert [p.name for p in vmroot.iterdir() if not p.name.startswith(".")] == []


def test_limits_affinity_hugepages_runas_sandbox(vmroot: Path, hugetlbfs: Path) -> None:  # noqa: F811
    cpu = max(os.sched_getaffinity(0))
    free_before = int(FREE.read_text())
    r = ok(
        "start", "default", "--name", "res", "--runas", "nobody",
        "--set", "machine.memory=128M",
        "--set", f"resources.cpu_affinity=[{cpu}]",
        "--set", "resources.cpu_limit=50",
        "--set", "resources.memory_limit=512M",
        "--set", "resources.hugepages=true",
    )  # fmt: skip
    assert r.stdout.strip() == "res"
    vm = VM.get("res")
    vm.console.expect(BOOTED, BOOT_TIMEOUT)
    info = row("res")
    pid = info["pid"]

    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    sandbox = argv[argv.index(b"-sandbox") + 1].decode()
    assert sandbox.startswith("on,") and "elevateprivileges=allow" in sandbox
    assert "spawn=deny" in sandbox and argv[argv.index(b"-runas") + 1] == b"nobody"
    uids = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split("\n")[0].split()
    assert {int(u) for u in uids} == {pwd.getpwnam("nobody").pw_uid}

    dirs = cgroup_dirs(pid)
    for c in ("cpu", "memory"):
        assert dirs[c].name == "res" and dirs[c].parent.name == "qlaunch", dirs
    assert (dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "50000"
    assert (dirs["memory"] / "memory.limit_in_bytes").read_text().strip() == str(512 << 20)
    # The supervisor only passed through: it is back where it was, and so not limited.
    sup = jq("status", "res")["supervisor"]["pid"]
    assert all("qlaunch" not in str(p) for p in cgroup_dirs(sup).values())
    for task in Path(f"/proc/{pid}/task").iterdir():
        allowed = (task / "status").read_text().split("Cpus_allowed_list:")[1].split()[0]
        assert allowed == str(cpu), task.name
    assert free_before - int(FREE.read_text()) >= PAGES

    assert vm.qmp("query-status")["status"] == "running"
    vm.console.sendline("echo sandboxed-$((40 + 2))")
    vm.console.expect(r"sandboxed-42")
    vm.close()
    ok("stop", "res")
    assert not dirs["cpu"].exists() and not dirs["memory"].exists()
    assert int(FREE.read_text()) == free_before
    shutil.rmtree(vmroot / "res", ignore_errors=True)
