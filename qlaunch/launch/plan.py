"""One launch plan: (profile, host facts, entry, wiring) -> what that launch runs.

`wire` gives each entry its wiring (`run` in the foreground; `start` and `restore` under a
supervisor, paused, with sockets in the VM's state directory and a private monitor; `exec` with
virtio console ports and 9p shares), and `build` turns it into a LaunchPlan: the argv, the file
descriptors QEMU inherits, the sockets and files it makes. Both are pure. `qlaunch cmdline
--for ENTRY` prints the plan with <placeholders> where a launch would put a real fd or path, and
the entries run the plan's argv as it is, so what cmdline shows is what runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from qlaunch.boot import protocol
from qlaunch.config.profile import Profile
from qlaunch.errors import UsageError
from qlaunch.launch.argv import Port, Runtime, Share, build_argv, choose_accel, kernel_cmdline
from qlaunch.launch.host import HostFacts

ENTRIES = ("run", "start", "exec", "restore")
STATE = "<state>"  # a VM's state directory, shown for start and restore
TMP = "<tmp>"  # the temporary directory of a run or an exec


@dataclass(frozen=True)
class PassFd:
    fd: int | None  # None: a placeholder (made at launch)
    what: str


@dataclass(frozen=True)
class Made:
    path: str
    what: str


@dataclass(frozen=True)
class LaunchPlan:
    entry: str
    name: str
    argv: tuple[str, ...]
    accel: str
    accel_note: str | None
    kernel_cmdline: str | None
    fds: tuple[PassFd, ...]
    sockets: tuple[Made, ...]
    files: tuple[Made, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"argv": list(self.argv)}


def check_entry(entry: str) -> None:
    if entry not in ENTRIES:
        raise UsageError(f"--for {entry!r}: expected one of {', '.join(ENTRIES)}")


def wire(
    entry: str,
    name: str,
    *,
    kernel: str | None = None,
    initrd: str | None = None,
    dtb: str | None = None,
    statedir: str | None = None,
    uuid: str | None = None,
    disk_paths: tuple[str, ...] = (),
    taps: tuple[str | None, ...] = (),
    nic_append: tuple[str, ...] = (),
    mem_path: str | None = None,
    runas: str | None = None,
    monitor_fd: int | None = None,
    ports: tuple[Port, ...] | None = None,
    shares: tuple[Share, ...] = (),
    exec_append: tuple[str, ...] = (),
    hotplug: tuple[str, ...] = (),
) -> Runtime:
    """The Runtime of one entry. What is not given yet shows as a placeholder."""
    check_entry(entry)
    base = Runtime(
        name=name,
        kernel=kernel,
        initrd=initrd,
        dtb=dtb,
        disk_paths=disk_paths,
        taps=taps,
        mem_path=mem_path,
        append_extra=nic_append,
    )
    if entry in ("start", "restore"):
        d = statedir or f"{STATE}/{name}"
        return replace(
            base,
            console=f"{d}/console.sock",
            console_log=f"{d}/console.log",
            qmp=f"{d}/qmp.sock",
            agent=f"{d}/qga.sock",
            uuid=uuid or "<uuid>",
            # Paused until the supervisor has QMP, so no guest output or event is missed.
            paused=True,
            sandbox=True,
            runas=runas,
            monitor=True,
            monitor_fd=monitor_fd,
            hotplug=hotplug,
            incoming="defer" if entry == "restore" else None,
        )
    if entry == "exec":
        if ports is None:
            ports = tuple(Port(p, None) for p in protocol.PORTS)
        return replace(base, ports=ports, shares=shares, append_extra=(*nic_append, *exec_append))
    return base


def build(profile: Profile, host: HostFacts, entry: str, rt: Runtime) -> LaunchPlan:
    check_entry(entry)
    accel, note = choose_accel(profile, host)
    argv = build_argv(profile, host, rt)
    fds: list[PassFd] = []
    for i, n in enumerate(profile.nets):
        if n.mode in ("network", "bridge"):
            tap = rt.taps[i] if i < len(rt.taps) else None
            fd = int(tap[3:]) if tap and tap.startswith("fd=") else None
            fds.append(PassFd(fd, f"tap of NIC {i} on {n.network or n.bridge}"))
    if rt.monitor:
        fds.append(PassFd(rt.monitor_fd, "supervisor monitor (QMP)"))
    fds += [PassFd(p.fd, f"virtio console port qlaunch.{p.name}") for p in rt.ports]
    sockets: list[Made] = []
    if rt.qmp:
        sockets.append(Made(rt.qmp, "QMP"))
    if rt.console != "stdio":
        sockets.append(Made(rt.console, "serial console"))
    if rt.agent and profile.board.virtio:
        sockets.append(Made(rt.agent, "guest agent"))
    files: list[Made] = []
    if rt.console_log:
        files.append(Made(rt.console_log, "console log"))
    cmdline = None
    if rt.kernel or profile.boot.kernel:
        tsc = host.tsc_khz if accel == "tcg" and profile.board.tsc_hint else None
        cmdline = kernel_cmdline(profile, rt, tsc)
    return LaunchPlan(
        entry=entry,
        name=rt.name,
        argv=tuple(argv),
        accel=accel,
        accel_note=note,
        kernel_cmdline=cmdline,
        fds=tuple(fds),
        sockets=tuple(sockets),
        files=tuple(files),
    )


def relocate(p: LaunchPlan, real: str, shown: str) -> LaunchPlan:
    """The plan with a temporary directory's path shown as a placeholder: `qlaunch cmdline`
    prepares in a directory of its own what the entry would put in its state or work dir."""

    def fix(s: str) -> str:
        return s.replace(real, shown)

    return replace(
        p,
        argv=tuple(fix(a) for a in p.argv),
        kernel_cmdline=fix(p.kernel_cmdline) if p.kernel_cmdline else None,
        sockets=tuple(Made(fix(m.path), m.what) for m in p.sockets),
        files=tuple(Made(fix(m.path), m.what) for m in p.files),
    )
