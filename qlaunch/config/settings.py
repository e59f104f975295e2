"""The one table of profile settings: type, default, choices and help for every key.

Parsing, validation, `--set`, and the README's profile reference all read this table, so a key
is described in exactly one place.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qlaunch import units
from qlaunch.config import boards
from qlaunch.errors import UsageError


def size_bytes(value: str | int, default_unit: str = "") -> int:
    """A size setting in bytes (qlaunch.units.parse_size); raises ValueError for the table."""
    try:
        return units.parse_size(value, default_unit)
    except UsageError as e:
        if e.message.startswith("bad size"):
            raise ValueError(
                f"{value!r} is not a size (a number with a unit, like 512M or 2G)"
            ) from None
        raise ValueError(e.message) from None


def _memory_mib(value: Any) -> int:
    n = size_bytes(value, "M")
    if n < 16 << 20:
        raise ValueError(f"{value!r} is too little memory (at least 16M)")
    return n // (1 << 20)


def _positive(value: Any) -> int:
    if value < 1:
        raise ValueError(f"{value} must be 1 or more")
    return int(value)


def _forward(value: Any) -> tuple[str, ...]:
    out = []
    for rule in value:
        if not re.fullmatch(r"(tcp|udp):[0-9.]*:\d{1,5}-[0-9.]*:\d{1,5}", rule):
            raise ValueError(f"{rule!r} is not a forward rule (like tcp:127.0.0.1:2222-:22)")
        out.append(rule)
    return tuple(out)


def _disk_size(value: Any) -> int:
    """Bytes; a bare integer is bytes too. Whole 512-byte sectors, as qemu-img would round."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 8G")
    try:
        n = units.parse_size(value)
    except UsageError as e:
        raise ValueError(e.message) from None
    if n <= 0 or n % 512:
        raise ValueError(f"{value!r} is not a whole number of 512-byte sectors (like 8G)")
    return n


BOOT_DEVICES = ("disk", "cdrom", "net")


def _boot_order(value: Any) -> tuple[str, ...]:
    for item in value:
        if item not in BOOT_DEVICES:
            raise ValueError(f"{item!r} is not a boot device ({', '.join(BOOT_DEVICES)})")
    if len(set(value)) != len(value):
        raise ValueError(f"{value!r} names a boot device twice")
    return tuple(value)


def _mac(value: Any) -> str:
    if not re.fullmatch(r"(?i)[0-9a-f]{2}(:[0-9a-f]{2}){5}", value):
        raise ValueError(f"{value!r} is not a MAC address (like 52:54:00:12:34:56)")
    if int(value[:2], 16) & 1:
        raise ValueError(f"{value!r} is a multicast MAC address")
    return str(value).lower()


def _cpu_list(value: Any) -> tuple[int, ...]:
    if any(c < 0 for c in value) or len(set(value)) != len(value):
        raise ValueError(f"{value!r} is not a list of distinct host CPU numbers (like [0, 1])")
    return tuple(sorted(value))


def _cpu_percent(value: Any) -> int:
    if value < 1:
        raise ValueError(f"{value} is not a CPU share (percent of one host CPU: 50, 200...)")
    return int(value)


def _limit_bytes(value: Any) -> int:
    n = size_bytes(value, "M")
    if n < 64 << 20:
        raise ValueError(f"{value!r} is too low a memory limit for QEMU (at least 64M)")
    return n


@dataclass(frozen=True)
class Setting:
    section: str  # "machine", or "disk"/"net" for array tables
    key: str
    type: builtins.type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    convert: Callable[[Any], Any] | None = None
    item_type: builtins.type | None = None  # for lists

    @property
    def type_name(self) -> str:
        if self.type is list:
            return f"list of {self.item_type.__name__ if self.item_type else 'str'}"
        return {str: "string", int: "integer", bool: "boolean"}.get(self.type, self.type.__name__)


# Array tables: one profile may have several [[disk]], [[net]] and [[share]] entries.
ARRAY_SECTIONS = ("disk", "net", "share")

SETTINGS: tuple[Setting, ...] = (
    Setting("machine", "arch", str, "x86_64", "guest architecture", boards.ARCHES),
    Setting(
        "machine",
        "machine",
        str,
        None,
        "QEMU machine (board); default per arch: q35, virt, pc (i386), pseries, s390-ccw-virtio,"
        " malta",
    ),
    Setting("machine", "cpu", str, None, "CPU model; default per board, `host` under KVM"),
    Setting("machine", "smp", int, 1, "number of virtual CPUs", convert=_positive),
    Setting(
        "machine",
        "tpm",
        bool,
        False,
        "a TPM 2.0 (swtpm), its state kept with the VM across stops (with uefi-secure: what"
        " Windows 11 and measured-boot Linux images need)",
    ),
    Setting(
        "machine",
        "memory",
        str,
        None,
        "RAM, like 512M or 2G; default per board",
        convert=_memory_mib,
    ),
    Setting(
        "machine",
        "accel",
        str,
        "auto",
        "accelerator: auto picks KVM only where it works",
        ("auto", "kvm", "tcg"),
    ),
    Setting(
        "boot",
        "kernel",
        str,
        None,
        "kernel image: a path, or asset:SET/kernel from `qlaunch assets fetch`",
    ),
    Setting(
        "boot",
        "initrd",
        str,
        None,
        "initrd path, or `qlaunch` for qlaunch's busybox initramfs (runs `-- CMD`)",
    ),
    Setting("boot", "append", str, "", "extra kernel command line (after console= and panic=)"),
    Setting("boot", "dtb", str, None, "device tree blob: a path, or asset:SET/dtbs/NAME.dtb"),
    Setting(
        "boot", "modules", list, [], "extra kernel modules for the qlaunch initramfs", item_type=str
    ),
    Setting("boot", "quiet", bool, True, "pass `quiet` to the kernel"),
    Setting(
        "boot",
        "firmware",
        str,
        "auto",
        "auto: a kernel boots directly, a disk boots with BIOS on x86_64 and UEFI elsewhere;"
        " uefi-secure: Secure Boot with Microsoft's keys enrolled (q35 gets SMM)",
        ("auto", "bios", "uefi", "uefi-secure"),
    ),
    Setting(
        "boot",
        "order",
        list,
        [],
        'firmware boot order, like ["cdrom", "disk"] (disk, cdrom, net); default: QEMU\'s',
        convert=_boot_order,
        item_type=str,
    ),
    Setting("console", "tty", str, None, "the guest's console device; default per board"),
    Setting(
        "display", "type", str, "none", "none: serial only; vnc: a VNC server", ("none", "vnc")
    ),
    Setting("display", "vnc", str, "127.0.0.1:0", "VNC listen address (display number)"),
    Setting(
        "qemu", "extra", list, [], "raw QEMU arguments appended last (escape hatch)", item_type=str
    ),
    Setting("qemu", "binary", str, None, "QEMU binary to use instead of qemu-system-ARCH"),
    Setting("disk", "path", str, None, "image file (required)"),
    Setting(
        "disk",
        "format",
        str,
        None,
        "image format; default from the file name (.qcow2, .vdi, .vmdk; anything else raw)",
        ("qcow2", "raw", "vdi", "vmdk"),
    ),
    Setting(
        "disk",
        "interface",
        str,
        None,
        "bus: default per board (virtio, or sd on boards)",
        ("virtio", "sd", "ide", "scsi"),
    ),
    Setting("disk", "media", str, "disk", "disk or cdrom", ("disk", "cdrom")),
    Setting("disk", "readonly", bool, False, "attach read-only"),
    Setting(
        "disk",
        "cache",
        str,
        "writeback",
        "host cache mode; all but unsafe honour the guest's flushes. unsafe ignores them, so it"
        " needs snapshot, readonly or force_unsafe",
        ("writeback", "none", "writethrough", "directsync", "unsafe"),
    ),
    Setting(
        "disk",
        "snapshot",
        bool,
        False,
        "writes go to a throwaway overlay (QEMU's, in $TMPDIR or /var/tmp, unlinked at once);"
        " the image itself stays unchanged",
    ),
    Setting(
        "disk",
        "size",
        str,
        None,
        "create the image with this size (like 8G) at start when the file is missing; never"
        " resizes an existing one",
        convert=_disk_size,
    ),
    Setting(
        "disk",
        "force_unsafe",
        bool,
        False,
        'allow cache = "unsafe" on a persistent disk (a QEMU or host crash can corrupt it)',
    ),
    Setting(
        "net",
        "mode",
        str,
        "user",
        "user (NAT inside QEMU), none, network (a qlaunch network), bridge (a host bridge)",
        ("user", "none", "network", "bridge"),
    ),
    Setting(
        "net",
        "forward",
        list,
        [],
        "user mode host forwards, like tcp:127.0.0.1:2222-:22",
        item_type=str,
        convert=_forward,
    ),
    Setting("net", "model", str, None, "NIC model; default per board (virtio-net-pci)"),
    Setting(
        "net",
        "mac",
        str,
        None,
        "MAC address; default stable per VM and NIC (52:54:00:...)",
        convert=_mac,
    ),
    Setting("net", "network", str, None, "qlaunch network name, for mode = network"),
    Setting("net", "bridge", str, None, "existing host bridge, for mode = bridge"),
    Setting("net", "ip", str, None, "static DHCP lease on a qlaunch network"),
    Setting("net", "smb", str, None, "user mode: share this host directory over SMB"),
    Setting("share", "path", str, None, "host directory to share (required)"),
    Setting(
        "share",
        "type",
        str,
        "auto",
        "auto: virtiofs where the host has virtiofsd (and runs qlaunch as root), else 9p;"
        " a read-only share is always 9p",
        ("auto", "virtiofs", "9p"),
    ),
    Setting("share", "tag", str, None, "mount tag the guest mounts it by; default shareN"),
    Setting(
        "share",
        "guest",
        str,
        None,
        'where qlaunch\'s initramfs mounts it (initrd = "qlaunch"); default /mnt/TAG',
    ),
    Setting("share", "readonly", bool, False, "the guest cannot write (over 9p)"),
    Setting(
        "resources",
        "cpu_affinity",
        list,
        [],
        "host CPUs QEMU's threads may run on, like [0, 1]",
        item_type=int,
        convert=_cpu_list,
    ),
    Setting(
        "resources",
        "cpu_limit",
        int,
        None,
        "CPU time cap in percent of one host CPU (50: half a CPU; 200: two), by cgroup",
        convert=_cpu_percent,
    ),
    Setting(
        "resources",
        "memory_limit",
        str,
        None,
        "memory cap for the whole QEMU process (guest RAM plus QEMU's own), like 1G, by"
        " cgroup; more than [machine] memory",
        convert=_limit_bytes,
    ),
    Setting(
        "resources",
        "mem_merge",
        bool,
        None,
        "KSM: let the host merge identical guest pages (true needs KSM running on the host);"
        " unset: QEMU's default",
    ),
    Setting(
        "resources",
        "hugepages",
        bool,
        False,
        "back guest RAM with hugepages from a mounted hugetlbfs (enough must be free at start)",
    ),
    # Any [cloud-init] table, even an empty one, attaches a NoCloud seed ISO as a CD-ROM.
    Setting(
        "cloud-init",
        "hostname",
        str,
        None,
        "the guest's hostname (meta-data local-hostname); a dotted name also sets the FQDN",
    ),
    Setting(
        "cloud-init",
        "ssh_authorized_keys",
        list,
        [],
        "public keys for the default user, one line each",
        item_type=str,
    ),
    Setting(
        "cloud-init",
        "user_data",
        str,
        None,
        "a user-data file used verbatim (hostname and keys then go into meta-data); without it"
        " a #cloud-config with hostname and keys is written",
    ),
    Setting("cloud-init", "network_config", str, None, "a network-config file (v1 or v2)"),
)

SECTIONS: dict[str, dict[str, Setting]] = {}
for _s in SETTINGS:
    SECTIONS.setdefault(_s.section, {})[_s.key] = _s


def reference_markdown() -> str:
    """The README's profile reference, generated so it cannot drift from the table."""
    lines = []
    for section, keys in SECTIONS.items():
        header = f"[[{section}]]" if section in ARRAY_SECTIONS else f"[{section}]"
        lines.append(f"#### `{header}`\n")
        lines.append("| key | type | default | meaning |")
        lines.append("|---|---|---|---|")
        for s in keys.values():
            default = "" if s.default in (None, [], "") else f"`{s.default!r}`".replace("'", '"')
            if s.default is True or s.default is False:
                default = f"`{str(s.default).lower()}`"
            meaning = s.help
            if s.choices:
                meaning += " (" + ", ".join(f"`{c}`" for c in s.choices) + ")"
            lines.append(f"| `{s.key}` | {s.type_name} | {default} | {meaning} |")
        lines.append("")
    return "\n".join(lines)
