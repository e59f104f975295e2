"""[resources] and --runas on a real VM: QEMU in its own cgroups with the limits asked for, in
the cgroup layout this host really has, on the CPUs asked for, running as `nobody` under
-sandbox; its RAM from hugepages (a test of its own: hosts that cannot reserve them skip only
that); and the clear refusals where the host cannot give what a profile asks."""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmlab import BOOT_TIMEOUT, BOOTED, jq, ok, ql, row, vmroot  # noqa: F401

from qlaunch.vm import resources, state
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


def host_cgroups(pid: int) -> dict[str, tuple[int, Path]]:
    """Where pid's cgroup is for the cpu and memory controllers, read from the layout the host
    really has (mountinfo and /proc/PID/cgroup), not from qlaunch's own reading of it:
    {controller: (cgroup version, directory)}. v1 where a v1 hierarchy has the controller
    (hybrid hosts), else v2 where the cgroup offers it (cgroup.controllers)."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        f, p = pre.split(), post.split()
        if p[0] in ("cgroup", "cgroup2"):
            mounts.append((p[0], f[3], f[4], set(p[2].split(","))))

    def where(fstype: str, ctls: set[str], path: str) -> Path | None:
        for typ, mroot, point, opts in mounts:
            if typ == fstype and (fstype == "cgroup2" or ctls & opts):
                return Path(point) / os.path.relpath(path, mroot)
        return None

    out: dict[str, tuple[int, Path]] = {}
    v2: Path | None = None
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctls, path = line.split(":", 2)
        if not ctls:
            v2 = where("cgroup2", set(), path)
            continue
        d = where("cgroup", set(ctls.split(",")), path)
        for c in ("cpu", "memory"):
            if d is not None and c in ctls.split(","):
                out[c] = (1, d)
    if v2 is not None:
        offered = (v2 / "cgroup.controllers").read_text().split()
        for c in ("cpu", "memory"):
            if c not in out and c in offered:
                out[c] = (2, v2)
    return out


LIMIT_FILES = {  # (controller, version) -> (file, value for cpu_limit=50, memory_limit=512M)
    ("cpu", 1): ("cpu.cfs_quota_us", "50000"),
    ("cpu", 2): ("cpu.max", "50000 100000"),
    ("memory", 1): ("memory.limit_in_bytes", str(512 << 20)),
    ("memory", 2): ("memory.max", str(512 << 20)),
}


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


def test_limits_affinity_runas_sandbox(vmroot: Path) -> None:  # noqa: F811
    """cpu_limit and memory_limit where this host's cgroup layout has them (v1 on hybrid hosts,
    v2 on a stock Debian 12; a controller it lacks is a clear refusal), on the CPU asked for,
    as `nobody` under -sandbox."""
    have = host_cgroups(os.getpid())
    limit_sets = {"cpu": "resources.cpu_limit=50", "memory": "resources.memory_limit=512M"}
    for c in sorted(set(limit_sets) - set(have)):
        r = ql("start", "default", "--name", "res", "--set", limit_sets[c])
        assert r.returncode == 3 and f"no cgroup {c} controller" in r.stderr, r.stderr
    cpu = max(os.sched_getaffinity(0))
    sets = ["--set", f"resources.cpu_affinity=[{cpu}]"]
    for c in sorted(have):
        sets += ["--set", limit_sets[c]]
    r = ok("start", "default", "--name", "res", "--runas", "nobody", *sets)
    assert r.stdout.strip() == "res"
    vm = VM.get("res")
    vm.console.expect(BOOTED, BOOT_TIMEOUT)
    pid = row("res")["pid"]

    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    sandbox = argv[argv.index(b"-sandbox") + 1].decode()
    assert sandbox.startswith("on,") and "elevateprivileges=allow" in sandbox
    assert "spawn=deny" in sandbox and argv[argv.index(b"-runas") + 1] == b"nobody"
    uids = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split("\n")[0].split()
    assert {int(u) for u in uids} == {pwd.getpwnam("nobody").pw_uid}

    # QEMU is in the VM's own cgroup of each hierarchy, with the limits written there.
    placed = host_cgroups(pid)
    assert set(placed) == set(have), (placed, have)
    for c, (version, d) in placed.items():
        assert d.name == "res" and d.parent.name == "qlaunch", placed
        f, value = LIMIT_FILES[(c, version)]
        assert (d / f).read_text().strip() == value, d / f
    # The supervisor only passed through: it is back where it was, and so not limited.
    sup = jq("status", "res")["supervisor"]["pid"]
    assert host_cgroups(sup) == have
    for task in Path(f"/proc/{pid}/task").iterdir():
        allowed = (task / "status").read_text().split("Cpus_allowed_list:")[1].split()[0]
        assert allowed == str(cpu), task.name

    assert vm.qmp("query-status")["status"] == "running"
    vm.console.sendline("echo sandboxed-$((40 + 2))")
    vm.console.expect(r"sandboxed-42")
    vm.close()
    ok("stop", "res")
    assert all(not d.exists() for _, d in placed.values())
    shutil.rmtree(vmroot / "res", ignore_errors=True)


def test_hugepages_back_guest_ram(vmroot: Path, hugetlbfs: Path) -> None:  # noqa: F811
    free_before = int(FREE.read_text())
    sets = ["--set", "machine.memory=128M", "--set", "resources.hugepages=true"]
    ok("start", "default", "--name", "huge", "--paused", *sets)
    pid = row("huge")["pid"]
    argv = " ".join(state.read_cmdline(pid))
    assert f"mem-path={hugetlbfs}," in argv, argv
    # Preallocated at start: the pages are taken before the guest runs at all.
    assert free_before - int(FREE.read_text()) >= PAGES
    ok("stop", "huge", "--force")
    assert int(FREE.read_text()) == free_before


def test_cgroup_v2_delegation_on_the_real_kernel() -> None:
    """On the host's real cgroup2 hierarchy, from a cgroup that holds a process (as qlaunch's
    own does): the kernel refuses to give controllers below it (EBUSY), and qlaunch's VM cgroup
    gets the controller anyway, beside it. Any controller will do: hybrid hosts offer few on
    v2 (hugetlb here), a stock Debian 12 offers cpu and memory."""
    if os.geteuid() != 0:
        pytest.skip("needs root: it makes cgroups")
    mounts = [
        m
        for m in resources.parse_mountinfo(Path("/proc/self/mountinfo").read_text())
        if m.fstype == "cgroup2" and m.root == "/"
    ]
    if not mounts:
        pytest.skip("no cgroup2 hierarchy is mounted")
    top = Path(mounts[0].point)
    offered = (top / "cgroup.controllers").read_text().split()
    ctl = next((c for c in ("memory", "cpu", "pids", "hugetlb") if c in offered), None)
    if ctl is None:
        pytest.skip(f"the cgroup2 hierarchy at {top} offers no controller")
    enabled = ctl in (top / "cgroup.subtree_control").read_text().split()
    base = top / f"qltest-{uuid.uuid4().hex[:8]}"
    own = base / "runner"
    sleeper = None
    created: list[str] = []
    try:
        if not enabled:
            (top / "cgroup.subtree_control").write_text(f"+{ctl}")
        base.mkdir()
        (base / "cgroup.subtree_control").write_text(f"+{ctl}")
        own.mkdir()
        sleeper = subprocess.Popen(["sleep", "300"])
        (own / "cgroup.procs").write_text(str(sleeper.pid))
        with pytest.raises(OSError) as e:
            (own / "cgroup.subtree_control").write_text(f"+{ctl}")
        assert e.value.errno == errno.EBUSY

        h = resources.find_hierarchy(ctl, mounts, {"": "/" + str(own.relative_to(top))})
        assert h is not None and h.version == 2
        cgroups = resources._make_cgroups("vm1", {ctl: h}, [], created, Path("/"))
        vm = base / "qlaunch" / "vm1"
        assert cgroups == [{"controller": ctl, "dir": str(vm), "home": str(own)}]
        assert ctl in (vm / "cgroup.controllers").read_text().split()
        (vm / "cgroup.procs").write_text(str(sleeper.pid))  # a leaf QEMU can be placed in
        assert (vm / "cgroup.procs").read_text().split() == [str(sleeper.pid)]
        (own / "cgroup.procs").write_text(str(sleeper.pid))
        resources.release(created)
        assert not (base / "qlaunch").exists()
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
        resources.release(created)
        for d in (own, base):
            with contextlib.suppress(FileNotFoundError):
                d.rmdir()
        if not enabled:
            with contextlib.suppress(OSError):
                (top / "cgroup.subtree_control").write_text(f"-{ctl}")
