"""The golden cases: every shipped profile and tests/unit/cases/*.toml, each rendered for the
entries that launch it (run for all; start, exec and restore where listed). Shared by the golden
test (pure, fixed placeholders) and the test that has the real QEMU accept each argv.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qlaunch.boot import firmware, protocol
from qlaunch.config import profile
from qlaunch.config.profile import Profile
from qlaunch.launch import plan, resolve
from qlaunch.launch.argv import Port, Share
from qlaunch.launch.host import HostFacts, Verdict
from qlaunch.launch.plan import LaunchPlan

HERE = Path(__file__).parent
GOLDEN = HERE / "unit" / "golden"
CASES = HERE / "unit" / "cases"
PROFILES = HERE.parent / "profiles"

# Debian 12's descriptors (ovmf, qemu-efi-aarch64, qemu-efi-arm) as the packages ship them:
# every file they name is there but the aarch64 Secure Boot build.
FIRMWARE = tuple(
    firmware.load_descriptors(
        [str(HERE / "unit" / "data" / "firmware-debian")],
        exists=lambda p: not p.endswith("AAVMF_CODE.secboot.fd"),
    )
)
FW = {
    "firmware": FIRMWARE,
    "swtpm": "/usr/bin/swtpm",
    "virtiofsd": "/usr/lib/qemu/virtiofsd",
    "root": True,
    "cpus": 2,  # the CI machine's: raspi3b's four vCPUs get single-threaded TCG
}
NO_KVM = HostFacts(arch="x86_64", kvm=Verdict(False, "/dev/kvm is provided by kvm_pvm"), **FW)
HW_KVM = HostFacts(arch="x86_64", kvm=Verdict(True, "/dev/kvm works (kvm_intel)"), **FW)
ARM_KVM = HostFacts(arch="aarch64", kvm=Verdict(True, "/dev/kvm works (kvm)"), **FW)
TSC = HostFacts(arch="x86_64", kvm=NO_KVM.kvm, tsc_khz=2596100, **FW)
HOSTS = {"": NO_KVM, "kvm": HW_KVM, "armkvm": ARM_KVM, "tsc": TSC}

# Beyond `run`, which every case has: the entries each case is also rendered for.
MORE_ENTRIES = {
    "default": (
        *("start", "exec", "restore", "exec-console", "exec-share", "exec-9p"),
        *("warm-build", "warm-run"),
    ),
    "x86_64-q35": ("start", "exec"),
    "x86_64-microvm": ("start", "exec"),
    "aarch64-virt": ("start", "exec", "exec-share", "exec-9p", "warm-build", "warm-run"),
    "arm-virt": ("start", "exec", "warm-run"),
    "vexpress-a9": ("start", "exec"),
    "vexpress-a15": ("exec",),
    "raspi3b": ("start", "exec"),
    "raspi2b": ("exec",),
    "i386-pc": ("start", "exec"),
    "ppc64le-pseries": ("start", "exec"),
    "s390x-ccw": ("start", "exec"),
    "mips64el-malta": ("start", "exec"),
    "s390x-disks-net": ("start",),
    "i386-q35-disk": ("start",),
    "commas-and-disks": ("start",),
    "disks-cloud-init": ("start",),
    "resources": ("start",),
    "kvm-default@kvm": ("start",),
    "uefi-disk": ("start",),
    "uefi-secure-tpm": ("start",),
    "aarch64-uefi": ("start",),
    "bios-install": ("start",),
    "shares": ("start",),
}


@dataclass(frozen=True)
class Case:
    name: str  # the golden file's stem: CASE or CASE.ENTRY
    path: Path
    host: str
    entry: str  # run, start, exec, restore, warm-build, warm-run; exec-console, -share, -9p


def cases() -> list[Case]:
    files = [(p.stem, p) for p in sorted(PROFILES.glob("*.toml"))]
    files += [(p.stem, p) for p in sorted(CASES.glob("*.toml"))]
    out = []
    for stem, path in files:
        host = stem.split("@")[1] if "@" in stem else ""
        out.append(Case(stem, path, host, "run"))
        for entry in MORE_ENTRIES.get(stem, ()):
            out.append(Case(f"{stem}.{entry}", path, host, entry))
    return out


def exec_transport(prof: Profile, entry: str) -> str:
    """What exec picks: virtio console ports for a kernel with the virtio console built in
    (exec), framed console lines for one that has it as a module, as Debian's kernels do
    (exec-console, and the share cases, which stand for a Debian kernel)."""
    return "ports" if prof.board.virtio and entry == "exec" else "console"


def render(
    case: Case,
    *,
    cache: Path = Path("/cache"),
    initrd: str = "/cache/initramfs/qlaunch.cpio.gz",
    disk_paths: tuple[str, ...] = (),
    statedir: str | None = None,
    host: HostFacts | None = None,
    fds: dict[str, int] | None = None,
    share_dir: str = "/home/dev/linux",
    sets: list[str] | None = None,
    data: str | None = None,
) -> tuple[Profile, LaunchPlan]:
    """The case's plan. The defaults give the golden files; the QEMU test passes real files."""
    prof = profile.load(str(case.path), sets or [])
    files = resolve.refs(prof, cache)
    fds = fds or {}
    entry = "exec" if case.entry.startswith("exec") else case.entry
    shares: tuple[Share, ...] = ()
    append: tuple[str, ...] = ()
    ports = None
    if entry == "exec":
        transport = exec_transport(prof, case.entry)
        sock = f"{data or plan.TMP}/virtiofs0.sock"
        if case.entry == "exec-share":
            shares = (Share("qlshare0", share_dir, kind="virtiofs", socket=sock, guest=share_dir),)
        elif case.entry == "exec-9p":
            shares = (Share("qlshare0", share_dir, guest=share_dir),)
        append = protocol.exec_kernel_args(transport)
        ports = tuple(Port(p, fds.get(p)) for p in protocol.PORTS) if transport == "ports" else ()
    rt = plan.wire(
        entry,
        prof.name,
        kernel=files.kernel,
        initrd=initrd if files.initrd == "qlaunch" or entry == "exec" else files.initrd,
        dtb=files.dtb,
        statedir=statedir,
        data=data,
        workdir=data,
        uuid="0f2d7e4c-8a31-4d1b-9a5e-3c2b1a0f9e8d" if statedir else None,
        disk_paths=disk_paths,
        monitor_fd=fds.get("monitor"),
        ports=ports,
        shares=shares,
        exec_append=append,
        incoming_fd=fds.get("warm"),
    )
    return prof, plan.build(prof, host or HOSTS[case.host], entry, rt)


def one_option_per_line(argv: tuple[str, ...] | list[str]) -> str:
    lines = [argv[0]]
    i = 1
    while i < len(argv):
        if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            lines.append(f"{argv[i]} {argv[i + 1]}")
            i += 2
        else:
            lines.append(argv[i])
            i += 1
    return "\n".join(lines) + "\n"
