"""Probing the host once: QEMU binaries, accelerator usability and why, tun.

HostFacts is plain data so that argv building stays pure and tests can fake a host with
hardware KVM. Only `probe()` touches the system.
"""

from __future__ import annotations

import fcntl
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from qlaunch import spawn
from qlaunch.boot import firmware
from qlaunch.config.boards import QEMU_BINARY

KVM_CREATE_VM = 0xAE01  # _IO(KVMIO=0xAE, 0x01)
HARDWARE_KVM_MODULES = ("kvm_intel", "kvm_amd", "kvm_hv")  # kvm_hv: POWER's hypervisor mode
_HOST_ARCH = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "aarch64": "aarch64",
    "arm64": "aarch64",
    "armv7l": "arm",
    "i386": "i386",
    "i686": "i386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
}
if sys.byteorder == "little":
    _HOST_ARCH["mips64"] = "mips64el"  # uname says mips64 for both byte orders


@dataclass(frozen=True)
class Verdict:
    usable: bool
    reason: str


@dataclass(frozen=True)
class HostFacts:
    arch: str
    kvm: Verdict
    qemu: dict[str, str | None] = field(default_factory=dict)  # arch -> binary path or None
    tun: bool = False
    # The host's TSC rate: under TCG a guest's TSC ticks at it (QEMU reads the host's TSC).
    tsc_khz: int | None = None
    # QEMU's firmware descriptors in priority order (boot.firmware reads and chooses them).
    firmware: tuple[firmware.Descriptor, ...] = ()
    swtpm: str | None = None  # the swtpm binary, for [machine] tpm
    virtiofsd: str | None = None  # QEMU's C virtiofsd, for virtiofs shares
    cpus: int = 0  # host CPUs this process may run on (0: unknown)
    root: bool = False  # virtiofsd 7.2 sets up its sandbox only as root

    def kvm_for(self, guest_arch: str) -> Verdict:
        """KVM runs a guest only of the host's own architecture (said first: for a foreign
        guest that is the reason, whatever the state of /dev/kvm)."""
        if guest_arch != self.arch and (guest_arch, self.arch) != ("i386", "x86_64"):
            return Verdict(False, f"KVM cannot run {guest_arch} guests on this {self.arch} host")
        return self.kvm


def host_arch() -> str:
    m = platform.machine()
    return _HOST_ARCH.get(m, m)


KVM_DEV = "/dev/kvm"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"  # Debian's qemu-system-common (QEMU 7.2 and older)


def kvm_create_vm(dev: str) -> str | None:
    """Open dev read-write and make a VM on it: None when that works, else why not."""
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open {KVM_DEV} read-write: {e.strerror} (add yourself to the kvm group)"
    try:
        vm = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
    except OSError as e:
        return f"KVM_CREATE_VM on {KVM_DEV} failed: {e.strerror}"
    finally:
        os.close(fd)
    os.close(vm)
    return None


def probe_kvm(
    root: str | os.PathLike[str] = "/",
    create_vm: Callable[[str], str | None] = kvm_create_vm,
    arch: str | None = None,
) -> Verdict:
    """Whether KVM really runs standard guests here. root: where /dev and /sys are (tests give
    a fake tree); create_vm: the KVM_CREATE_VM check, given the device's path under root."""
    dev = os.path.join(root, KVM_DEV.lstrip("/"))
    sys_module = os.path.join(root, "sys/module")
    if not os.path.exists(dev):
        return Verdict(
            False,
            f"{KVM_DEV} does not exist (no KVM module loaded, or nested virtualisation is off)",
        )
    why = create_vm(dev)
    if why is not None:
        return Verdict(False, why)
    loaded = (
        [m for m in os.listdir(sys_module) if m.startswith("kvm")]
        if os.path.isdir(sys_module)
        else []
    )
    hw = [m for m in loaded if m in HARDWARE_KVM_MODULES]
    if hw:
        return Verdict(True, f"{KVM_DEV} works ({hw[0]})")
    # Arm hosts have KVM in the kernel proper, without a vendor module.
    if (arch or host_arch()) in ("aarch64", "s390x") and "kvm" in loaded:
        return Verdict(True, f"{KVM_DEV} works (kvm)")
    others = sorted(m for m in loaded if m != "kvm")
    if others:
        return Verdict(
            False,
            f"{KVM_DEV} is provided by {others[0]}, not kvm_intel/kvm_amd (no VMX/SVM): "
            "standard guest kernels hang under it",
        )
    return Verdict(False, f"{KVM_DEV} has no hardware KVM module (kvm_intel or kvm_amd) behind it")


def probe() -> HostFacts:
    return HostFacts(
        arch=host_arch(),
        kvm=probe_kvm(),
        qemu={arch: shutil.which(binary) for arch, binary in QEMU_BINARY.items()},
        tun=os.path.exists("/dev/net/tun"),
        tsc_khz=probe_tsc_khz(),
        firmware=tuple(firmware.load_descriptors()),
        swtpm=shutil.which("swtpm"),
        virtiofsd=VIRTIOFSD if os.access(VIRTIOFSD, os.X_OK) else None,
        root=os.geteuid() == 0,
        cpus=len(os.sched_getaffinity(0)),
    )


def probe_tsc_khz(root: str | os.PathLike[str] = "/") -> int | None:
    """The host's TSC rate in kHz, where the TSC is constant (else None). root: where /proc
    is (tests give a fake tree)."""
    try:
        with open(os.path.join(root, "proc/cpuinfo")) as f:
            text = f.read(16384)
    except OSError:
        return None
    if " constant_tsc" not in text:
        return None
    m = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.M)
    return round(float(m.group(1)) * 1000) if m else None


def qemu_version(binary: str) -> str | None:
    """`qemu-system-x86_64 --version` -> "7.2.19"; costs a process, so only for reports."""
    try:
        out = spawn.run([binary, "--version"], timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version (\S+)", out.stdout)
    return m.group(1) if m else None
