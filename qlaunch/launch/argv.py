"""The pure argv builder: (validated profile, host facts, runtime wiring) -> list[str].

Nothing here touches the file system or spawns anything, so every line of every shipped
profile's command line is pinned by golden tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlaunch.boot import firmware
from qlaunch.config.boards import QEMU_BINARY, Board
from qlaunch.config.profile import Disk, Net, Profile
from qlaunch.errors import HostError, UsageError
from qlaunch.launch.host import HostFacts
from qlaunch.names import stable_mac


def esc(value: str) -> str:
    """Escape a value for QEMU's KEY=VALUE,... option syntax: a comma is written twice."""
    return value.replace(",", ",,")


@dataclass(frozen=True)
class Port:
    """A virtio console port whose guest side is /dev/virtio-ports/NAME; QEMU writes what the
    guest sends into the file descriptor fd (None: shown as a placeholder)."""

    name: str
    fd: int | None


@dataclass(frozen=True)
class Share:
    """A host directory shared under a mount tag: exported by QEMU itself over 9p, or by a
    virtiofsd (a plan helper) that QEMU reaches on a vhost-user socket."""

    tag: str
    path: str
    readonly: bool = False
    kind: str = "9p"  # 9p or virtiofs
    socket: str | None = None  # virtiofs: virtiofsd's socket (None: shown as a placeholder)
    guest: str | None = None  # where qlaunch's guest init mounts it; None: it does not


@dataclass(frozen=True)
class Runtime:
    """How this one launch is wired: everything argv needs that is not in the profile.

    Built by qlaunch.launch.plan for each entry (run, start, exec, restore); a field left None
    is shown as a <placeholder> by `qlaunch cmdline`.
    """

    name: str
    console: str = "stdio"  # "stdio", or the path of a unix socket QEMU listens on
    console_log: str | None = None
    qmp: str | None = None  # unix socket path QEMU listens on for QMP
    uuid: str | None = None
    paused: bool = False  # -S: wait for QMP `cont`
    kernel: str | None = None  # resolved boot files (assets, generated initramfs)
    initrd: str | None = None
    dtb: str | None = None
    disk_paths: tuple[str, ...] = ()  # per-disk replacement paths (throwaway overlays)
    taps: tuple[str | None, ...] = ()  # per-NIC tap netdev options, e.g. "fd=3"
    append_extra: tuple[str, ...] = ()
    sandbox: bool = False
    runas: str | None = None  # -runas USER: QEMU drops root once its files are open
    mem_path: str | None = None  # hugetlbfs mount for [resources] hugepages (found at start)
    monitor: bool = False  # the supervisor's private QMP monitor on an inherited socket
    monitor_fd: int | None = None
    ports: tuple[Port, ...] = ()  # exec: virtio console ports for stdout, stderr, status
    shares: tuple[Share, ...] = ()  # exec's --share and the profile's [[share]]
    sockdir: str | None = None  # where helpers' sockets go (virtiofsd)
    hotplug: tuple[str, ...] = ()  # restore: the arguments of devices hotplugged before a save
    incoming: str | None = None  # restore: -incoming (defer: QMP migrate-incoming later)
    agent: str | None = None  # unix socket path for the guest agent's virtio port
    firmware_vars: str | None = None  # this VM's own UEFI variable store (a copy)
    tpm: str | None = None  # swtpm's control socket, for [machine] tpm
    # q35's empty PCIe root ports for hotplug. exec has no monitor to plug anything with, and
    # each port costs the guest's PCIe port driver about 0.1 s of a 2 s TCG boot.
    hotplug_ports: bool = True


# PCIe devices cannot be hotplugged onto the root bus: q35 gets this many empty root ports.
HOTPLUG_PORTS = 4
RAM_BACKEND = "qlaunch-ram"


def hotplug_port_ids(board: Board) -> tuple[str, ...]:
    """The ids of the pcie-root-ports argv gives a board for hotplug (see qlaunch.vm.hotplug)."""
    if board.machine != "q35":
        return ()
    return tuple(f"qlaunch-hp{i}" for i in range(HOTPLUG_PORTS))


def choose_accel(profile: Profile, host: HostFacts) -> tuple[str, str | None]:
    """-> (accelerator, note). The note explains a fallback and is shown on stderr."""
    want = profile.machine.accel
    if want == "tcg":
        return "tcg", None
    verdict = host.kvm_for(profile.machine.arch)
    if verdict.usable:
        return "kvm", None
    if want == "kvm":
        raise HostError(
            f"KVM was asked for but is not usable: {verdict.reason}",
            hint='set [machine] accel = "auto" or "tcg" (or --set machine.accel=tcg)',
        )
    return "tcg", f"using TCG (software emulation): {verdict.reason}"


def kernel_cmdline(profile: Profile, rt: Runtime, tsc_khz: int | None = None) -> str:
    board = profile.board
    args = [f"console={profile.console_tty}", "panic=-1", *board.append]
    if tsc_khz:
        args.append(f"tsc_early_khz={tsc_khz}")
    if profile.boot.quiet:
        args.append("quiet")
        if board.noisy_errors:
            args.append("loglevel=2")
    if profile.boot.initrd == "qlaunch" and any(d.interface == "sd" for d in profile.disks):
        # The card is found after init starts; boards have one slot, so it is mmcblk0.
        args.append("qlaunch.waitdev=mmcblk0")
    args.extend(rt.append_extra)
    if profile.boot.initrd == "qlaunch":
        args += [f"qlaunch.{s.kind}={s.tag}:{s.guest}" for s in rt.shares if s.guest]
    if profile.boot.append:
        args.append(profile.boot.append)
    return " ".join(args)


def build_argv(profile: Profile, host: HostFacts, rt: Runtime) -> list[str]:
    board = profile.board
    m = profile.machine
    accel, _ = choose_accel(profile, host)
    binary = profile.qemu_binary or host.qemu.get(m.arch) or QEMU_BINARY[m.arch]
    argv = [binary, "-name", f"guest={esc(rt.name)},debug-threads=on"]
    if rt.uuid:
        argv += ["-uuid", rt.uuid]
    fw = firmware_for(profile, host)
    fwargs = firmware.qemu_args(fw, rt.firmware_vars or "<vars>") if fw else None
    machine_opts = [*board.machine_opts, *_machine_res(profile, rt)]
    machine_opts += list(fwargs.machine_opts) if fwargs else []
    argv += ["-machine", ",".join([board.machine, *machine_opts])]
    argv += ["-accel", _accel_opts(accel, board, m.smp, host)]
    cpu = "host" if accel == "kvm" else (m.cpu or board.cpu)
    if cpu:
        argv += ["-cpu", cpu]
    argv += ["-smp", str(m.smp), "-m", f"{m.memory_mib}M"]
    # virtiofsd reads and writes guest RAM itself: it must be shared memory.
    shared = ",share=on" if _shared_ram(rt) else ""
    if profile.resources.hugepages:
        # prealloc: too few free hugepages fail the start, not the guest later (SIGBUS).
        mem_path = esc(rt.mem_path or "/dev/hugepages")
        argv += [
            "-object",
            f"memory-backend-file,id={RAM_BACKEND},size={m.memory_mib}M,mem-path={mem_path},"
            f"prealloc=on{shared}",
        ]
    elif shared:
        backend = f"memory-backend-memfd,id={RAM_BACKEND},size={m.memory_mib}M{shared}"
        if profile.resources.mem_merge is not None:
            # The machine's mem-merge applies only to the RAM QEMU makes itself.
            backend += f",merge={'on' if profile.resources.mem_merge else 'off'}"
        argv += ["-object", backend]
    argv += ["-nodefaults", "-no-user-config", "-no-reboot"]
    if fwargs:
        argv += list(fwargs.args)
    if rt.paused:
        argv.append("-S")
    argv += _display(profile)
    argv += _console(profile, rt)
    if rt.qmp:
        argv += [
            "-chardev",
            f"socket,id=qmp,path={esc(rt.qmp)},server=on,wait=off",
            "-mon",
            "chardev=qmp,mode=control",
        ]
    kernel = rt.kernel or profile.boot.kernel
    if kernel:
        argv += ["-kernel", kernel]
        initrd = rt.initrd or profile.boot.initrd
        if initrd:
            argv += ["-initrd", initrd]
        dtb = rt.dtb or profile.boot.dtb
        if dtb:
            argv += ["-dtb", dtb]
        tsc = host.tsc_khz if accel == "tcg" and board.tsc_hint else None
        argv += ["-append", kernel_cmdline(profile, rt, tsc)]
    boot = boot_indices(profile)
    argv += _disks(profile, rt, boot)
    argv += _nets(profile, rt, boot)
    argv += _tpm(profile, rt.tpm)
    if board.sound:
        # A silent backend, or QEMU opens the host's ALSA and complains on stderr.
        argv += ["-audiodev", "none,id=snd0", "-global", f"{board.sound}.audiodev=snd0"]
    if board.virtio:
        argv += ["-device", _virtio(board.virtio, "virtio-rng")]
    for i, port in enumerate(hotplug_port_ids(board) if rt.hotplug_ports else ()):
        argv += ["-device", f"pcie-root-port,id={port},chassis={i + 1}"]
    if rt.sandbox:
        # -runas needs setuid/setgid (7.2 kills QEMU with SIGSYS under elevateprivileges=deny
        # or children); once it has dropped root it cannot regain it. User-mode SMB runs smbd.
        elevate = "allow" if rt.runas else "deny"
        spawn = "allow" if any(n.smb for n in profile.nets) else "deny"
        argv += [
            "-sandbox",
            f"on,obsolete=deny,elevateprivileges={elevate},spawn={spawn},resourcecontrol=deny",
        ]
    if rt.runas:
        argv += ["-runas", rt.runas]
    argv += _shares(board, rt.shares)
    argv += _ports(board, rt.ports)
    argv += _agent(board, rt.agent)
    if rt.monitor:
        fd = rt.monitor_fd if rt.monitor_fd is not None else "<fd: supervisor monitor>"
        argv += [
            "-chardev",
            f"socket,id=qlaunch-sup,fd={fd}",
            "-mon",
            "chardev=qlaunch-sup,mode=control",
        ]
    argv += list(rt.hotplug)
    if rt.incoming:
        argv += ["-incoming", rt.incoming]
    argv += list(profile.qemu_extra)
    return argv


def _shares(board: Board, shares: tuple[Share, ...]) -> list[str]:
    argv: list[str] = []
    for i, s in enumerate(shares):
        if s.kind == "virtiofs":
            sock = esc(s.socket or f"<virtiofsd socket {i}>")
            dev = _virtio(board.virtio or "pci", "vhost-user-fs")
            argv += [
                "-chardev",
                f"socket,id=qlfs{i},path={sock}",
                "-device",
                f"{dev},chardev=qlfs{i},tag={esc(s.tag)}",
            ]
            continue
        fsdev = f"local,id=qlfs{i},path={esc(s.path)},security_model=none"
        if s.readonly:
            fsdev += ",readonly=on"
        dev = _virtio(board.virtio or "pci", "virtio-9p")
        argv += ["-fsdev", fsdev, "-device", f"{dev},fsdev=qlfs{i},mount_tag={esc(s.tag)}"]
    return argv


AGENT_PORT = "org.qemu.guest_agent.0"


def _agent(board: Board, path: str | None) -> list[str]:
    """The QEMU guest agent's channel: a virtio port the agent in the guest opens, a unix
    socket qlaunch talks to. Boards without virtio have none (their agent cannot reach us)."""
    if not path or not board.virtio:
        return []
    return [
        "-chardev",
        f"socket,id=qlagent,path={esc(path)},server=on,wait=off",
        "-device",
        _virtio(board.virtio, "virtio-serial") + ",id=qlagentser",
        "-device",
        f"virtserialport,bus=qlagentser.0,nr=1,chardev=qlagent,name={AGENT_PORT}",
    ]


def _ports(board: Board, ports: tuple[Port, ...]) -> list[str]:
    if not ports:
        return []
    argv = ["-device", _virtio(board.virtio or "pci", "virtio-serial") + ",id=qlser"]
    for nr, port in enumerate(ports, start=1):
        fd = port.fd if port.fd is not None else f"<fd: {port.name}>"
        # QEMU reopens the pipe through /proc: a chardev file backend takes a path.
        argv += [
            "-chardev",
            f"file,id=ql{port.name},path=/proc/self/fd/{fd}",
            "-device",
            f"virtserialport,bus=qlser.0,nr={nr},chardev=ql{port.name},name=qlaunch.{port.name}",
        ]
    return argv


def _machine_res(profile: Profile, rt: Runtime) -> list[str]:
    r = profile.resources
    opts = []
    if r.mem_merge is not None:
        opts.append(f"mem-merge={'on' if r.mem_merge else 'off'}")
    if r.hugepages or _shared_ram(rt):
        opts.append(f"memory-backend={RAM_BACKEND}")
    return opts


def _accel_opts(accel: str, board: Board, smp: int, host: HostFacts) -> str:
    if accel == "tcg" and board.tcg_single_thread and host.cpus and smp > host.cpus:
        return "tcg,thread=single"
    return accel


def _shared_ram(rt: Runtime) -> bool:
    return any(s.kind == "virtiofs" for s in rt.shares)


# QEMU's name for a virtio device on each transport: virtio-blk-pci, -device (mmio), -ccw (s390x).
_VIRTIO_SUFFIX = {"pci": "pci", "mmio": "device", "ccw": "ccw"}


def _virtio(transport: str, device: str) -> str:
    return f"{device}-{_VIRTIO_SUFFIX[transport]}"


def _display(profile: Profile) -> list[str]:
    if profile.display == "vnc":
        arch = profile.machine.arch
        dev = "VGA" if arch in ("x86_64", "i386") else _virtio(profile.board.virtio, "virtio-gpu")
        return ["-display", "none", "-vnc", esc(profile.vnc), "-device", dev]
    return ["-display", "none"]


def _console(profile: Profile, rt: Runtime) -> list[str]:
    if rt.console == "stdio":
        # mux with a monitor keeps QEMU's Ctrl-a x escape; signal=off hands Ctrl-c to the guest.
        chardev = "stdio,id=console,mux=on,signal=off"
        mon = ["-mon", "chardev=console,mode=readline"]
    else:
        chardev = f"socket,id=console,path={esc(rt.console)},server=on,wait=off"
        mon = []
    if rt.console_log:
        chardev += f",logfile={esc(rt.console_log)},logappend=on"
    board = profile.board
    serials = ["null"] * (1 + board.extra_serials)
    serials[board.console_serial] = "chardev:console"
    argv = ["-chardev", chardev]
    for s in serials:
        argv += ["-serial", s]
    return argv + mon


def firmware_for(profile: Profile, host: HostFacts) -> firmware.FirmwareChoice | None:
    """The firmware a launch boots with; None: the kernel boots directly (QEMU's own)."""
    want = profile.boot.firmware
    arch = profile.machine.arch
    if want == "auto":
        has_disk = any(not d.cloud_init_seed for d in profile.disks)
        chosen = firmware.resolve_auto(arch, kernel=bool(profile.boot.kernel), disk=has_disk)
        if chosen is None:
            return None
        want = chosen
    return firmware.select(host.firmware, arch, profile.board.machine, want)


def boot_indices(profile: Profile) -> dict[tuple[str, int], int]:
    """[boot] order as bootindex values: ("disk", i) for [[disk]] i, ("net", i) for NIC i."""
    out: dict[tuple[str, int], int] = {}
    for kind in profile.boot.order:
        if kind == "net":
            items = [("net", i) for i in range(len(profile.nets))]
        else:
            items = [
                ("disk", i)
                for i, d in enumerate(profile.disks)
                if d.media == kind and not d.cloud_init_seed and d.interface != "sd"
            ]
        for item in items:
            # From 1: QEMU gives a -kernel bootindex 0 (its linuxboot option ROM).
            out[item] = len(out) + 1
    return out


# TPM devices per machine: CRB where the machine has ACPI (x86), TIS on the platform bus (virt).
TPM_DEVICES = {"q35": "tpm-crb", "pc": "tpm-crb", "virt": "tpm-tis-device"}


def _tpm(profile: Profile, sock: str | None) -> list[str]:
    if not profile.machine.tpm:
        return []
    dev = TPM_DEVICES.get(profile.board.machine)
    if dev is None:
        raise UsageError(
            f"{profile.source}: [machine] tpm: QEMU has no TPM for machine {profile.board.machine}",
            hint=f"machines with a TPM: {', '.join(sorted(TPM_DEVICES))}",
        )
    return [
        "-chardev",
        f"socket,id=qltpm,path={esc(sock or '<tpm socket>')}",
        "-tpmdev",
        "emulator,id=qltpm0,chardev=qltpm",
        "-device",
        f"{dev},tpmdev=qltpm0",
    ]


def _disks(profile: Profile, rt: Runtime, boot: dict[tuple[str, int], int]) -> list[str]:
    board = profile.board
    argv: list[str] = []
    have_scsi = False
    for i, d in enumerate(profile.disks):
        path = rt.disk_paths[i] if i < len(rt.disk_paths) and rt.disk_paths[i] else d.path
        drive = _drive_opts(d, path)
        if d.interface == "sd":
            argv += ["-drive", f"{drive},if=sd,index={i}"]
            continue
        argv += ["-drive", f"{drive},if=none,id=disk{i}"]
        dev = f"drive=disk{i},id=disk{i}-dev"
        if ("disk", i) in boot:
            dev += f",bootindex={boot['disk', i]}"
        cdrom = d.media == "cdrom"
        if cdrom and d.interface == "ide":
            argv += ["-device", f"ide-cd,{dev}"]
        elif cdrom or d.interface == "scsi":
            # A CD-ROM goes on virtio-scsi unless IDE is asked for: Debian's cloud kernel has
            # no AHCI driver, so an IDE CD-ROM on q35 would be invisible to it.
            if not have_scsi:
                argv += ["-device", _virtio(board.virtio or "pci", "virtio-scsi") + ",id=scsi0"]
                have_scsi = True
            argv += ["-device", f"{'scsi-cd' if cdrom else 'scsi-hd'},{dev},bus=scsi0.0"]
        elif d.interface == "ide":
            argv += ["-device", f"ide-hd,{dev}"]
        else:
            argv += ["-device", f"{_virtio(board.virtio, 'virtio-blk')},{dev}"]
    return argv


def _drive_opts(d: Disk, path: str) -> str:
    # file.driver=file pins the protocol, so a path like "nbd:x" or "json:{...}" stays a path.
    opts = [f"file.driver=file,file.filename={esc(path)}", f"format={d.format}", f"cache={d.cache}"]
    if d.readonly:
        opts.append("readonly=on")
    if d.media == "cdrom":
        opts.append("media=cdrom")
    if d.snapshot:
        opts.append("snapshot=on")
    return ",".join(opts)


def _nets(profile: Profile, rt: Runtime, boot: dict[tuple[str, int], int]) -> list[str]:
    board = profile.board
    argv: list[str] = []
    for i, n in enumerate(profile.nets):
        mac = n.mac or stable_mac(rt.name, i)
        backend = _netdev(n, rt, i)
        model = n.model or board.nic_model
        assert model is not None  # validated: boards without a NIC need an explicit model
        if model in ("lan9118", "smc91c111"):
            # On-board NICs are created by the board from -nic, not with -device.
            argv += ["-nic", f"{backend},model={model},mac={mac}"]
        else:
            argv += [
                "-netdev",
                f"{backend},id=net{i}",
                "-device",
                f"{model},netdev=net{i},mac={mac},id=net{i}-dev"
                + (f",bootindex={boot['net', i]}" if ("net", i) in boot else ""),
            ]
    return argv


def _netdev(n: Net, rt: Runtime, i: int) -> str:
    if n.mode == "user":
        opts = ["user"]
        opts += [f"hostfwd={esc(f)}" for f in n.forward]
        if n.smb:
            opts.append(f"smb={esc(n.smb)}")
        return ",".join(opts)
    tap = rt.taps[i] if i < len(rt.taps) else None
    if tap is None:
        # For display (qlaunch cmdline): the tap is made, and its fd passed, at launch.
        return f"tap,fd=<fd: tap on {n.network or n.bridge}>"
    return f"tap,{tap}"
