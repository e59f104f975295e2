"""`qlaunch image build debian`: a bootable Debian 12 disk from Debian's own packages.

The recipe, as a Debian installer would lay it out, without downloading anyone's image:

1. a sparse raw file with a GPT: a BIOS boot partition (bios) or an EFI system partition
   (uefi), then an ext4 root; a loop device with its partitions, file systems made;
2. `mmdebstrap` installs Debian 12 straight into the mounted root (minbase plus a kernel,
   GRUB, systemd, cloud-init, qemu-guest-agent and openssh-server); for a foreign
   architecture its maintainer scripts run under qemu-user through binfmt_misc;
3. qlaunch writes the machine's configuration: fstab by UUID, a serial console, DHCP on the
   NICs through systemd-networkd, cloud-init looking for a NoCloud or ConfigDrive seed only,
   ssh host keys made on first boot (never shared between VMs made from one image);
4. GRUB: `grub-install` for BIOS; for UEFI a `grub-mkimage` at the removable path
   (EFI/BOOT/BOOTX64.EFI or BOOTAA64.EFI, so no NVRAM entry is needed), written onto the FAT
   with mtools, since many hosts (and containers) cannot mount FAT; then `update-grub`;
5. `qemu-img convert` to qcow2 and a rename into place.

Everything happens in a hidden directory beside the output. Any failure, Ctrl-C or SIGTERM
unmounts, detaches the loop device, stops the children and removes that directory, with the
signals held off meanwhile so a second Ctrl-C cannot cut the cleanup short.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from qlaunch import paths
from qlaunch.errors import HostError, QlaunchError, UsageError
from qlaunch.spawn import spawn, stop_child
from qlaunch.storage import holders, image, outfile
from qlaunch.units import format_size

RELEASE = "bookworm"  # Debian 12
DEFAULT_MIRROR = "http://deb.debian.org/debian"
MIN_SIZE = 2 << 30
DEFAULT_SIZE = 4 << 30
ESP_MIB = 128
# Bump when the recipe changes what an image contains: caches keyed on it rebuild.
RECIPE = 1

LINUX_FS_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
BIOS_BOOT_GUID = "21686148-6449-6E6F-744E-656564454649"
ESP_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


@dataclass(frozen=True)
class Arch:
    deb: str  # Debian's name for it
    kernel: str
    root_guid: str  # the Discoverable Partitions root type
    console: str
    efi_target: str
    efi_file: str
    grub_efi: str
    binfmt: str  # the binfmt_misc entry that runs it on a foreign host


ARCHES = {
    "x86_64": Arch(
        deb="amd64",
        kernel="linux-image-cloud-amd64",
        root_guid="4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
        console="ttyS0",
        efi_target="x86_64-efi",
        efi_file="BOOTX64.EFI",
        grub_efi="grub-efi-amd64",
        binfmt="qemu-x86_64",
    ),
    "aarch64": Arch(
        deb="arm64",
        kernel="linux-image-arm64",
        root_guid="B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
        console="ttyAMA0",
        efi_target="arm64-efi",
        efi_file="BOOTAA64.EFI",
        grub_efi="grub-efi-arm64",
        binfmt="qemu-aarch64",
    ),
}
FIRMWARES = ("bios", "uefi")
BASE_PACKAGES = (
    "systemd-sysv",
    "systemd-resolved",
    "udev",
    "dbus",
    "initramfs-tools",
    "cloud-init",
    "qemu-guest-agent",
    "openssh-server",
    "openssh-sftp-server",
    "sudo",
    "iproute2",
    "netbase",
    "procps",
    "ca-certificates",
)
# Host tools, and the Debian package of each (for the hint).
TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "sfdisk": "fdisk",
    "losetup": "mount",
    "mount": "mount",
    "umount": "mount",
    "mkfs.ext4": "e2fsprogs",
    "chroot": "coreutils",
    "qemu-img": "qemu-utils",
}
UEFI_TOOLS = {"mkfs.vfat": "dosfstools", "mcopy": "mtools", "mmd": "mtools"}
# Space the build needs beside the output: the installed system in the raw file, then its
# qcow2 copy.
SPACE_NEEDED = 3 << 30


class BuildError(QlaunchError):
    """A step of the build failed; `log_tail` holds the last lines its tools printed."""

    def __init__(self, message: str, hint: str | None = None, log_tail: Sequence[str] = ()):
        super().__init__(message, hint)
        self.log_tail = tuple(log_tail)


class Progress(Protocol):
    def step(self, number: int, total: int, label: str) -> None: ...

    def detail(self, text: str) -> None: ...


@dataclass(frozen=True)
class Spec:
    """What to build: everything that decides the image's content."""

    arch: str
    firmware: str
    size: int = DEFAULT_SIZE
    mirror: str = DEFAULT_MIRROR
    release: str = RELEASE

    @property
    def packages(self) -> tuple[str, ...]:
        a = ARCHES[self.arch]
        grub = "grub-pc" if self.firmware == "bios" else a.grub_efi
        extra = ("dosfstools",) if self.firmware == "uefi" else ()
        return (a.kernel, grub, *BASE_PACKAGES, *extra)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["packages"] = list(self.packages)
        d["recipe"] = RECIPE
        return d


@dataclass(frozen=True)
class Built:
    path: str
    spec: Spec
    kernel_version: str
    seconds: float
    file_size: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "distribution": "debian",
            "release": self.spec.release,
            "arch": self.spec.arch,
            "firmware": self.spec.firmware,
            "size": self.spec.size,
            "format": "qcow2",
            "kernel_version": self.kernel_version,
            "packages": list(self.spec.packages),
            "file_size": self.file_size,
            "seconds": round(self.seconds, 1),
        }


# --- checks before anything is made -----------------------------------------------------------


def default_firmware(arch: str) -> str:
    """What `firmware = "auto"` boots a disk with: BIOS on x86_64, UEFI elsewhere."""
    return "bios" if arch == "x86_64" else "uefi"


def check_spec(spec: Spec) -> None:
    if spec.arch not in ARCHES:
        raise UsageError(f"cannot build for {spec.arch!r}", hint=f"one of: {', '.join(ARCHES)}")
    if spec.firmware not in FIRMWARES:
        raise UsageError(f"unknown firmware {spec.firmware!r}", hint="bios or uefi")
    if spec.firmware == "bios" and spec.arch != "x86_64":
        raise UsageError(f"there is no BIOS for {spec.arch}", hint="use --firmware uefi")
    if spec.size < MIN_SIZE:
        raise UsageError(
            f"size {format_size(spec.size)} is too small for Debian 12 with a kernel",
            hint="at least 2G",
        )
    if spec.size % (1 << 20):
        raise UsageError(
            f"size {spec.size} is not a whole number of MiB", hint="e.g. --size 4G or 3584M"
        )
    if not spec.mirror.startswith(("http://", "https://", "file:/")):
        raise UsageError(f"mirror {spec.mirror!r} is not an http(s) or file URL")


def check_output(out: str, *, force: bool, check_held: Callable[[str], None] | None = None) -> str:
    """The absolute output path. Refused: an existing file without force (even one qlaunch
    wrote: a build is too costly to lose by accident), and with force a file that a VM or
    another process holds. check_held: the caller's check for files its VMs hold."""
    path = str(outfile.check_target(out, "image", force=force, own=False))
    if os.path.lexists(path):
        if check_held is not None:
            check_held(path)
        _refuse_held(path)
    if not os.access(os.path.dirname(path), os.W_OK):
        raise UsageError(f"{os.path.dirname(path)}: not writable")
    return path


def _refuse_held(path: str) -> None:
    found = holders.holders(path)
    if found:
        raise holders.ImageInUse(
            f"{path} is in use by {', '.join(h.describe() for h in found)}; not replacing it",
            hint="stop it first",
        )


def check_host(spec: Spec, out_dir: str, *, host_arch: str | None = None) -> None:
    """Root, the tools, a way to run the guest's programs, loop devices and space."""
    if os.geteuid() != 0:
        raise HostError(
            "image build needs root (loop devices, mounts, chroot)", hint="run it as root"
        )
    tools = dict(TOOLS)
    if spec.firmware == "uefi":
        tools.update(UEFI_TOOLS)
    missing = sorted({pkg for tool, pkg in tools.items() if not shutil.which(tool)})
    if missing:
        raise HostError(
            f"image build needs {', '.join(missing)}",
            hint=f"apt-get install {' '.join(missing)}",
        )
    arch = ARCHES[spec.arch]
    if (host_arch or _host_arch()) != spec.arch and not binfmt_ready(arch.binfmt):
        raise HostError(
            f"this host cannot run {arch.deb} programs, which the {spec.arch} image's "
            "package scripts are",
            hint="apt-get install qemu-user-static binfmt-support; if "
            "/proc/sys/fs/binfmt_misc is empty: mount -t binfmt_misc binfmt_misc "
            f"/proc/sys/fs/binfmt_misc && update-binfmts --enable {arch.binfmt}",
        )
    if not os.path.exists("/dev/loop-control"):
        raise HostError("no loop devices (/dev/loop-control)", hint="modprobe loop")
    st = os.statvfs(out_dir)
    free = st.f_bavail * st.f_frsize
    if free < SPACE_NEEDED:
        raise HostError(
            f"{out_dir}: {format_size(free // (1 << 20) << 20)} free; the build needs "
            f"about {format_size(SPACE_NEEDED)}",
        )


def binfmt_ready(entry: str, root: str = "/proc/sys/fs/binfmt_misc") -> bool:
    """Is the binfmt_misc entry enabled with the F flag? F makes the kernel open the
    interpreter at registration, so it works inside a chroot that has no copy of it."""
    try:
        with open(os.path.join(root, entry)) as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    flags = next((ln.split(":", 1)[1] for ln in lines if ln.startswith("flags:")), "")
    return bool(lines) and lines[0] == "enabled" and "F" in flags


def _host_arch() -> str:
    m = os.uname().machine
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


# --- running tools ----------------------------------------------------------------------------


class _Log:
    """Everything the tools print, kept in the build directory; the tail goes into errors."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file: IO[bytes] = open(path, "ab")  # noqa: SIM115 - closed by the build

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.file.flush()

    def tail(self, n: int = 15) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.path) - 16384))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return []
        return [ln for ln in lines if ln.strip()][-n:]

    def close(self) -> None:
        self.file.close()


def _run(
    argv: Sequence[str],
    log: _Log,
    what: str,
    *,
    input_data: bytes | None = None,
    env: dict[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> str:
    """Run a tool to completion, its output into the log; returns its output. A tool that
    fails raises BuildError naming `what`; an interrupt stops the tool (and its children)."""
    log.write(f"$ {' '.join(argv)}\n".encode())
    proc = spawn(
        argv,
        stdin=subprocess.PIPE if input_data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        # Its own session: a Ctrl-C on the terminal reaches qlaunch alone, which then stops
        # the tool and everything it started, in order, before unmounting.
        new_session=True,
        die_with_parent=True,
    )
    assert proc.stdout is not None
    captured = bytearray()
    try:
        if proc.stdin is not None:
            proc.stdin.write(input_data or b"")
            proc.stdin.close()
        for raw in proc.stdout:
            log.write(raw)
            captured += raw
            if on_line is not None:
                on_line(raw.decode(errors="replace").rstrip())
        rc = proc.wait()
    except BaseException:
        # Waiting for mmdebstrap to undo its own mounts: a second Ctrl-C must not cut it off.
        with _signals_held(ending=True):
            _stop_group(proc)
        raise
    finally:
        proc.stdout.close()
    if rc != 0:
        tail = log.tail()
        said = [ln for ln in tail if not ln.startswith("$ ")]
        # apt and mmdebstrap: the first error is the cause, the later ones its echoes.
        errors = [ln for ln in said if ln.startswith("E: ")]
        cause = (errors or said[-1:] or ["no message"])[0].strip()
        raise BuildError(
            f"{what} failed (exit {rc}): {cause}",
            hint="the tool's last lines are shown above",
            log_tail=tail,
        )
    return captured.decode(errors="replace")


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the tool's session (mmdebstrap cleans up its own mounts on it), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    stop_child(proc, grace=5)


@contextlib.contextmanager
def _signals_held(*, ending: bool) -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP while cleaning up. ending: the build is already on
    its way out (an error or the first signal), so a later one adds nothing; otherwise the
    first that came is raised again once the cleanup is done.

    Python handlers, not a signal mask: Python runs every handler in the main thread,
    whichever thread the kernel delivered the signal to, and the progress line's ticker
    thread blocks nothing. A mask on the main thread let a second Ctrl-C, or the SIGHUP of
    the terminal closing after a SIGTERM, cut the cleanup short: loop devices and the build
    directory stayed behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    old: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        handler = signal.getsignal(signum)
        if handler is signal.SIG_IGN or handler is None:
            continue  # ignored (nohup), or not set from Python: leave it as it is
        old[signum] = handler
        signal.signal(signum, lambda got, _frame: came.append(got))
    try:
        yield
    finally:
        for num, handler in old.items():
            signal.signal(num, handler)
    if came and not ending:
        signal.raise_signal(came[0])


# --- the build --------------------------------------------------------------------------------


def sfdisk_script(spec: Spec) -> str:
    """The partition table: GPT, 1 MiB aligned; partition 1 boots, partition 2 is the root."""
    first = (
        f"size=1MiB, type={BIOS_BOOT_GUID}, name=bios"
        if spec.firmware == "bios"
        else f"size={ESP_MIB}MiB, type={ESP_GUID}, name=esp"
    )
    root = f"type={ARCHES[spec.arch].root_guid}, name=root"
    return f"label: gpt\n{first}\n{root}\n"


def mmdebstrap_argv(spec: Spec, target: str, early: str | None = None) -> list[str]:
    """early: a tarball unpacked into the root once the essential packages are in and before
    the rest (the kernel, initramfs-tools) are. (`tar-in` is one of mmdebstrap's own hook
    commands, not a shell; it splits its arguments as a shell would, hence the quoting.)"""
    base = spec.mirror.rstrip("/")
    security = f"{base}-security" if base.endswith("/debian") else base
    hooks = [f"--essential-hook=tar-in {shlex.quote(early)} /"] if early else []
    return [
        "mmdebstrap",
        "--mode=root",
        "--format=directory",
        "--variant=minbase",
        f"--arch={ARCHES[spec.arch].deb}",
        f"--include={','.join(spec.packages)}",
        *hooks,
        "--verbose",
        spec.release,
        target,
        f"deb {base} {spec.release} main",
        f"deb {base} {spec.release}-updates main",
        f"deb {security} {spec.release}-security main",
    ]


def _grub_serial(spec: Spec) -> bool:
    """GRUB's own serial terminal: on BIOS only. Its console draws on VGA alone there, while
    UEFI firmware already copies the console to the serial port (both would draw twice)."""
    return spec.firmware == "bios"


def grub_defaults(spec: Spec) -> str:
    lines = [
        "# Written by qlaunch image build: the serial console, a short menu.",
        "GRUB_TIMEOUT=1",
        f'GRUB_CMDLINE_LINUX="{kernel_args(spec)}"',
        'GRUB_CMDLINE_LINUX_DEFAULT=""',
    ]
    if _grub_serial(spec):
        lines += ['GRUB_TERMINAL="console serial"', 'GRUB_SERIAL_COMMAND="serial --speed=115200"']
    return "\n".join(lines) + "\n"


def fstab(root_uuid: str, esp_id: str | None) -> str:
    lines = [
        "# Written by qlaunch image build",
        f"UUID={root_uuid} / ext4 errors=remount-ro 0 1",
    ]
    if esp_id:
        # nofail: a VM whose ESP went missing still boots far enough to be repaired.
        lines.append(f"UUID={esp_id[:4]}-{esp_id[4:]} /boot/efi vfat umask=0077,nofail 0 0")
    return "\n".join(lines) + "\n"


NETWORK = """\
# Written by qlaunch image build: DHCP on every Ethernet NIC (the first one is the one that
# matters). cloud-init's own files (10-cloud-init-*) come first when it writes any.
[Match]
Name=en* eth*

[Network]
DHCP=yes
"""
WAIT_ONLINE = """\
# Online when any NIC is: a second NIC without DHCP must not hold up the boot for 2 minutes.
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=60
"""
CLOUD_CFG = """\
# Written by qlaunch image build: seeds qlaunch makes (NoCloud) and OpenStack-style config
# drives only. Probing for cloud metadata servers would wait out timeouts on every boot.
datasource_list: [NoCloud, ConfigDrive]
# The locale the image has (/etc/default/locale): cloud-init's en_US.UTF-8 would need the
# locales package, and its module fails without it.
locale: C.UTF-8
# The key types sshd reads (Debian's sshd no longer loads DSA keys); keygen is slow in TCG.
ssh_genkeytypes: [rsa, ecdsa, ed25519]
"""
SSH_KEYGEN_UNIT = """\
[Unit]
Description=Make the SSH host keys this machine does not have yet
Documentation=man:ssh-keygen(1)
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
"""
HOSTS = """\
127.0.0.1	localhost
127.0.1.1	debian
::1	localhost ip6-localhost ip6-loopback
ff02::1	ip6-allnodes
ff02::2	ip6-allrouters
"""


INITRAMFS_CONF = """\
# Written by qlaunch image build: an initramfs with the drivers of QEMU's disks (see
# ../hooks/qlaunch-vm), not every driver the kernel has. It boots faster under emulation, and
# building the "most" one runs thousands of programs, minutes under qemu-user.
MODULES=list
# The root's fsck, named: the hook's own probe needs /dev/disk/by-uuid, which a build lacks.
FSTYPE=ext4
"""
INITRAMFS_HOOK = """\
#!/bin/sh
# Written by qlaunch image build: the drivers for a root file system on any disk QEMU gives
# (virtio-blk, virtio-scsi, NVMe, AHCI, IDE), and for CD-ROMs, where cloud-init's seed is: its
# generator looks for the seed before the system's udev loads any driver. udev loads those the
# VM has. Modules that a kernel does not have (or has built in) are left out without a word.
PREREQ=""
prereqs() { echo "$PREREQ"; }
case "$1" in prereqs) prereqs; exit 0 ;; esac
. /usr/share/initramfs-tools/hook-functions
manual_add_modules virtio_pci virtio_mmio virtio_blk virtio_scsi sd_mod sr_mod
manual_add_modules nvme ahci ata_piix ext4
"""


def early_files(root_uuid: str, esp_id: str | None) -> dict[str, tuple[str, int]]:
    """Files in place before the kernel package comes, whose initramfs they shape: fstab
    (fsck for the root's type goes in), the initramfs module policy. path -> (text, mode)."""
    return {
        "etc/fstab": (fstab(root_uuid, esp_id), 0o644),
        "etc/initramfs-tools/conf.d/qlaunch-vm.conf": (INITRAMFS_CONF, 0o644),
        "etc/initramfs-tools/hooks/qlaunch-vm": (INITRAMFS_HOOK, 0o755),
    }


def _early_tar(path: str, files: dict[str, tuple[str, int]]) -> None:
    """Owned by root; tar makes the directories on the way (0755)."""
    with tarfile.open(path, "w") as tar:
        for name, (text, mode) in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))


def debconf_selections(spec: Spec) -> str:
    if spec.firmware == "bios":
        # No install device: the guest's disk name is unknown here. Upgrades then leave the
        # boot code alone, which keeps working with its own copy of the modules.
        return (
            "grub-pc grub-pc/install_devices multiselect \n"
            "grub-pc grub-pc/install_devices_empty boolean true\n"
        )
    pkg = ARCHES[spec.arch].grub_efi
    # Upgrades inside the guest refresh the removable path too, and leave NVRAM alone.
    return (
        f"{pkg} grub2/force_efi_extra_removable boolean true\n"
        f"{pkg} grub2/update_nvram boolean false\n"
    )


def early_grub_cfg(root_uuid: str) -> str:
    return f"search.fs_uuid {root_uuid} root\nset prefix=($root)'/boot/grub'\n"


def kernel_args(spec: Spec) -> str:
    return f"console=tty0 console={ARCHES[spec.arch].console},115200"


def grub_cfg(spec: Spec, root_uuid: str, kver: str) -> str:
    """The first grub.cfg: what update-grub would write for this one kernel, in short."""
    lines = [
        "# Written by qlaunch image build; update-grub in the guest replaces it.",
        "set default=0",
        "set timeout=1",
    ]
    if _grub_serial(spec):
        lines += [
            "serial --speed=115200",
            "terminal_input console serial",
            "terminal_output console serial",
        ]
    lines += [
        "insmod part_gpt",
        "insmod ext2",
        f"search --no-floppy --fs-uuid --set=root {root_uuid}",
        "menuentry 'Debian GNU/Linux' {",
        f"\tlinux /boot/vmlinuz-{kver} root=UUID={root_uuid} ro {kernel_args(spec)}",
        f"\tinitrd /boot/initrd.img-{kver}",
        "}",
    ]
    return "\n".join(lines) + "\n"


class _Builder:
    """The build's steps and what they made, so that cleanup can undo exactly that.

    No step relies on the host kernel reading the partition table (some have no partition
    support at all, and containers see no partition nodes): each partition gets a loop device
    of its own at its offset, and GRUB reads the GPT itself through a loop of the whole disk.
    """

    def __init__(self, spec: Spec, work: str, log: _Log, progress: Progress | None) -> None:
        self.spec = spec
        self.work = work
        self.log = log
        self.progress = progress
        self.raw = os.path.join(work, "disk.raw")
        self.root = os.path.join(work, "root")
        self.loops: list[str] = []
        self.root_dev = ""
        self.esp_dev = ""
        self.root_uuid = str(uuid.uuid4())
        self.esp_id = uuid.uuid4().hex[:8].upper() if spec.firmware == "uefi" else None
        self.mounted = False

    def detail(self, text: str) -> None:
        if self.progress is not None:
            self.progress.detail(text)

    def run(self, argv: Sequence[str], what: str, **kw: Any) -> str:
        return _run(argv, self.log, what, **kw)

    def loop(self, offset: int = 0, size: int | None = None) -> str:
        argv = ["losetup", "--find", "--show", "--offset", str(offset)]
        if size is not None:
            argv += ["--sizelimit", str(size)]
        dev = self.run([*argv, self.raw], "attaching a loop device").strip().splitlines()[-1]
        self.loops.append(dev)
        return dev

    # -- steps --

    def partition(self) -> None:
        with open(self.raw, "wb") as f:
            f.truncate(self.spec.size)
        self.run(
            ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", self.raw],
            "partitioning (sfdisk)",
            input_data=sfdisk_script(self.spec).encode(),
        )
        table = self.run(["sfdisk", "--json", self.raw], "reading the partition table")
        (first, root) = partitions(table)
        self.root_dev = self.loop(*root)
        # Done now, on the host, instead of by the guest's ext4lazyinit on its first boot.
        lazy = "lazy_itable_init=0,lazy_journal_init=0"
        mkfs = ["mkfs.ext4", "-q", "-L", "root", "-U", self.root_uuid, "-E", lazy]
        self.run([*mkfs, self.root_dev], "making the root file system")
        if self.esp_id:
            self.esp_dev = self.loop(*first)
            mkfat = ["mkfs.vfat", "-F", "32", "-n", "EFI", "-i", self.esp_id, self.esp_dev]
            self.run(mkfat, "making the EFI system partition")
        os.mkdir(self.root)
        self.run(["mount", self.root_dev, self.root], "mounting the root file system")
        self.mounted = True

    def bootstrap(self) -> None:
        def on_line(line: str) -> None:
            if line.startswith(("I: ", "Unpacking ", "Setting up ", "Get:")):
                self.detail(line)

        early = os.path.join(self.work, "early.tar")
        _early_tar(early, early_files(self.root_uuid, self.esp_id))
        self.run(mmdebstrap_argv(self.spec, self.root, early), "mmdebstrap", on_line=on_line)

    def configure(self) -> None:
        r = Path(self.root)
        _write(r / "etc/hostname", "debian\n")
        _write(r / "etc/hosts", HOSTS)
        _write(r / "etc/default/locale", "LANG=C.UTF-8\n")
        _write(r / "etc/default/grub.d/50-qlaunch.cfg", grub_defaults(self.spec))
        _write(r / "etc/systemd/network/50-qlaunch-dhcp.network", NETWORK)
        wait_online = "etc/systemd/system/systemd-networkd-wait-online.service.d/any.conf"
        _write(r / wait_online, WAIT_ONLINE)
        _write(r / "etc/cloud/cloud.cfg.d/90-qlaunch.cfg", CLOUD_CFG)
        _write(r / "etc/systemd/system/ssh-host-keys.service", SSH_KEYGEN_UNIT)
        # A fresh machine-id and fresh host keys on each VM's first boot.
        _write(r / "etc/machine-id", "")
        for key in glob.glob(str(r / "etc/ssh/ssh_host_*")):
            os.unlink(key)
        if self.esp_id:
            (r / "boot/efi").mkdir(parents=True, exist_ok=True)
        _write(r / "tmp/qlaunch-debconf", debconf_selections(self.spec))
        self.chroot(["debconf-set-selections", "/tmp/qlaunch-debconf"], "setting debconf")
        (r / "tmp/qlaunch-debconf").unlink()
        self.chroot(
            ["systemctl", "enable", "systemd-networkd", "systemd-resolved", "ssh-host-keys"],
            "enabling services",
        )

    def chroot(self, argv: Sequence[str], what: str) -> str:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}
        return self.run(["chroot", self.root, *argv], what, env=env)

    def devices_in_root(self, *devs: str) -> None:
        """A /dev of its own in the root (a tmpfs, gone with the build; the host's /dev stays
        untouched) with the usual nodes and the given loop devices."""
        dev = os.path.join(self.root, "dev")
        self.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "qlaunch-dev", dev], "mounting /dev")
        for host in ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", *devs):
            st = os.stat(host)
            os.mknod(os.path.join(dev, os.path.basename(host)), st.st_mode, st.st_rdev)
        os.symlink("/proc/self/fd", os.path.join(dev, "fd"))

    def bootloader(self) -> None:
        kver = self.kernel_version()
        if self.spec.firmware == "bios":
            disk = self.loop()
            self.devices_in_root(self.root_dev, disk)
            # grub-bios-setup finds the file system of its directory through mountinfo.
            proc = os.path.join(self.root, "proc")
            self.run(["mount", "-t", "proc", "proc", proc], "mounting /proc in the root")
            self._grub_bios(disk)
            for d in ("proc", "dev"):
                self.run(["umount", os.path.join(self.root, d)], f"unmounting /{d} in the root")
        else:
            self._grub_efi()
        # Not update-grub: its 10_linux writes no entry at all for a root on a loop device
        # ("we can't cope with devices loop-mounted from files"). The guest's own update-grub
        # (run by every kernel package it installs) replaces this file with Debian's.
        _write(Path(self.root) / "boot/grub/grub.cfg", grub_cfg(self.spec, self.root_uuid, kver))

    def _grub_modules(self, target: str) -> None:
        """What grub-install copies: the platform's modules, under /boot/grub."""
        r = Path(self.root)
        dest = r / "boot/grub" / target
        dest.mkdir(parents=True, exist_ok=True)
        for f in (r / "usr/lib/grub" / target).iterdir():
            if f.suffix in (".mod", ".lst", ".img"):
                shutil.copy2(f, dest / f.name)
        _write(r / "tmp/qlaunch-early.cfg", early_grub_cfg(self.root_uuid))

    def _mkimage(self, target: str, out: str, modules: Sequence[str]) -> None:
        # The core finds the root by UUID (no partition device names that change), then
        # loads normal.mod and grub.cfg from /boot/grub there.
        self.chroot(
            ["grub-mkimage", "-O", target, "-d", f"/usr/lib/grub/{target}"]
            + ["-c", "/tmp/qlaunch-early.cfg", "-p", "/boot/grub", "-o", out, *modules],
            "grub-mkimage",
        )
        os.unlink(os.path.join(self.root, "tmp/qlaunch-early.cfg"))

    def _grub_bios(self, disk: str) -> None:
        self._grub_modules("i386-pc")
        self._mkimage(
            "i386-pc",
            "/boot/grub/i386-pc/core.img",
            ("biosdisk", "part_gpt", "part_msdos", "ext2", "search_fs_uuid"),
        )
        # grub-bios-setup reads the GPT itself (hd0 = the whole disk's loop device), puts
        # boot.img in the MBR and core.img in the BIOS boot partition.
        _write(Path(self.root) / "tmp/qlaunch-device.map", f"(hd0) {disk}\n")
        self.chroot(
            ["grub-bios-setup", "-d", "/boot/grub/i386-pc", "-m", "/tmp/qlaunch-device.map"]
            + [disk],
            "grub-bios-setup",
        )
        os.unlink(os.path.join(self.root, "tmp/qlaunch-device.map"))

    def _grub_efi(self) -> None:
        a = ARCHES[self.spec.arch]
        self._grub_modules(a.efi_target)
        core = f"/tmp/{a.efi_file}"
        self._mkimage(
            a.efi_target, core, ("part_gpt", "part_msdos", "fat", "ext2", "search_fs_uuid")
        )
        # The FAT is written with mtools: many hosts (containers) cannot mount one.
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
        esp = self.esp_dev
        self.run(["mmd", "-i", esp, "::/EFI", "::/EFI/BOOT"], "writing the ESP", env=env)
        built = self.root + core
        self.run(
            ["mcopy", "-i", esp, built, f"::/EFI/BOOT/{a.efi_file}"], "writing the ESP", env=env
        )
        os.unlink(built)

    def kernel_version(self) -> str:
        found = sorted(glob.glob(os.path.join(self.root, "boot", "vmlinuz-*")))
        return os.path.basename(found[-1]).removeprefix("vmlinuz-") if found else "unknown"

    def unmount_all(self) -> None:
        if self.mounted:
            # The packages mmdebstrap downloaded were deleted, but their blocks still hold
            # data: discarding them punches holes in the raw file, so the qcow2 stays small.
            _quiet(["fstrim", self.root])
            self.run(["umount", "--recursive", self.root], "unmounting the root")
            self.mounted = False

    def cleanup(self) -> None:
        """Undo whatever exists: mounts (also those mmdebstrap left), the loop devices."""
        if os.path.isdir(self.root) and _mounted_under(self.root):
            rc = _quiet(["umount", "--recursive", self.root])
            if rc != 0:
                _quiet(["umount", "--recursive", "--lazy", self.root])
        self.mounted = False
        while self.loops:
            _quiet(["losetup", "--detach", self.loops.pop()])


def partitions(sfdisk_json: str) -> list[tuple[int, int]]:
    """(offset, size) in bytes of each partition, from `sfdisk --json`."""
    table = json.loads(sfdisk_json)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    return [(int(p["start"]) * sector, int(p["size"]) * sector) for p in table["partitions"]]


def _mounted_under(path: str) -> bool:
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
    except OSError:
        return True
    return any(p == real or p.startswith(real + "/") for p in points)


def _quiet(argv: Sequence[str]) -> int:
    proc = spawn(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return proc.wait()


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


STEPS = (
    "partitioning and making file systems",
    "installing Debian packages (mmdebstrap)",
    "configuring the system",
    "installing GRUB",
    "writing the qcow2 image",
)


def build(
    spec: Spec,
    out: str,
    *,
    force: bool = False,
    progress: Progress | None = None,
    check_held: Callable[[str], None] | None = None,
) -> Built:
    """Build the image at `out` (qcow2). Checks everything it can first; leaves nothing
    behind when it fails or is interrupted."""
    check_spec(spec)
    path = check_output(out, force=force, check_held=check_held)
    out_dir, name = os.path.split(path)
    check_host(spec, out_dir)
    started = time.monotonic()
    work = tempfile.mkdtemp(prefix=f".{name}.", suffix=".build", dir=out_dir)
    log = _Log(os.path.join(work, "build.log"))
    builder = _Builder(spec, work, log, progress)

    def step(n: int) -> None:
        if progress is not None:
            progress.step(n + 1, len(STEPS), STEPS[n])

    try:
        step(0)
        builder.partition()
        step(1)
        builder.bootstrap()
        step(2)
        builder.configure()
        step(3)
        builder.bootloader()
        kver = builder.kernel_version()
        builder.unmount_all()
        _quiet(["sync"])
        step(4)
        qcow2 = os.path.join(work, "disk.qcow2")
        image.convert(
            builder.raw,
            qcow2,
            "qcow2",
            src_fmt="raw",
            progress=(lambda pct: builder.detail(f"{pct:.0f}%")) if progress else None,
        )
        builder.cleanup()
        os.chmod(qcow2, 0o644)
        if force and os.path.lexists(path) and check_held is not None:
            check_held(path)
        _publish(qcow2, path, force=force)
        outfile.remember(Path(path))
    except BuildError as e:
        log.file.flush()
        kept = keep_log(log.path, spec)
        if kept:
            e.hint = f"{e.hint}; the whole log: {kept}" if e.hint else f"the whole log: {kept}"
        raise
    finally:
        with _signals_held(ending=sys.exc_info()[1] is not None):
            builder.cleanup()
            log.close()
            shutil.rmtree(work, ignore_errors=True)
    return Built(path, spec, kver, time.monotonic() - started, os.path.getsize(path))


KEEP_LOGS = 5


def keep_log(src: str, spec: Spec) -> str | None:
    """A failed build's log, kept in the cache (the newest few) where the error points:
    everything else of the build goes, and the tail in the message is seldom the whole
    story."""
    d = paths.cache_dir() / "logs"
    try:
        d.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = d / f"image-build-{spec.arch}-{spec.firmware}-{stamp}.log"
        shutil.copyfile(src, dest)
        for old in sorted(d.glob("image-build-*.log"), key=os.path.getmtime)[:-KEEP_LOGS]:
            old.unlink()
    except OSError:
        return None
    return str(dest)


def _publish(tmp: str, dst: str, *, force: bool) -> None:
    if force:
        if os.path.lexists(dst):
            _refuse_held(dst)
        os.replace(tmp, dst)
        return
    try:
        os.link(tmp, dst)
    except FileExistsError as e:
        raise UsageError(f"{dst} appeared during the build; left it alone") from e
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        if os.path.lexists(dst):
            raise UsageError(f"{dst} appeared during the build; left it alone") from e
        os.rename(tmp, dst)
