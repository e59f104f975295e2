"""`qlaunch exec`: boot a kernel, run one command in it, report what happened, exit with its code.

`prepare` turns an ExecSpec into a Plan (profile, kernel, initramfs, argv wiring) and `execute`
runs the plan: QEMU in the foreground, the command's stdout and stderr streamed live through
virtio console ports (or, where a board or kernel has none, framed on the serial console), the
kernel console scanned for panics, oopses and hangs, and watched by an overall timeout and a
no-output watchdog. `exec` is the pytest-friendly face over both.

Why virtio console ports: they exist on every virtio board of every architecture here (x86 q35,
microvm, ARM virt), separate stdout from stderr from the kernel's own messages, and carry binary
data at virtqueue speed. Extra UARTs would cover x86 only (ARM virt has one PL011, microvm one
ISA serial). A guest write to a port returns only once QEMU took the bytes, so when the command
has ended its output is already in the host's pipe.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import selectors
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol

from qlaunch.boot import kernelcheck, protocol
from qlaunch.config import boards
from qlaunch.errors import AssetError, ProfileError, QemuError, QlaunchError, UsageError
from qlaunch.storage import outfile
from qlaunch.testloop import console as con
from qlaunch.testloop import trace

log = logging.getLogger(__name__)

DEFAULT_PROFILE = kernelcheck.PROFILE_FOR  # each arch's shipped profile
WATCHDOG_BASE = 30.0  # seconds of silence before the watchdog fires, before TCG scaling
TCG_SCALE = 10  # syzkaller scales its timeouts about tenfold under TCG
EXCERPT_WAIT = 2.0  # seconds of console silence after a failure before the excerpt is final
LOG_KEEP = 20  # console logs kept in state_dir()/exec-logs
MAX_LOG_BYTES = 64 << 20  # a runaway console stops being logged (the tail is still kept)

PORTS = protocol.PORTS


# --- what to run --------------------------------------------------------------------------


@dataclass(frozen=True)
class Share:
    host: Path
    guest: str
    readonly: bool = False


def parse_share(text: str, cwd: Path | None = None) -> Share:
    """HOST[:GUEST][:ro|rw]. GUEST defaults to the host directory's absolute path, so paths
    that scripts print or take mean the same inside and out."""
    parts = text.split(":")
    readonly = False
    if len(parts) > 1 and parts[-1] in ("ro", "rw"):
        readonly = parts.pop() == "ro"
    if not parts[0] or len(parts) > 2:
        raise UsageError(
            f"--share {text!r}: expected HOST[:GUEST][:ro]",
            hint="e.g. --share . or --share out:/out",
        )
    host = ((cwd or Path.cwd()) / Path(parts[0]).expanduser()).resolve()
    if not host.is_dir():
        raise UsageError(f"--share {text!r}: {host} is not a directory")
    guest = parts[1] if len(parts) == 2 and parts[1] else str(host)
    g = PurePosixPath(guest)
    if not g.is_absolute() or ".." in g.parts or any(c.isspace() for c in guest):
        raise UsageError(
            f"--share {text!r}: the guest path must be absolute, without '..' or spaces"
        )
    return Share(host, str(g), readonly)


@dataclass(frozen=True)
class ExecSpec:
    """Everything `qlaunch exec` takes; the CLI, the matrix and `exec()` all fill one in."""

    cmd: tuple[str, ...]
    kernel: str | None = None  # a path, asset:SET or asset:SET/kernel; None: the profile's
    arch: str | None = None
    profile: str | None = None
    sets: tuple[str, ...] = ()
    modules: str | None = None  # --modules DIR
    module: tuple[str, ...] = ()  # --module NAME: packed for the guest's modprobe
    shares: tuple[Share, ...] = ()
    share_type: str = "auto"  # --share-type: auto (virtiofs where it can be had), virtiofs, 9p
    cpus: int | None = None
    memory: str | None = None
    append: str = ""
    timeout: float | None = None
    watchdog: float | None = None  # seconds before TCG scaling; None: WATCHDOG_BASE
    fail_on_warn: bool = False
    boot_failure_exit: int = protocol.EXIT_BOOT_FAILURE
    console_log: str | None = None
    name: str | None = None  # a label (matrix rows, log names)


@dataclass
class Result:
    """What one exec did. `code` is what `qlaunch exec` exits with."""

    name: str
    code: int
    stdout: str
    stderr: str
    console: str
    verdict: str  # exit, panic, oops, hang, warning, timeout, boot-failure, no-status
    message: str  # one line for people; "" when the command's own status is the answer
    excerpt: list[str] = field(default_factory=list)
    console_tail: list[str] = field(default_factory=list)
    console_log: str | None = None
    duration: float = 0.0
    command_status: int | None = None
    profile: str = ""
    kernel: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.code == 0

    def report(self) -> list[str]:
        """The lines `qlaunch exec` prints on stderr about a failure (none for a plain exit)."""
        if self.verdict == "exit":
            return []
        lines = [self.message]
        if self.excerpt:
            lines += ["  " + x for x in self.excerpt]
        elif self.console_tail:
            lines.append(f"the last {len(self.console_tail)} console lines:")
            lines += ["  " + x for x in self.console_tail]
        else:
            lines.append("the console printed nothing (the kernel runs with `quiet`)")
        if self.console_log:
            lines.append(f"console log: {self.console_log}")
        return lines

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "profile": self.profile,
            "kernel": self.kernel,
            "code": self.code,
            "verdict": self.verdict,
            "message": self.message,
            "command_status": self.command_status,
            "duration_s": round(self.duration, 3),
            "excerpt": self.excerpt,
            "console_tail": self.console_tail,
            "console_log": self.console_log,
            "stdout": self.stdout,
            "stderr": self.stderr,
        }


class Sink(Protocol):
    """Where a run's output goes as it arrives."""

    def stdout(self, data: bytes) -> None: ...
    def stderr(self, data: bytes) -> None: ...
    def console(self, data: bytes) -> None: ...
    def note(self, message: str) -> None: ...


class CaptureSink:
    """Keeps everything; the console is shown nowhere (it is in the Result anyway)."""

    def __init__(self, note: Callable[[str], None] | None = None) -> None:
        self._note = note
        self.notes: list[str] = []

    def stdout(self, data: bytes) -> None:
        pass

    def stderr(self, data: bytes) -> None:
        pass

    def console(self, data: bytes) -> None:
        pass

    def note(self, message: str) -> None:
        self.notes.append(message)
        if self._note:
            self._note(message)


# --- preparing ----------------------------------------------------------------------------


@dataclass
class Plan:
    name: str
    profile: Any  # qlaunch.config.profile.Profile
    host: Any  # qlaunch.launch.host.HostFacts
    kernel: str
    kernel_label: str
    initrd: str
    dtb: str | None
    transport: str  # ports or console
    append: tuple[str, ...]
    shares: tuple[Any, ...]  # qlaunch.launch.argv.Share: 9p exports and virtiofs devices
    timeout: float | None
    watchdog: float
    scale: int
    fail_on_warn: bool
    boot_failure_exit: int
    console_log: Path
    console_log_default: bool  # ours, in the state dir (pruned), not the user's --console-log
    workdir: Path
    notes: list[str] = field(default_factory=list)
    disk_paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Kernel:
    path: Path
    asset: Any  # assets.AssetSet | None
    label: str


def _resolve_kernel(ref: str | None, profile_kernel: str | None) -> _Kernel:
    from qlaunch import paths
    from qlaunch.boot import assets
    from qlaunch.launch import resolve

    ref = ref or profile_kernel
    if not ref:
        raise UsageError("no kernel: give --kernel PATH or asset:SET, or a profile that has one")
    if ref.startswith("asset:"):
        body = ref[len("asset:") :]
        set_name, _, rel = body.partition("/")
        aset = assets.require(set_name)
        if rel in ("", "kernel"):
            return _Kernel(aset.kernel, aset, f"asset:{set_name}")
        path = Path(resolve.asset_path(ref, paths.cache_dir(), "--kernel"))
        return _Kernel(path, None, ref)
    path = outfile.require_file(Path(ref).expanduser(), "--kernel")
    # The asset cache's own kernel given by path still brings its modules and config.
    real = path.resolve()
    root = assets.assets_root().resolve()
    if real.parent.parent == root and real.name == "kernel":
        with contextlib.suppress(QlaunchError):
            aset = assets.require(real.parent.name)
            return _Kernel(aset.kernel, aset, str(path))
    return _Kernel(path, None, str(path))


def _busybox_set(arch: str) -> Any:
    """An asset set of this arch, for busybox (every set of an arch has the same one)."""
    from qlaunch.boot import assets

    names = [s.name for s in assets.ASSET_SETS.values() if s.arch == arch]
    for n in names:
        with contextlib.suppress(AssetError):
            return assets.require(n)
    raise AssetError(
        f"qlaunch's initramfs needs busybox for {arch} from an asset set, and none is fetched",
        hint=f"run: qlaunch assets fetch --arch {names[0] if names else arch}",
    )


def _check_arch(k: _Kernel, detected: str | None, want: str, why: str) -> None:
    from qlaunch.boot import kernel as kmod

    if detected is not None and detected != want:
        fix = f"--profile {DEFAULT_PROFILE[detected]}" if why.startswith("profile") else None
        if detected not in DEFAULT_PROFILE:
            fix = None
        raise UsageError(
            f"{k.label} is {kmod.describe(detected)}, but {why} is {want}",
            hint=f"use {fix or f'--arch {detected}'}, or a kernel built for {want}",
        )


def _load_profile(spec: ExecSpec, k: _Kernel | None, arch: str | None) -> Any:
    from qlaunch.config import profile as pmod

    name = spec.profile or DEFAULT_PROFILE[arch or "x86_64"]
    path = pmod.find(name)
    data = pmod.load_raw(path)
    boot = data.setdefault("boot", {})
    machine = data.setdefault("machine", {})
    file_data = copy.deepcopy(data)
    if boot.get("initrd") not in (None, "qlaunch"):
        raise ProfileError(
            f"{path}: [boot] initrd: exec boots qlaunch's own initramfs, not {boot['initrd']!r}",
            hint="use a profile without its own initrd",
        )
    boot["initrd"] = "qlaunch"
    if k is not None:
        if k.asset is not None:
            boot["kernel"] = f"asset:{k.asset.name}/kernel"
        else:
            boot["kernel"] = str(k.path.resolve())
    if spec.cpus is not None:
        machine["smp"] = spec.cpus
    if spec.memory is not None:
        machine["memory"] = spec.memory
    if spec.append:
        boot["append"] = f"{boot.get('append', '')} {spec.append}".strip()
    if spec.sets:
        data = pmod.apply_sets(data, list(spec.sets))
    # A bad --cpus, --memory or --set is named as such, not blamed on the profile file.
    flags = [f"--cpus {spec.cpus}"] if spec.cpus is not None else []
    flags += [f"--memory {spec.memory}"] if spec.memory is not None else []
    flags += [f"--set {s}" for s in spec.sets]
    label = flags[0] if len(flags) == 1 else "--cpus, --memory or --set"
    return pmod.build_blaming(file_data, data, name=path.stem, path=path, label=label)


def _driver(
    option: str,
    module: str,
    have: set[str],
    builtin: set[str],
    config: Path | None,
    tree_known: bool,
) -> str:
    """built-in, module, missing or unknown."""
    from qlaunch.boot import assets

    if module in have:
        return "module"
    if module in builtin:
        return "built-in"
    if config is not None:
        state = assets.kernel_has(config, option)
        return "built-in" if state == "y" else "missing"
    return "missing" if tree_known else "unknown"


def _missing_line(what: str, options: list[str], modules: list[str], where: str | None) -> str:
    opts = " and ".join(f"CONFIG_{o}" for o in options)
    verb = "is" if len(options) == 1 else "are"
    mods = ", ".join(f"{m}.ko" for m in modules)
    source = f"{where} has no {mods}" if where else f"no --modules DIR gives {mods}"
    return f"{what}: {opts} {verb} not built into this kernel, and {source}"


def prepare(spec: ExecSpec, workdir: Path) -> Plan:
    """Everything up to QEMU's argv: checks, profile, initramfs. Files go to workdir."""
    from qlaunch.launch import argv as argvmod
    from qlaunch.launch import host as hostmod

    _check_spec(spec)
    trace.mark("exec: prepare")
    k, prof = _kernel_and_profile(spec)
    trace.mark("kernel and profile")
    host = hostmod.probe()
    trace.mark("host probed")
    accel, accel_note = argvmod.choose_accel(prof, host)
    scale = TCG_SCALE if accel == "tcg" else 1
    notes = [accel_note] if accel_note else []
    busybox_set = k.asset if k.asset is not None else _busybox_set(prof.machine.arch)
    tree = _kernel_tree(spec, k, workdir, notes)
    wanted = _wanted_shares(spec, prof)
    shares, share_mods = _share_wiring(prof, tree, host, wanted, workdir, notes)
    transport, load = _drivers(spec, prof, tree, notes, share_mods)
    trace.mark(f"drivers: transport {transport}, modules {' '.join(load) or 'none'}")
    initrd = _initrd(spec, prof, k, tree, busybox_set, load, workdir, wanted)
    trace.mark("initramfs ready")
    append = protocol.exec_kernel_args(transport, spec.fail_on_warn)
    if trace.enabled():
        append = (*append, "qlaunch.trace")
    dtb = _board_dtb(prof, busybox_set, notes)
    name = spec.name or prof.name
    log.debug("exec %s: kernel %s, transport %s, modules %s", name, k.label, transport, load)
    return Plan(
        name=name,
        profile=prof,
        host=host,
        kernel=str(k.path),
        kernel_label=k.label,
        initrd=str(initrd),
        dtb=dtb,
        transport=transport,
        append=tuple(append),
        shares=shares,
        timeout=spec.timeout,
        watchdog=(spec.watchdog if spec.watchdog is not None else WATCHDOG_BASE) * scale,
        scale=scale,
        fail_on_warn=spec.fail_on_warn,
        boot_failure_exit=spec.boot_failure_exit,
        console_log=Path(spec.console_log) if spec.console_log else _log_path(name),
        console_log_default=not spec.console_log,
        workdir=workdir,
        notes=notes,
        disk_paths=_disk_paths(prof, workdir),
    )


def _check_spec(spec: ExecSpec) -> None:
    if not spec.cmd:
        raise UsageError("exec needs a command after --", hint="qlaunch exec -- uname -r")
    if spec.console_log:
        parent = Path(spec.console_log).parent
        if not parent.is_dir():
            raise UsageError(f"--console-log {spec.console_log}: {parent} is not a directory")
        if Path(spec.console_log).is_dir():
            raise UsageError(f"--console-log {spec.console_log} is a directory, not a file")
    if spec.share_type not in ("auto", "virtiofs", "9p"):
        raise UsageError(f"--share-type {spec.share_type}: expected auto, virtiofs or 9p")
    if spec.arch is not None and spec.arch not in DEFAULT_PROFILE:
        raise UsageError(f"--arch {spec.arch}: expected one of {', '.join(DEFAULT_PROFILE)}")


def _kernel_and_profile(spec: ExecSpec) -> tuple[_Kernel, Any]:
    """The kernel and the profile it boots on, each checked against the other's arch."""
    from qlaunch.boot import kernel as kmod

    k: _Kernel | None = None
    detected: str | None = None
    if spec.kernel is not None:
        k = _resolve_kernel(spec.kernel, None)
        detected = k.asset.arch if k.asset is not None else kmod.detect_arch(k.path)
        if spec.arch:
            _check_arch(k, detected, spec.arch, "--arch")
    arch = spec.arch or detected
    if spec.profile is None and arch is None and k is not None:
        raise UsageError(
            f"cannot tell which architecture {k.label} is for",
            hint=f"give --arch {'|'.join(boards.ARCHES)}",
        )
    prof = _load_profile(spec, k, arch)
    if k is None:
        k = _resolve_kernel(None, prof.boot.kernel)
        detected = k.asset.arch if k.asset is not None else kmod.detect_arch(k.path)
    why = f"profile {prof.name}'s board ({prof.machine.machine})"
    _check_arch(k, detected, prof.machine.arch, why if spec.profile else "the arch")
    return k, prof


@dataclass(frozen=True)
class _Tree:
    """The modules the guest can load, and the config that says what is built in."""

    mod_dir: Path | None
    where: str | None  # how messages name where the modules came from
    config: Path | None
    release: str | None
    have: set[str]
    builtin: set[str]

    def driver(self, option: str, module: str) -> str:
        return _driver(option, module, self.have, self.builtin, self.config, bool(self.mod_dir))


def _kernel_tree(spec: ExecSpec, k: _Kernel, workdir: Path, notes: list[str]) -> _Tree:
    from qlaunch.boot import initramfs
    from qlaunch.boot import kernel as kmod

    release = k.asset.version if k.asset is not None else kmod.kernel_release(k.path)
    mod_dir: Path | None
    if spec.modules:
        mod_dir = kmod.find_modules_dir(spec.modules, release)
        if release is not None and mod_dir.parent.name == "modules" and mod_dir.name != release:
            # The one version there is taken anyway; say why its modules will fail to load.
            notes.append(
                f"--modules {spec.modules} holds modules for {mod_dir.name}, but the kernel is "
                f"{release}: they will not load (make modules_install for this kernel?)"
            )
        release = mod_dir.name if release is None else release
        where: str | None = f"--modules {spec.modules}"
    elif k.asset is not None:
        mod_dir = k.asset.modules
        where = f"asset set {k.asset.name}"
    else:
        mod_dir = None
        where = None
    config = k.asset.config if k.asset is not None else None
    if config is None:
        config = kmod.find_config(k.path, mod_dir, release, workdir)
    have: set[str] = set()
    builtin: set[str] = set()
    if mod_dir is not None:
        have, builtin = initramfs.module_names(mod_dir)
    return _Tree(mod_dir, where, config, release, have, builtin)


def _needs(tree: _Tree, needed: list[tuple[str, str]]) -> tuple[list[str], list[tuple[str, str]]]:
    """(modules to load, (option, module) pairs that are missing) for these drivers."""
    states = [tree.driver(o, m) for o, m in needed]
    load = [m for (_, m), s in zip(needed, states, strict=True) if s == "module"]
    missing = [n for n, s in zip(needed, states, strict=True) if s == "missing"]
    return load, missing


def _drivers(
    spec: ExecSpec, prof: Any, tree: _Tree, notes: list[str], share_mods: list[str]
) -> tuple[str, list[str]]:
    """The output transport (virtio ports, else framed console lines) and the modules the
    initramfs loads: the shares', and those for the profile's disks and NICs."""
    from qlaunch.boot import initramfs

    board = prof.board
    load = list(share_mods)
    transport = "console"
    if board.virtio:
        mods, missing = _needs(tree, [_bus(board), ("VIRTIO_CONSOLE", "virtio_console")])
        if missing:
            notes.append(
                _missing_line(
                    "no virtio console",
                    [o for o, _ in missing],
                    [m for _, m in missing],
                    tree.where,
                )
                + "; stdout and stderr come framed over the serial console"
            )
        elif not mods:
            transport = "ports"
        # A virtio console that is a module costs its insmods, the port discovery and a PCI
        # device at every boot (0.1 to 0.2 s of a 2 s TCG run); the framed serial console
        # costs none of that and keeps stdout, stderr and the status apart just the same.
    if prof.disks or prof.nets:
        defaults = initramfs.DEFAULT_MODULES[prof.machine.arch]
        load += [m for m in defaults if m in tree.have and m not in load]
    load += [m for m in prof.boot.modules if m not in load]
    for name in spec.module:
        if tree.mod_dir is None:
            raise UsageError(f"--module {name} needs --modules DIR (or an asset kernel)")
    return transport, load


def _bus(board: Any) -> tuple[str, str]:
    return boards.VIRTIO_BUS[board.virtio or "pci"]


@dataclass(frozen=True)
class _Wanted:
    """One share exec is asked for: a --share, or the profile's [[share]]."""

    share: Share
    tag: str
    want: str  # auto, virtiofs, 9p
    label: str  # how messages name it


def _wanted_shares(spec: ExecSpec, prof: Any) -> list[_Wanted]:
    out = []
    for s in prof.shares:
        host = Path(s.path).expanduser().resolve()
        if not host.is_dir():
            raise UsageError(f"{prof.source}: [[share]] {s.tag}: {host} is not a directory")
        out.append(_Wanted(Share(host, s.guest, s.readonly), s.tag, s.type, f"[[share]] {s.tag}"))
    for i, s in enumerate(spec.shares):
        out.append(_Wanted(s, f"qlshare{i}", spec.share_type, f"--share {s.host}"))
    return out


def _share_wiring(
    prof: Any,
    tree: _Tree,
    host: Any,
    wanted: list[_Wanted],
    workdir: Path,
    notes: list[str],
) -> tuple[tuple[Any, ...], list[str]]:
    """Each share over virtiofs where the host and the kernel allow it, else over 9p (and one
    line that says why); the modules the guest loads to mount them."""
    from qlaunch.launch import argv as argvmod
    from qlaunch.launch import shares as sharemod

    if not wanted:
        return (), []
    board = prof.board
    if not board.virtio:
        raise UsageError(
            f"--share needs virtio, and {prof.machine.machine} has no virtio transport",
            hint="use a virt board (aarch64-virt, arm-virt) or an x86_64 profile",
        )
    bus = _bus(board)
    vfs_mods, vfs_missing = _needs(tree, [bus, ("FUSE_FS", "fuse"), ("VIRTIO_FS", "virtiofs")])
    p9 = [bus, ("NET_9P", "9pnet"), ("NET_9P_VIRTIO", "9pnet_virtio"), ("9P_FS", "9p")]
    p9_mods, p9_missing = _needs(tree, p9)
    kernel_why = None
    if vfs_missing:
        opts = [o for o, _ in vfs_missing]
        kernel_why = _missing_line(
            "this kernel has no virtiofs", opts, [m for _, m in vfs_missing], tree.where
        )
    out: list[Any] = []
    load: list[str] = []
    fallbacks: dict[str, list[str]] = {}
    for i, w in enumerate(wanted):
        kind, why = sharemod.choose(w.want, w.share.readonly, host)
        if kind == "virtiofs" and kernel_why:
            if w.want == "virtiofs":
                raise UsageError(f"{w.label}: {kernel_why}", hint="--share-type 9p or auto")
            kind, why = "9p", kernel_why
        if kind == "9p" and p9_missing:
            opts = [o for o, _ in p9_missing]
            hint = "build the kernel with " + " ".join(f"CONFIG_{o}=y" for o in opts)
            if why:
                hint = f"not virtiofs either: {why}"
            raise UsageError(
                _missing_line(f"{w.label} needs 9p", opts, [m for _, m in p9_missing], tree.where),
                hint=hint,
            )
        if why and w.want == "auto" and not w.share.readonly:  # :ro is 9p by design
            fallbacks.setdefault(why, []).append(w.label)
        mods = vfs_mods if kind == "virtiofs" else p9_mods
        load += [m for m in mods if m not in load]
        sock = sharemod.socket_path(str(workdir), i) if kind == "virtiofs" else None
        out.append(
            argvmod.Share(
                w.tag,
                str(w.share.host),
                w.share.readonly,
                kind=kind,
                socket=sock,
                guest=w.share.guest,
            )
        )
    for why, labels in fallbacks.items():
        notes.append(f"{', '.join(labels)}: over 9p, not virtiofs: {why}")
    fd_note = sharemod.fd_limit_note(sharemod.fd_limit())
    if fd_note and any(s.kind == "virtiofs" for s in out):
        notes.append(fd_note)
    return tuple(out), load


def _initrd(
    spec: ExecSpec,
    prof: Any,
    k: _Kernel,
    tree: _Tree,
    busybox_set: Any,
    load: list[str],
    workdir: Path,
    wanted: list[_Wanted],
) -> Path:
    """qlaunch's initramfs for this kernel (cached by content), with the command appended."""
    from qlaunch.boot import assets, initramfs

    modules = tree.mod_dir if tree.mod_dir is not None else _empty_modules_tree()
    # The initramfs builder takes an asset set; a tree of the user's is one without a manifest.
    own = k.asset is not None and modules == k.asset.modules
    aset = assets.AssetSet(
        name=k.asset.name if own and k.asset else "custom",
        arch=prof.machine.arch,
        version=tree.release or "unknown",
        root=k.asset.root if own and k.asset else modules,
        kernel=k.path,
        config=tree.config or modules / "config",
        modules=modules,
        dtbs=busybox_set.dtbs,
        busybox=busybox_set.busybox,
    )
    base = initramfs.build_initramfs(aset, load, pack=spec.module)
    return initramfs.initrd_with_command(
        base,
        list(spec.cmd),
        workdir / "initrd.cpio.gz",
        workdir=_guest_cwd([w.share for w in wanted]),
    )


def _board_dtb(prof: Any, busybox_set: Any, notes: list[str]) -> str | None:
    from qlaunch import paths
    from qlaunch.launch import resolve

    dtb = resolve.refs(prof, paths.cache_dir()).dtb
    if dtb is None and prof.board.dtb:
        # A board that needs a DTB, booting a kernel that is not an asset: the Debian one for
        # the board usually fits a mainline build; say so, since it may not.
        dtb = str(busybox_set.dtbs / prof.board.dtb)
        notes.append(
            f"{prof.machine.machine} needs a device tree: using {dtb} "
            "(--set boot.dtb=PATH for your build's own)"
        )
    if dtb and not Path(dtb).is_file():
        raise AssetError(f"{prof.source}: [boot] dtb: {dtb} is not there")
    return dtb


def _disk_paths(prof: Any, workdir: Path) -> tuple[str, ...]:
    if not prof.disks:
        return ()
    # Imported only here: it pulls in image and seed handling that most runs never need.
    from qlaunch.launch import disks

    return disks.prepare_disks(prof, workdir)


def _guest_cwd(shares: Sequence[Share]) -> str:
    """The host's working directory as the guest sees it, when a share holds it; else /."""
    cwd = Path.cwd().resolve()
    for s in shares:
        if cwd == s.host or s.host in cwd.parents:
            return str(PurePosixPath(s.guest) / cwd.relative_to(s.host))
    return "/"


def _empty_modules_tree() -> Path:
    from qlaunch import paths

    d = paths.cache_dir() / "no-modules"
    if not (d / "modules.dep").is_file():
        d.mkdir(parents=True, exist_ok=True)
        (d / "modules.dep").write_text("")
    return d


def _log_path(name: str) -> Path:
    from qlaunch import paths

    stamp = time.strftime("%Y%m%d-%H%M%S")
    d = paths.state_dir() / "exec-logs"
    return d / f"{stamp}-{name}-{os.getpid()}-{time.monotonic_ns() % 100000}.log"


def _make_log_dir(log: Path, default: bool) -> None:
    """The console log's directory; the default one keeps the newest LOG_KEEP logs."""
    if not default:
        return  # the user's --console-log: its directory must exist, as for any output file
    d = log.parent
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Parallel runs prune at the same time: a log may vanish between listing and stat.
    logs = []
    for p in d.glob("*.log"):
        with contextlib.suppress(FileNotFoundError):
            logs.append((p.stat().st_mtime, p))
    logs.sort()
    for _, old in logs[: max(0, len(logs) - LOG_KEEP + 1)]:
        old.unlink(missing_ok=True)


def plan_exec(spec: ExecSpec) -> Any:
    """What `exec` would run (qlaunch.launch.plan.LaunchPlan), refused as `exec` refuses it,
    with placeholders for its ports and work directory (`qlaunch cmdline --for exec`)."""
    import tempfile

    from qlaunch.launch import plan as planmod

    with tempfile.TemporaryDirectory(prefix="qlaunch-cmdline-") as tmp:
        p = prepare(spec, Path(tmp))
        rt = planmod.wire(
            "exec",
            p.name,
            kernel=p.kernel,
            initrd=p.initrd,
            dtb=p.dtb,
            disk_paths=p.disk_paths,
            ports=None if p.transport == "ports" else (),
            shares=p.shares,
            exec_append=p.append,
        )
        launch = planmod.build(p.profile, p.host, "exec", rt)
    return planmod.relocate(launch, tmp, planmod.TMP)


# --- running ------------------------------------------------------------------------------


@dataclass
class _Stream:
    fd: int
    kind: str  # console, qemu-stderr, stdout, stderr, status


def execute(plan: Plan, sink: Sink, *, show_console: bool = False) -> Result:
    from qlaunch.launch import extras
    from qlaunch.launch import plan as planmod
    from qlaunch.launch.argv import Port
    from qlaunch.spawn import spawn

    for n in plan.notes:
        sink.note(n)
    read_ends: dict[str, int] = {}
    write_ends: list[int] = []
    ports: list[Port] = []
    stack = contextlib.ExitStack()  # helpers (swtpm) run as long as QEMU does
    try:
        if plan.transport == "ports":
            for port in PORTS:
                r, w = os.pipe()
                read_ends[port] = r
                write_ends.append(w)
                ports.append(Port(port, w))
        with _nics(plan.profile) as nics:
            rt = planmod.wire(
                "exec",
                plan.name,
                workdir=str(plan.workdir),
                kernel=plan.kernel,
                initrd=plan.initrd,
                dtb=plan.dtb,
                disk_paths=plan.disk_paths,
                taps=nics.taps if nics else (),
                nic_append=nics.append if nics else (),
                ports=tuple(ports),
                shares=plan.shares,
                exec_append=plan.append,
            )
            launch = planmod.build(plan.profile, plan.host, "exec", rt)
            argv = list(launch.argv)
            extras.make_files(plan.profile, plan.host, rt)
            stack.enter_context(extras.running(launch.helpers))
            trace.mark("QEMU starts")
            try:
                proc = spawn(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    pass_fds=[*write_ends, *(nics.fds if nics else [])],
                    # A SIGKILLed qlaunch must not leave its guest running on. Only from the
                    # main thread: it needs preexec_fn, which is unsafe with threads (matrix
                    # runs hung in the child), and the signal follows the spawning thread.
                    die_with_parent=threading.current_thread() is threading.main_thread(),
                )
            except FileNotFoundError:
                raise QemuError(
                    f"{argv[0]} is not installed",
                    hint="apt-get install -y qemu-system-x86 qemu-system-arm",
                ) from None
        for w in write_ends:
            os.close(w)
        write_ends.clear()
        with _RUNNING_LOCK:
            _RUNNING[threading.current_thread()] = proc
        try:
            return _Driver(plan, sink, proc, read_ends, show_console).run()
        finally:
            with _RUNNING_LOCK:
                _RUNNING.pop(threading.current_thread(), None)
    finally:
        stack.close()
        for fd in [*write_ends, *read_ends.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)


# Each thread drives one QEMU at a time: which, so that an interrupted matrix can end its runs.
_RUNNING: dict[threading.Thread, subprocess.Popen[bytes]] = {}
_RUNNING_LOCK = threading.Lock()


def kill_runs(threads: set[threading.Thread]) -> None:
    """SIGKILL the QEMU that each of these threads is driving; their runs then end at once."""
    with _RUNNING_LOCK:
        for t in threads:
            proc = _RUNNING.get(t)
            if proc is not None and proc.poll() is None:
                proc.kill()


@contextlib.contextmanager
def _nics(profile: Any) -> Iterator[Any]:
    """Taps for profiles with bridged networks; user-mode and no networking need nothing."""
    if not any(n.mode not in ("user",) for n in profile.nets):
        yield None
        return
    from qlaunch.net import attach, netns

    with attach.nics_for(profile, profile.name, netns.from_env(None)) as nics:
        yield nics


class _Driver:
    """The read loop: every pipe at once, deadlines between reads, the verdict at the end."""

    def __init__(
        self,
        plan: Plan,
        sink: Sink,
        proc: subprocess.Popen[bytes],
        ports: dict[str, int],
        show_console: bool,
    ) -> None:
        self.plan = plan
        self.sink = sink
        self.proc = proc
        self.show_console = show_console
        self.scanner = con.ConsoleScanner(fail_on_warn=plan.fail_on_warn)
        self.streams: dict[int, str] = {}
        assert proc.stdout is not None and proc.stderr is not None
        self.streams[proc.stdout.fileno()] = "console"
        self.streams[proc.stderr.fileno()] = "qemu-stderr"
        for port, fd in ports.items():
            self.streams[fd] = port
        self.out = bytearray()
        self.err = bytearray()
        self.console = bytearray()
        self.qemu_err = bytearray()
        self.status_buf = bytearray()
        self.start = time.monotonic()
        self.last_output = self.start
        self.last_console = self.start
        self.ended_by: str | None = None  # why we stopped QEMU: timeout, watchdog, finding, ...
        self.term_at: float | None = None
        self.finding_at: float | None = None
        self.status_at: float | None = None
        self.log: IO[bytes] | None = None
        self.logged = 0
        self.notes_shown = 0
        self.fallback_shown = False
        self.traced: set[str] = set()

    def run(self) -> Result:
        _make_log_dir(self.plan.console_log, self.plan.console_log_default)
        sel = selectors.DefaultSelector()
        for fd in self.streams:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        try:
            with open(self.plan.console_log, "wb") as self.log:
                while sel.get_map():
                    for key, _ in sel.select(self._wait()):
                        fd = int(key.fd)
                        try:
                            data = os.read(fd, 65536)
                        except BlockingIOError:
                            continue
                        if not data:
                            sel.unregister(fd)
                            continue
                        self._dispatch(self.streams[fd], data)
                    self._check()
                self._console(self.scanner.flush(), b"")
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            sel.close()
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        trace.mark(f"QEMU ended ({rc})")
        return self._verdict(rc)

    def _wait(self) -> float:
        now = time.monotonic()
        due = [self.last_output + self.plan.watchdog]
        if self.plan.timeout:
            due.append(self.start + self.plan.timeout)
        if self.finding_at is not None:
            due.append(self.last_console + EXCERPT_WAIT)
        if self.term_at is not None:
            due.append(self.term_at + 3)
        return max(0.0, min(min(due) - now, 1.0))

    def _dispatch(self, kind: str, data: bytes) -> None:
        now = time.monotonic()
        if kind == "qemu-stderr":
            self.qemu_err += data
            return
        self.last_output = now
        if kind not in self.traced:
            self.traced.add(kind)
            trace.mark(f"first bytes on {kind}")
        if kind == "console":
            self.last_console = now
            if self.log is not None and self.logged < MAX_LOG_BYTES:
                self.log.write(data)
                self.log.flush()
                self.logged += len(data)
            self._console(self.scanner.feed(data), data)
        elif kind == "stdout":
            self.out += data
            self.sink.stdout(data)
        elif kind == "stderr":
            self.err += data
            self.sink.stderr(data)
        elif kind == "status":
            self.status_buf += data
            if self.status_at is None and b"\n" in self.status_buf:
                self.status_at = now

    def _console(self, chunk: con.Chunk, raw: bytes) -> None:
        s = self.scanner
        while self.notes_shown < len(s.notes):
            note = s.notes[self.notes_shown]
            self.notes_shown += 1
            if note.startswith("trace "):
                trace.mark(f"guest: {note.removeprefix('trace ')}")
            else:
                self.sink.note(f"guest: {note}")
        if s.booted and "init" not in self.traced:
            self.traced.add("init")
            trace.mark("guest init started (QLAUNCH_INIT)")
        if s.fallback and not self.fallback_shown:
            self.fallback_shown = True
            self.sink.note(
                f"the guest found no virtio console ports ({s.fallback}; is CONFIG_VIRTIO_CONSOLE "
                "set?): stdout and stderr come framed over the serial console"
            )
        self.console += chunk.console
        if chunk.console and self.show_console:
            self.sink.console(chunk.console)
        if chunk.stdout:
            self.out += chunk.stdout
            self.sink.stdout(chunk.stdout)
        if chunk.stderr:
            self.err += chunk.stderr
            self.sink.stderr(chunk.stderr)
        if s.finding is not None and self.finding_at is None:
            self.finding_at = time.monotonic()
        if s.status is not None and self.status_at is None:
            self.status_at = time.monotonic()

    def _stop(self, why: str) -> None:
        if self.ended_by is None:
            self.ended_by = why
        if self.term_at is None and self.proc.poll() is None:
            self.proc.terminate()
            self.term_at = time.monotonic()

    def _check(self) -> None:
        now = time.monotonic()
        s = self.scanner
        if self.term_at is not None:
            if now - self.term_at > 3 and self.proc.poll() is None:
                self.proc.kill()
            return
        if s.finding is not None:
            # A panic ends QEMU by itself (panic=-1, -no-reboot); the rest leave a live guest.
            if s.finding.complete and s.finding.pattern.kind != "panic":
                self._stop("finding")
            elif now - self.last_console > EXCERPT_WAIT:
                s.finding.complete = True
                self._stop("finding")
        elif s.halted and self.plan.profile.board.halts_on_poweroff:
            self._stop("halted")
        elif self.status_at is not None:
            # The guest synced before it reported, and all the command wrote is in our pipes
            # (a port write returns once QEMU has the bytes; the console is in order): its
            # power-off would only cost time.
            self._stop("status")
        elif self.plan.timeout and now - self.start > self.plan.timeout:
            self._stop("timeout")
        elif now - self.last_output > self.plan.watchdog:
            self._stop("watchdog")

    def _status(self) -> int | None:
        for line in reversed(self.status_buf.decode(errors="replace").split()):
            if line.isdigit():
                return int(line)
        return self.scanner.status

    def _verdict(self, rc: int) -> Result:
        plan = self.plan
        s = self.scanner
        status = self._status()
        tail = list(s.tail)
        res = Result(
            name=plan.name,
            code=0,
            stdout=self.out.decode(errors="replace"),
            stderr=self.err.decode(errors="replace"),
            console=self.console.decode(errors="replace"),
            verdict="exit",
            message="",
            console_tail=tail,
            console_log=str(plan.console_log),
            duration=time.monotonic() - self.start,
            command_status=status,
            profile=plan.profile.name,
            kernel=plan.kernel_label,
        )
        qemu_err = self.qemu_err.decode(errors="replace").strip()
        if (
            rc != 0
            and self.ended_by is None
            and s.lines_seen == 0
            and not s.booted
            and qemu_err
            and status is None
        ):
            raise QemuError(f"QEMU failed: {qemu_err.splitlines()[-1]}")
        boot = "" if s.booted else "the kernel did not boot to qlaunch's init: "
        if s.finding is not None:
            f = s.finding
            res.verdict, res.code, res.excerpt = f.pattern.kind, f.code, list(f.excerpt)
            res.message = f"{boot}{f.title} on the console"
        elif self.ended_by == "timeout":
            res.verdict, res.code = "timeout", protocol.EXIT_TIMEOUT
            res.message = f"{boot}timed out after {plan.timeout:g} s (--timeout)"
        elif self.ended_by == "watchdog":
            res.verdict, res.code = "timeout", protocol.EXIT_TIMEOUT
            scaled = f", x{plan.scale} under TCG" if plan.scale > 1 else ""
            res.message = f"{boot}no output for {plan.watchdog:g} s (watchdog{scaled})"
        elif status is not None:
            res.code = status
        elif not s.booted:
            why = f"QEMU said: {qemu_err.splitlines()[-1]}" if qemu_err else "QEMU ended"
            if s.lines_seen == 0:
                why += "; there was no console output at all (wrong console= or wrong board?)"
            res.message = f"{boot}{why}"
        else:
            res.verdict, res.code = "no-status", protocol.EXIT_NO_STATUS
            res.message = "the guest ended without reporting the command's exit status"
        if not s.booted and status is None:
            # Whatever stopped it (panic, hang, QEMU), a kernel that never ran the init did not
            # boot: one code for all of that, which `git bisect run` can be told to skip (125).
            res.verdict, res.code = "boot-failure", plan.boot_failure_exit
        if res.message:
            res.message += f": exit {res.code}"
        if s.warnings and not plan.fail_on_warn:
            self.sink.note(
                f"the kernel printed {len(s.warnings)} WARNING line(s), first: "
                f"{s.warnings[0].strip()} (--fail-on-warn makes that a failure)"
            )
        return res


# --- the Python API -----------------------------------------------------------------------


def run_spec(
    spec: ExecSpec, sink: Sink, *, show_console: bool = False, keep_workdir: bool = False
) -> Result:
    """prepare + execute, with the per-run files in a temporary directory."""
    tmp = Path(tempfile.mkdtemp(prefix="qlaunch-exec-"))
    try:
        plan = prepare(spec, tmp)
        result = execute(plan, sink, show_console=show_console)
        result.notes = list(getattr(sink, "notes", []))
        return result
    finally:
        if not keep_workdir:
            shutil.rmtree(tmp, ignore_errors=True)


def exec(  # noqa: A001 - the name users call: qlaunch.exec(...)
    cmd: Sequence[str],
    *,
    kernel: str | os.PathLike[str] | None = None,
    arch: str | None = None,
    profile: str | None = None,
    modules: str | os.PathLike[str] | None = None,
    module: Sequence[str] = (),
    share: Sequence[str] = (),
    share_type: str = "auto",
    cpus: int | None = None,
    memory: str | None = None,
    append: str = "",
    timeout: float | None = None,
    watchdog: float | None = None,
    fail_on_warn: bool = False,
    boot_failure_exit: int = protocol.EXIT_BOOT_FAILURE,
    sets: Sequence[str] = (),
    console_log: str | os.PathLike[str] | None = None,
) -> Result:
    """Boot a kernel, run cmd in it, and return what happened.

    >>> r = qlaunch.exec(["sh", "-c", "echo hi; exit 3"], kernel="asset:x86_64")
    >>> (r.code, r.stdout)
    (3, 'hi\\n')

    Failures of the guest (panic, oops, hang, timeout) are Results with their codes; problems
    before the boot (no such kernel, QEMU missing) raise qlaunch.errors.QlaunchError.
    """
    if isinstance(cmd, str):
        raise UsageError("cmd is a list of arguments, e.g. ['sh', '-c', 'echo hi']")
    spec = ExecSpec(
        cmd=tuple(cmd),
        kernel=os.fspath(kernel) if kernel is not None else None,
        arch=arch,
        profile=profile,
        sets=tuple(sets),
        modules=os.fspath(modules) if modules is not None else None,
        module=tuple(module),
        shares=tuple(parse_share(s) for s in share),
        share_type=share_type,
        cpus=cpus,
        memory=memory,
        append=append,
        timeout=timeout,
        watchdog=watchdog,
        fail_on_warn=fail_on_warn,
        boot_failure_exit=boot_failure_exit,
        console_log=os.fspath(console_log) if console_log is not None else None,
    )
    return run_spec(spec, CaptureSink())
