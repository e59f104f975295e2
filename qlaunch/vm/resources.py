"""Host resources for a VM's QEMU: cgroup limits, CPU affinity, KSM, hugepages, --runas.

A profile's [resources] table (see qlaunch.config.settings) is checked and made ready by `prepare()`
when `start` runs, before anything else starts; whatever this host cannot do is a HostError
that says why, never a silent no-op:

- cpu_limit and memory_limit: a cgroup per VM, `qlaunch/NAME`, in whichever hierarchy has the
  controller: cgroup v1 (`cpu.cfs_quota_us`, `memory.limit_in_bytes`) or v2 (`cpu.max`,
  `memory.max`; hybrid hosts have cpu and memory on v1, a stock Debian 12 is pure v2). On v1
  it goes under the cgroup qlaunch itself runs in, so a VM never escapes the limits its starter
  lives under. On v2 that cannot be: a cgroup that holds processes (ours holds qlaunch) cannot
  give controllers to children, the root excepted. There it goes beside ours, under our
  parent, which gives our cgroup its controllers and so can give them to a sibling: the VM
  stays within every limit above our own cgroup.
- cpu_affinity: the CPUs QEMU's threads may run on.
- mem_merge: `-machine mem-merge=on|off`; true needs KSM running (/sys/kernel/mm/ksm/run).
- hugepages: guest RAM from a file on a mounted hugetlbfs, preallocated; enough free pages
  of its size must be there at start.

QEMU gets the cgroups and affinity from its parent: the supervisor enters the VM's cgroups and
takes its affinity just for the instant it spawns QEMU (`placed()`), so QEMU and every thread
it makes are in place from their first instruction, on restarts too, and the supervisor is
not counted against the VM's limits. The cgroups go when the VM ends (a cleanup hook).

This module is imported by the supervisor: standard library only at the top.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlaunch.errors import HostError, UsageError

if TYPE_CHECKING:
    from qlaunch.config.profile import Profile

CFS_PERIOD_US = 100_000
CGROUP_PARENT = "qlaunch"


# ---- the host's cgroup layout --------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    root: str  # the part of the hierarchy this mount shows (mountinfo field 4)
    point: str
    fstype: str
    options: frozenset[str]  # super options: controllers for cgroup v1, pagesize for hugetlbfs


@dataclass(frozen=True)
class Hierarchy:
    """Where one controller lives, and our own cgroup in it."""

    controller: str
    version: int  # 1 or 2
    mount: str
    own: str  # our cgroup's directory in it

    @property
    def base(self) -> str:
        """Where the `qlaunch` cgroup goes: see the module's docstring for v2."""
        if self.version == 2 and os.path.normpath(self.own) != os.path.normpath(self.mount):
            return os.path.dirname(os.path.normpath(self.own))
        return self.own

    def vm_dir(self, name: str) -> str:
        return os.path.join(self.base, CGROUP_PARENT, name)


def parse_mountinfo(text: str) -> list[Mount]:
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        f = left.split()
        r = right.split()
        if len(f) < 5 or len(r) < 3:
            continue
        out.append(Mount(_unescape(f[3]), _unescape(f[4]), r[0], frozenset(r[2].split(","))))
    return out


def _unescape(s: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    return (
        s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
    )


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/PID/cgroup -> {controller or "" (v2): path}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctls, path = parts
        for c in ctls.split(",") if ctls else [""]:
            out[c.removeprefix("name=")] = path
    return out


def find_hierarchy(
    controller: str, mounts: list[Mount], own: Mapping[str, str], root: Path = Path("/")
) -> Hierarchy | None:
    """The mounted hierarchy that has controller, with our cgroup's directory in it."""
    for m in mounts:
        if m.fstype == "cgroup" and controller in m.options and controller in own:
            return Hierarchy(controller, 1, m.point, _own_dir(m, own[controller]))
    for m in mounts:
        if m.fstype == "cgroup2" and "" in own:
            d = _own_dir(m, own[""])
            ctl = _read(root, os.path.join(d, "cgroup.controllers"))
            if ctl is not None and controller in ctl.split():
                return Hierarchy(controller, 2, m.point, d)
    return None


def _own_dir(m: Mount, path: str) -> str:
    # A mount may show only a subtree (containers): our path is then relative to its root.
    rel = os.path.relpath(path, m.root) if m.root != "/" else path.lstrip("/")
    if rel.startswith(".."):
        rel = ""
    return os.path.normpath(os.path.join(m.point, rel.lstrip("/")))


def _read(root: Path, path: str) -> str | None:
    try:
        return (root / path.lstrip("/")).read_text()
    except OSError:
        return None


# ---- prepare at start ----------------------------------------------------------------------


@dataclass
class Prepared:
    """What start does with the result: `record` goes into the VM's state (the supervisor
    reads it for placed()), `hook` is its cleanup, `mem_path` goes into argv."""

    record: dict[str, Any] = field(default_factory=dict)
    mem_path: str | None = None
    created: list[str] = field(default_factory=list)

    @property
    def hook(self) -> dict[str, Any]:
        return {
            "call": "qlaunch.vm.resources:release",
            "args": [list(self.created)],
            "what": "remove the VM's cgroups",
        }

    def rollback(self) -> None:
        release(self.created)


def check_runas(user: str) -> str:
    """--runas USER: an existing user, and qlaunch must be root to hand QEMU over to it."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise UsageError(f"--runas: there is no user {user!r} on this host") from None
    if os.geteuid() != 0:
        raise HostError(
            f"--runas {user}: only root can start QEMU as another user",
            hint="run qlaunch as root, or leave out --runas",
        )
    if pw.pw_uid == 0:
        raise UsageError(f"--runas {user}: that is root; QEMU would keep every privilege")
    return user


def prepare(name: str, profile: Profile, root: Path = Path("/")) -> Prepared | None:
    """Check the host can give the profile's [resources], then make the VM's cgroups. None
    when the profile asks for nothing. HostError (nothing left behind) when it cannot."""
    res = profile.resources
    if not res.any:
        return None
    where = f"{profile.source}: [resources]"
    out = Prepared()
    if res.cpu_affinity:
        out.record["affinity"] = _check_affinity(where, res.cpu_affinity)
    if res.cpu_limit is not None:
        ncpu = os.cpu_count() or 1
        if res.cpu_limit > 100 * ncpu:
            raise HostError(
                f"{where} cpu_limit: {res.cpu_limit}% is more than this host's {ncpu} CPUs "
                f"({100 * ncpu}%)"
            )
    if res.mem_merge:
        check_ksm(where, root)
    if res.hugepages:
        out.mem_path = check_hugepages(where, profile.machine.memory_mib << 20, root)
    limits: list[tuple[str, str, str]] = []  # (controller, file name, value)
    hier: dict[str, Hierarchy] = {}
    wanted = {"cpu": res.cpu_limit is not None, "memory": res.memory_limit is not None}
    if any(wanted.values()):
        mounts = parse_mountinfo(_read(root, "/proc/self/mountinfo") or "")
        own = parse_proc_cgroup(_read(root, "/proc/self/cgroup") or "")
        for ctl in (c for c, w in wanted.items() if w):
            h = find_hierarchy(ctl, mounts, own, root)
            if h is None:
                key = "cpu_limit" if ctl == "cpu" else "memory_limit"
                raise HostError(
                    f"{where} {key}: this host has no cgroup {ctl} controller qlaunch can use "
                    "(neither a cgroup v1 hierarchy with it nor cgroup2 offering it)",
                    hint=f"drop {key}, or mount the {ctl} controller",
                )
            hier[ctl] = h
        if res.cpu_limit is not None:
            quota = res.cpu_limit * CFS_PERIOD_US // 100
            if hier["cpu"].version == 1:
                limits.append(("cpu", "cpu.cfs_period_us", str(CFS_PERIOD_US)))
                limits.append(("cpu", "cpu.cfs_quota_us", str(quota)))
            else:
                limits.append(("cpu", "cpu.max", f"{quota} {CFS_PERIOD_US}"))
        if res.memory_limit is not None:
            f = "memory.limit_in_bytes" if hier["memory"].version == 1 else "memory.max"
            limits.append(("memory", f, str(res.memory_limit)))
    try:
        cgroups = _make_cgroups(name, hier, limits, out.created, root)
    except BaseException:
        out.rollback()
        raise
    if cgroups:
        out.record["cgroups"] = cgroups
    return out


def _check_affinity(where: str, cpus: tuple[int, ...]) -> list[int]:
    allowed = os.sched_getaffinity(0)
    bad = [c for c in cpus if c not in allowed]
    if bad:
        raise HostError(
            f"{where} cpu_affinity: CPU {bad[0]} is not one qlaunch may use here",
            hint=f"CPUs available: {_ranges(sorted(allowed))}",
        )
    return list(cpus)


def _ranges(cpus: list[int]) -> str:
    out: list[str] = []
    for c in cpus:
        if out and "-" not in out[-1] and int(out[-1]) == c - 1:
            out[-1] = f"{out[-1]}-{c}"
        elif out and "-" in out[-1] and int(out[-1].split("-")[1]) == c - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{c}"
        else:
            out.append(str(c))
    return ",".join(out)


def check_ksm(where: str, root: Path = Path("/")) -> None:
    run = _read(root, "/sys/kernel/mm/ksm/run")
    if run is None:
        raise HostError(
            f"{where} mem_merge: this host's kernel has no KSM (/sys/kernel/mm/ksm)",
            hint="drop mem_merge, or use a kernel built with CONFIG_KSM",
        )
    if run.strip() != "1":
        raise HostError(
            f"{where} mem_merge: KSM is not running on this host (/sys/kernel/mm/ksm/run is "
            f"{run.strip()}), so no guest page would ever be merged",
            hint="start it as root: echo 1 > /sys/kernel/mm/ksm/run; or drop mem_merge",
        )


def check_hugepages(where: str, ram: int, root: Path = Path("/")) -> str:
    """The hugetlbfs mount to take the guest's RAM from; HostError unless enough pages of
    its size are free."""
    huge = [
        m
        for m in parse_mountinfo(_read(root, "/proc/self/mountinfo") or "")
        if m.fstype == "hugetlbfs"
    ]
    if not huge:
        raise HostError(
            f"{where} hugepages: no hugetlbfs is mounted on this host",
            hint="as root: mkdir -p /dev/hugepages && mount -t hugetlbfs none /dev/hugepages; "
            "then reserve pages: echo N > /proc/sys/vm/nr_hugepages",
        )
    default = _default_hugepage(root)
    m = huge[0]
    size = default
    for o in m.options:
        if o.startswith("pagesize="):
            size = _size(o.removeprefix("pagesize="))
    if not size:
        raise HostError(f"{where} hugepages: cannot tell the page size of {m.point}")
    if ram % size:
        raise HostError(
            f"{where} hugepages: the guest's RAM ({ram >> 20}M) is not a whole number of "
            f"{size >> 20}M hugepages"
        )
    need = ram // size
    d = f"/sys/kernel/mm/hugepages/hugepages-{size >> 10}kB"
    free = int((_read(root, f"{d}/free_hugepages") or "0").strip() or 0)
    resv = int((_read(root, f"{d}/resv_hugepages") or "0").strip() or 0)
    if free - resv < need:
        total = int((_read(root, f"{d}/nr_hugepages") or "0").strip() or 0)
        raise HostError(
            f"{where} hugepages: the guest's {ram >> 20}M needs {need} hugepages of "
            f"{size >> 20}M; {free - resv} of {total} are free",
            hint=f"as root: echo {total + need - (free - resv)} > "
            f"{d}/nr_hugepages (or /proc/sys/vm/nr_hugepages)",
        )
    return m.point


def _default_hugepage(root: Path) -> int:
    for line in (_read(root, "/proc/meminfo") or "").splitlines():
        if line.startswith("Hugepagesize:"):
            return int(line.split()[1]) << 10
    return 0


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower()
    if t and t[-1] in units:
        return int(t[:-1]) * units[t[-1]]
    return int(t)


def _make_cgroups(
    name: str,
    hier: dict[str, Hierarchy],
    limits: list[tuple[str, str, str]],
    created: list[str],
    root: Path,
) -> list[dict[str, str]]:
    """Make the VM's cgroup in each hierarchy and write its limits. `created` collects what
    the cleanup removes: the VM's directories, and the qlaunch parent where we made it."""
    out: list[dict[str, str]] = []
    dirs: dict[str, str] = {}
    v2 = [h for h in hier.values() if h.version == 2]
    if v2:
        _enable_v2(v2[0], [h.controller for h in v2], root, created)
    for ctl, h in hier.items():
        d = str(root / h.vm_dir(name).lstrip("/"))
        if d in dirs.values():  # one cgroup for several controllers (v2; v1 co-mounted)
            dirs[ctl] = d
            continue
        for p in (os.path.dirname(d), d):
            try:
                os.mkdir(p, 0o755)
                created.append(p)
            except FileExistsError:
                if p == d:
                    if not _empty(Path(d)):
                        raise HostError(
                            f"cgroup {p} exists and holds processes: another VM named {name}?"
                        ) from None
                    created.append(p)
            except OSError as e:
                raise HostError(
                    f"cannot create cgroup {p}: {e.strerror}",
                    hint="cgroup limits need root (or a cgroup delegated to this user)",
                ) from None
        dirs[ctl] = d
        out.append({"controller": ctl, "dir": d, "home": str(root / h.own.lstrip("/"))})
    for ctl, fname, value in limits:
        _write(os.path.join(dirs[ctl], fname), value)
    return out


def _enable_v2(h: Hierarchy, ctls: list[str], root: Path, created: list[str]) -> None:
    """cgroup v2 hands a controller to children only through each parent's subtree_control,
    and only from a cgroup without processes of its own (the root excepted). h.base already
    gives ours every controller find_hierarchy saw in our cgroup.controllers."""
    for d in (h.base, os.path.join(h.base, CGROUP_PARENT)):
        path = root / d.lstrip("/")
        try:
            path.mkdir(0o755)
            created.append(str(path))
        except FileExistsError:
            pass
        cur = (_read(root, os.path.join(d, "cgroup.subtree_control")) or "").split()
        missing = [c for c in ctls if c not in cur]
        if not missing:
            continue
        try:
            (path / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in missing))
        except OSError as e:
            why = e.strerror
            if e.errno == errno.EBUSY:
                why = "it holds processes, and cgroup v2 gives controllers only to leaves"
            raise HostError(
                f"cannot enable the cgroup {' and '.join(missing)} controller below {d}: {why}",
                hint=f"move the processes in {d} to a cgroup of their own",
            ) from None


def _empty(path: Path) -> bool:
    try:
        return not (path / "cgroup.procs").read_text().strip()
    except OSError:
        return True


def _write(path: str, value: str) -> None:
    try:
        Path(path).write_text(value)
    except OSError as e:
        raise HostError(f"cannot set {path} to {value}: {e.strerror}") from None


# ---- in the supervisor ---------------------------------------------------------------------


@contextlib.contextmanager
def placed(spec: Mapping[str, Any] | None) -> Iterator[None]:
    """Around the spawn of QEMU: the calling process is in the VM's cgroups and on its CPUs,
    so the child inherits both; afterwards it is back where it was."""
    if not spec:
        yield
        return
    pid = str(os.getpid())
    moved: list[Mapping[str, str]] = []
    old_affinity = None
    try:
        for cg in spec.get("cgroups", []):
            Path(cg["dir"], "cgroup.procs").write_text(pid)
            moved.append(cg)
        if spec.get("affinity"):
            old_affinity = os.sched_getaffinity(0)
            os.sched_setaffinity(0, spec["affinity"])
        yield
    finally:
        if old_affinity is not None:
            os.sched_setaffinity(0, old_affinity)
        for cg in reversed(moved):
            with contextlib.suppress(OSError):
                Path(cg["home"], "cgroup.procs").write_text(pid)


def release(dirs: list[str] | list[dict[str, str]]) -> None:
    """The cleanup hook: remove the VM's cgroups (and the qlaunch parent once empty).
    Idempotent; OSError if one still holds a process."""
    paths = [d["dir"] if isinstance(d, dict) else d for d in dirs]
    for d in sorted(paths, key=len, reverse=True):
        if os.path.basename(d) == CGROUP_PARENT:
            with contextlib.suppress(FileNotFoundError, OSError):
                os.rmdir(d)  # shared by every VM: gone only when the last one is
            continue
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(d)
