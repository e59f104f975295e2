"""One launch plan: (profile, host facts, entry, wiring) -> what that launch runs.

`wire` gives each entry its wiring (`run` in the foreground; `start` and `restore` under a
supervisor, paused, with sockets in the VM's state directory and a private monitor; `exec` with
virtio console ports and 9p shares), and `build` turns it into a LaunchPlan: the argv, the file
descriptors QEMU inherits, the sockets and files it makes. Both are pure. `qlaunch cmdline
--for ENTRY` prints the plan with <placeholders> where a launch would put a real fd or path, and
the entries run the plan's argv as it is, so what cmdline shows is what runs.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, replace
from typing import Any

from qlaunch.boot import protocol
from qlaunch.config.profile import Profile
from qlaunch.errors import HostError, ProfileError, UsageError
from qlaunch.launch import shares as sharemod
from qlaunch.launch import warm as warmmod
from qlaunch.launch.argv import (
    Port,
    Runtime,
    Share,
    build_argv,
    choose_accel,
    firmware_for,
    kernel_cmdline,
)
from qlaunch.launch.host import HostFacts

ENTRIES = ("run", "start", "exec", "restore", "warm-build", "warm-run")
# run --warm: the boot that saves a warm image (QMP to stop and save it), and each run's
# restore of it (-incoming from the image's file descriptor; QEMU resumes once it is in).
WARM = ("warm-build", "warm-run")
STATE = "<state>"  # a VM's state directory, shown for start and restore
TMP = "<tmp>"  # the temporary directory of a run or an exec
DATA = "<data>"  # a VM's persistent data directory (paths.vm_data_dir), for start and restore


@dataclass(frozen=True)
class PassFd:
    fd: int | None  # None: a placeholder (made at launch)
    what: str


@dataclass(frozen=True)
class Made:
    path: str
    what: str


@dataclass(frozen=True)
class Helper:
    """A process QEMU needs beside it (swtpm, virtiofsd): started before QEMU, ready once
    `ready` (a socket) exists, gone with QEMU (it ends when QEMU's connection closes)."""

    what: str
    argv: tuple[str, ...]
    ready: str
    state: str  # a directory it keeps its state in, made (0700) before it starts
    log: str


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
    helpers: tuple[Helper, ...] = ()
    firmware: dict[str, Any] | None = None  # the choice: kind, code, vars template, descriptor
    notes: tuple[str, ...] = ()  # one line each, for stderr: a share that fell back to 9p

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {
            "argv": list(self.argv),
            "helpers": [asdict(h) | {"argv": list(h.argv)} for h in self.helpers],
        }


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
    data: str | None = None,
    workdir: str | None = None,
    incoming_fd: int | None = None,
    command: bool = False,
) -> Runtime:
    """The Runtime of one entry. What is not given yet shows as a placeholder.
    command (run): the run has a guest command, so it ends by itself.

    statedir (start, restore): the VM's runtime directory; data: its persistent one (UEFI
    variables, TPM state); workdir (run, exec): the launch's temporary directory, which
    holds throwaway copies of both."""
    check_entry(entry)
    background = entry in ("start", "restore")
    if background:
        here = statedir or f"{STATE}/{name}"
        keep = data or f"{DATA}/{name}"
    else:
        here = keep = workdir or TMP
    base = Runtime(
        name=name,
        kernel=kernel,
        initrd=initrd,
        dtb=dtb,
        disk_paths=disk_paths,
        taps=taps,
        mem_path=mem_path,
        append_extra=nic_append,
        firmware_vars=f"{keep}/{VARS_FILE}",
        tpm=f"{here}/tpm.sock",
        sockdir=here,
    )
    if background:
        d = here
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
        return replace(
            base,
            ports=ports,
            shares=shares,
            append_extra=(*nic_append, *exec_append),
            hotplug_ports=False,
        )
    if entry in WARM:
        # Both sides run the same machine: only the monitor and -incoming differ.
        # No hotplug ports: no monitor plugs anything into a run, and each is a device more
        # for every restore to set up.
        base = replace(
            base,
            append_extra=(*nic_append, *exec_append, warmmod.KERNEL_ARG, protocol.NO_BUTTON),
            hotplug_ports=False,
        )
        if entry == "warm-build":
            return replace(base, qmp=f"{here}/qmp.sock")
        fd = incoming_fd if incoming_fd is not None else "<fd: warm image>"
        return replace(base, incoming=f"fd:{fd}")
    if command:
        # A command's run ends by itself and nothing plugs devices into it (hotplug is for
        # background VMs, through QMP): no empty hotplug ports, whose PCIe port services cost
        # the guest 6% of a q35 `run -- true`'s CPU under TCG (four ports). Nor a power
        # button: nothing powers it down.
        return replace(
            base, hotplug_ports=False, append_extra=(*base.append_extra, protocol.NO_BUTTON)
        )
    return base


VARS_FILE = "efivars.fd"
TPM_STATE = "tpm"


def tpm_helper(profile: Profile, host: HostFacts, rt: Runtime) -> Helper | None:
    """swtpm for [machine] tpm: its state beside the VM's variable store (kept for a
    background VM, thrown away with a run), its control socket where QEMU looks for it."""
    if not profile.machine.tpm:
        return None
    if host.swtpm is None:
        raise HostError(
            "[machine] tpm needs swtpm, which is not installed", hint="apt-get install swtpm"
        )
    assert rt.tpm is not None and rt.firmware_vars is not None
    here = os.path.dirname(rt.tpm)
    state = f"{os.path.dirname(rt.firmware_vars)}/{TPM_STATE}"
    log = f"{here}/swtpm.log"
    for path in (state, rt.tpm, log):
        if "," in path:
            # swtpm's options are KEY=VALUE,... with no way to escape a comma.
            raise UsageError(f"swtpm cannot take a path with a comma: {path}")
    argv = (
        host.swtpm,
        "socket",
        "--tpm2",
        "--tpmstate",
        f"dir={state},mode=0600",
        "--ctrl",
        f"type=unixio,path={rt.tpm},mode=0600",
        # Ends when QEMU's connection closes: a QEMU killed with SIGKILL takes swtpm along.
        "--terminate",
        "--log",
        f"file={log},level=1",
    )
    return Helper("TPM 2.0 emulator (swtpm)", argv, rt.tpm, state, log)


def virtiofsd_helper(host: HostFacts, share: Share) -> Helper:
    """virtiofsd for one virtiofs share: no state of its own (its socket's directory stands in
    for one), ended by QEMU's closing its vhost-user connection."""
    if host.virtiofsd is None:
        raise HostError(sharemod.virtiofs_unusable(host) or "virtiofsd is not installed")
    sock = share.socket or f"<virtiofsd socket for {share.tag}>"
    share = replace(share, socket=sock)
    return Helper(
        f"virtiofsd for {share.tag} ({share.path})",
        sharemod.virtiofsd_argv(host, share),
        sock,
        os.path.dirname(sock),
        sharemod.helper_log(share),
    )


def _check_binary(profile: Profile) -> None:
    """[qemu] binary is the user's word: a missing one is bad input (the default binary's
    absence is the host's, said with an apt hint when QEMU cannot start)."""
    b = profile.qemu_binary
    if b and not (shutil.which(b) if "/" not in b else os.access(b, os.X_OK)):
        raise ProfileError(
            f"{profile.source}: [qemu] binary: {b} is not an executable here",
            hint="give the path of a qemu-system-* binary, or drop the key for the default",
        )


def build(profile: Profile, host: HostFacts, entry: str, rt: Runtime) -> LaunchPlan:
    check_entry(entry)
    _check_binary(profile)
    accel, note = choose_accel(profile, host)
    notes: list[str] = []
    if entry != "exec":
        # exec wires the profile's shares itself, knowing what its kernel can mount.
        own, notes = sharemod.from_profile(profile, host, rt.sockdir or TMP)
        rt = replace(rt, shares=(*own, *rt.shares))
    argv = build_argv(profile, host, rt)
    fw = firmware_for(profile, host)
    helpers = tuple(h for h in (tpm_helper(profile, host, rt),) if h is not None)
    helpers += tuple(virtiofsd_helper(host, s) for s in rt.shares if s.kind == "virtiofs")
    fds: list[PassFd] = []
    for i, n in enumerate(profile.nets):
        if n.mode in ("network", "bridge"):
            tap = rt.taps[i] if i < len(rt.taps) else None
            fd = int(tap[3:]) if tap and tap.startswith("fd=") else None
            fds.append(PassFd(fd, f"tap of NIC {i} on {n.network or n.bridge}"))
    if rt.monitor:
        fds.append(PassFd(rt.monitor_fd, "supervisor monitor (QMP)"))
    fds += [PassFd(p.fd, f"virtio console port qlaunch.{p.name}") for p in rt.ports]
    if entry == "warm-run":
        fd_s = (rt.incoming or "").removeprefix("fd:")
        fds.append(PassFd(int(fd_s) if fd_s.isdigit() else None, "warm image (read by QEMU)"))
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
    if fw is not None and fw.vars_template and rt.firmware_vars:
        files.append(Made(rt.firmware_vars, f"UEFI variable store (from {fw.vars_template})"))
    for h in helpers:
        sockets.append(Made(h.ready, h.what))
        if h.state != os.path.dirname(h.ready):
            files.append(Made(h.state, f"{h.what}: state"))
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
        helpers=helpers,
        firmware=asdict(fw) if fw is not None else None,
        notes=tuple(notes),
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
        helpers=tuple(
            replace(
                h,
                argv=tuple(map(fix, h.argv)),
                ready=fix(h.ready),
                state=fix(h.state),
                log=fix(h.log),
            )
            for h in p.helpers
        ),
    )
