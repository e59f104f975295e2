"""qlaunch.vm.resources against fake host trees (mountinfo, /proc/self/cgroup, cgroup and sysfs
files under a temporary root), the [resources] profile keys, and the sandbox/runas argv."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qlaunch.config import profile as profmod
from qlaunch.errors import HostError, ProfileError, UsageError
from qlaunch.launch import argv as argvmod
from qlaunch.launch.host import HostFacts, Verdict
from qlaunch.vm import resources

HYBRID_MOUNTINFO = """\
30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpuacct
34 30 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
40 25 0:40 / /mnt/huge rw - hugetlbfs none rw,pagesize=2M
"""
HYBRID_CGROUP = "4:memory:/jobs/a1\n2:cpuacct:/\n1:cpu:/\n0::/\n"
V2_MOUNTINFO = "31 25 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
V2_CGROUP = "0::/user.slice/qlaunch-runner\n"


def fake_host(
    root: Path,
    mountinfo: str,
    cgroup: str,
    *,
    ksm: str | None = None,
    huge_free: int = 0,
) -> Path:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/mountinfo").write_text(mountinfo)
    (root / "proc/self/cgroup").write_text(cgroup)
    (root / "proc/meminfo").write_text("MemTotal: 1 kB\nHugepagesize:    2048 kB\n")
    if ksm is not None:
        (root / "sys/kernel/mm/ksm").mkdir(parents=True)
        (root / "sys/kernel/mm/ksm/run").write_text(ksm + "\n")
    hp = root / "sys/kernel/mm/hugepages/hugepages-2048kB"
    hp.mkdir(parents=True)
    for f, v in (("free_hugepages", huge_free), ("resv_hugepages", 0), ("nr_hugepages", huge_free)):
        (hp / f).write_text(f"{v}\n")
    for d in ("cpu", "memory/jobs/a1", "unified"):
        (root / "sys/fs/cgroup" / d).mkdir(parents=True)
    return root


def prof(*sets: str) -> profmod.Profile:
    return profmod.load("default", list(sets))


def test_hybrid_layout_finds_v1_controllers() -> None:
    mounts = resources.parse_mountinfo(HYBRID_MOUNTINFO)
    own = resources.parse_proc_cgroup(HYBRID_CGROUP)
    assert own == {"memory": "/jobs/a1", "cpuacct": "/", "cpu": "/", "": "/"}
    mem = resources.find_hierarchy("memory", mounts, own)
    assert mem == resources.Hierarchy(
        "memory", 1, "/sys/fs/cgroup/memory", "/sys/fs/cgroup/memory/jobs/a1"
    )
    assert mem.vm_dir("web") == "/sys/fs/cgroup/memory/jobs/a1/qlaunch/web"
    cpu = resources.find_hierarchy("cpu", mounts, own)
    assert cpu is not None and cpu.own == "/sys/fs/cgroup/cpu" and cpu.version == 1
    assert resources.find_hierarchy("pids", mounts, own) is None


def test_prepare_v1_makes_cgroups_and_release_removes_them(tmp_path: Path) -> None:
    root = fake_host(tmp_path, HYBRID_MOUNTINFO, HYBRID_CGROUP)
    cpu = min(os.sched_getaffinity(0))
    p = prof(
        f"resources.cpu_affinity=[{cpu}]",
        "resources.cpu_limit=100",
        "resources.memory_limit=1G",
    )
    out = resources.prepare("web", p, root)
    assert out is not None and out.mem_path is None
    cg_cpu = root / "sys/fs/cgroup/cpu/qlaunch/web"
    cg_mem = root / "sys/fs/cgroup/memory/jobs/a1/qlaunch/web"
    assert (cg_cpu / "cpu.cfs_quota_us").read_text() == "100000"
    assert (cg_cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert (cg_mem / "memory.limit_in_bytes").read_text() == str(1 << 30)
    assert out.record["affinity"] == [cpu]
    assert {c["controller"]: c["dir"] for c in out.record["cgroups"]} == {
        "cpu": str(cg_cpu),
        "memory": str(cg_mem),
    }
    assert out.hook["call"] == "qlaunch.vm.resources:release"
    # The hook, as the supervisor runs it: limit files first (a real cgroupfs has none to
    # remove; here they are plain files).
    for d in (cg_cpu, cg_mem):
        for f in d.iterdir():
            f.unlink()
    resources.release(*out.hook["args"])
    assert not cg_cpu.exists() and not cg_mem.exists()
    assert not (root / "sys/fs/cgroup/cpu/qlaunch").exists()
    resources.release(*out.hook["args"])  # idempotent


def test_prepare_v2_puts_the_vm_beside_our_cgroup(tmp_path: Path) -> None:
    """cgroup v2: our own cgroup holds qlaunch, so it can give no controller to children
    (EBUSY); its parent gives it its controllers, so the VM's cgroup goes there."""
    root = fake_host(tmp_path, V2_MOUNTINFO, V2_CGROUP)
    parent = root / "sys/fs/cgroup/user.slice"
    own = parent / "qlaunch-runner"
    own.mkdir(parents=True)
    (parent / "cgroup.subtree_control").write_text("cpu memory pids\n")
    (own / "cgroup.controllers").write_text("cpu memory pids\n")
    out = resources.prepare("db", prof("resources.cpu_limit=50", "resources.memory_limit=1G"), root)
    assert out is not None
    assert not (own / "cgroup.subtree_control").exists() and not (own / "qlaunch").exists()
    assert (parent / "cgroup.subtree_control").read_text() == "cpu memory pids\n"  # untouched
    assert (parent / "qlaunch/cgroup.subtree_control").read_text() == "+cpu +memory"
    assert (parent / "qlaunch/db/cpu.max").read_text() == "50000 100000"
    assert (parent / "qlaunch/db/memory.max").read_text() == str(1 << 30)
    # One cgroup for both controllers; the supervisor comes home to our own after the spawn.
    assert out.record["cgroups"] == [
        {"controller": "cpu", "dir": str(parent / "qlaunch/db"), "home": str(own)}
    ]
    # The release hook takes the VM's cgroup and the qlaunch parent it made.
    for d in (parent / "qlaunch/db", parent / "qlaunch"):
        for f in d.iterdir():
            if f.is_file():
                f.unlink()
    resources.release(*out.hook["args"])
    assert not (parent / "qlaunch").exists()


def test_prepare_v2_in_the_root_cgroup(tmp_path: Path) -> None:
    """The root cgroup may hold processes and still give controllers: the VM goes below it."""
    root = fake_host(tmp_path, V2_MOUNTINFO, "0::/\n")
    top = root / "sys/fs/cgroup"
    (top / "cgroup.controllers").write_text("cpu memory\n")
    out = resources.prepare("db", prof("resources.memory_limit=1G"), root)
    assert out is not None
    assert (top / "cgroup.subtree_control").read_text() == "+memory"
    assert (top / "qlaunch/db/memory.max").read_text() == str(1 << 30)


def test_no_controller_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    root = fake_host(tmp_path, HYBRID_MOUNTINFO.replace("rw,memory", "rw,blkio"), HYBRID_CGROUP)
    with pytest.raises(HostError, match="no cgroup memory controller"):
        resources.prepare("web", prof("resources.cpu_limit=50", "resources.memory_limit=1G"), root)
    assert not (root / "sys/fs/cgroup/cpu/qlaunch").exists()


def test_nothing_asked_nothing_done(tmp_path: Path) -> None:
    assert resources.prepare("web", prof(), tmp_path) is None


def test_ksm(tmp_path: Path) -> None:
    p = prof("resources.mem_merge=true")
    with pytest.raises(HostError, match="has no KSM"):
        resources.prepare("a", p, fake_host(tmp_path / "a", "", ""))
    with pytest.raises(HostError, match="KSM is not running") as e:
        resources.prepare("b", p, fake_host(tmp_path / "b", "", "", ksm="0"))
    assert "echo 1 > /sys/kernel/mm/ksm/run" in (e.value.hint or "")
    out = resources.prepare("c", p, fake_host(tmp_path / "c", "", "", ksm="1"))
    assert out is not None and out.record == {}


def test_hugepages(tmp_path: Path) -> None:
    p = prof("resources.hugepages=true", "machine.memory=256M")
    with pytest.raises(HostError, match="no hugetlbfs is mounted"):
        resources.prepare("a", p, fake_host(tmp_path / "a", V2_MOUNTINFO, V2_CGROUP))
    with pytest.raises(HostError, match="needs 128 hugepages of 2M; 100 of 100 are free"):
        resources.prepare("b", p, fake_host(tmp_path / "b", HYBRID_MOUNTINFO, "", huge_free=100))
    out = resources.prepare("c", p, fake_host(tmp_path / "c", HYBRID_MOUNTINFO, "", huge_free=128))
    assert out is not None and out.mem_path == "/mnt/huge"


def test_affinity_and_cpu_limit_beyond_the_host(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="CPU 4096 is not one qlaunch may use"):
        resources.prepare("a", prof("resources.cpu_affinity=[4096]"), tmp_path)
    with pytest.raises(HostError, match="more than this host"):
        resources.prepare("a", prof("resources.cpu_limit=1000000"), tmp_path)


def test_placed_moves_in_and_back(tmp_path: Path) -> None:
    home, vm = tmp_path / "home", tmp_path / "vm"
    home.mkdir()
    vm.mkdir()
    spec = {"cgroups": [{"controller": "cpu", "dir": str(vm), "home": str(home)}]}
    with resources.placed(spec):
        assert (vm / "cgroup.procs").read_text() == str(os.getpid())
    assert (home / "cgroup.procs").read_text() == str(os.getpid())
    before = os.sched_getaffinity(0)
    with resources.placed({"affinity": [min(before)]}):
        assert os.sched_getaffinity(0) == {min(before)}
    assert os.sched_getaffinity(0) == before


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["resources.memory_limit=200M"], "does not even hold the guest's 256M"),
        (["resources.memory_limit=10M"], "too low a memory limit"),
        (["resources.cpu_affinity=[0, 0]"], "distinct host CPU numbers"),
        (["resources.cpu_limit=0"], "not a CPU share"),
        (["resources.hugepages=1"], "expected true or false"),
        (["resources.swap=1"], "unknown key 'swap'"),
    ],
)
def test_bad_resource_keys(sets: list[str], match: str) -> None:
    with pytest.raises(ProfileError, match=match):
        prof(*sets)


def test_runas_checks() -> None:
    with pytest.raises(UsageError, match="no user"):
        resources.check_runas("no-such-user-anywhere")
    if os.geteuid() == 0:
        with pytest.raises(UsageError, match="that is root"):
            resources.check_runas("root")
        assert resources.check_runas("nobody") == "nobody"
    else:
        with pytest.raises(HostError, match="only root"):
            resources.check_runas("nobody")


NO_KVM = HostFacts(arch="x86_64", kvm=Verdict(False, "test"))


def _sandbox(p: profmod.Profile, runas: str | None) -> list[str]:
    rt = argvmod.Runtime(name="t", sandbox=True, runas=runas)
    return argvmod.build_argv(p, NO_KVM, rt)


def test_sandbox_fits_the_features_in_use() -> None:
    argv = _sandbox(prof(), None)
    opts = argv[argv.index("-sandbox") + 1]
    assert opts == "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    assert "-runas" not in argv
    # -runas must setuid (QEMU 7.2 dies of SIGSYS otherwise); SMB spawns smbd.
    argv = _sandbox(prof("net.0.mode=user", "net.0.smb=/srv"), "nobody")
    opts = argv[argv.index("-sandbox") + 1]
    assert "elevateprivileges=allow" in opts and "spawn=allow" in opts
    assert argv[argv.index("-runas") + 1] == "nobody"
