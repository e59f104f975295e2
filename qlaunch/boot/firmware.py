"""Firmware from QEMU's firmware descriptors, picked the way libvirt picks it.

QEMU's `docs/interop/firmware.json` describes each firmware build in a small JSON file: its
interface (bios, uefi), the files (code and variable-store template), the targets (architecture
and machine-type globs) and features (secure-boot, enrolled-keys, requires-smm...). Distributions
ship them in /usr/share/qemu/firmware (Debian: `ovmf`, `qemu-efi-aarch64`, `qemu-efi-arm`);
/etc/qemu/firmware and ~/.config/qemu/firmware override them by file name (an empty file there
hides one), and the first match in file-name order wins. Reading them instead of hard-coding
paths keeps working when a distribution renames its files.

`select` is pure (descriptors in, choice out); `load_descriptors` reads the directories;
`qemu_args` gives the command-line fragment for a choice.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlaunch.errors import HostError, UsageError

log = logging.getLogger("qlaunch.firmware")

FIRMWARE_KINDS = ("bios", "uefi", "uefi-secure")
# The Debian package that ships the UEFI builds (and their descriptors) for each guest arch.
# SeaBIOS, which QEMU loads itself, runs 32-bit guests as well as 64-bit ones.
BIOS_ARCHES = ("x86_64", "i386")
FIRMWARE_PACKAGE = {"x86_64": "ovmf", "aarch64": "qemu-efi-aarch64", "arm": "qemu-efi-arm"}
# Versionless machine names are QEMU aliases of the newest versioned type of that family.
MACHINE_FAMILY = {"q35": "pc-q35", "pc": "pc-i440fx", "virt": "virt"}
SYSTEM_DIRS = ("/etc/qemu/firmware", "/usr/share/qemu/firmware")


@dataclass(frozen=True)
class Descriptor:
    """One firmware descriptor, as far as qlaunch uses it."""

    path: str
    interfaces: tuple[str, ...]
    device: str  # flash, memory, kernel
    mode: str = "split"  # flash only: split (code + vars), combined, stateless
    executable: str | None = None
    executable_format: str = "raw"
    nvram_template: str | None = None
    nvram_format: str = "raw"
    targets: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (architecture, machine globs)
    features: frozenset[str] = frozenset()
    missing: tuple[str, ...] = field(default=())  # files it names that are not there

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


@dataclass(frozen=True)
class FirmwareChoice:
    """What to boot with. code None with kind "bios": QEMU's own default BIOS (SeaBIOS)."""

    kind: str  # "bios" or "uefi"
    code: str | None
    vars_template: str | None
    format: str  # the code file's format: raw or qcow2
    vars_format: str
    secure_boot: bool
    requires_smm: bool
    descriptor: str | None
    device: str = "flash"  # flash: pflash drives; memory: -bios


@dataclass(frozen=True)
class FirmwareArgs:
    """The QEMU argv fragment for a choice: options for -machine, and arguments to append."""

    machine_opts: tuple[str, ...] = ()
    args: tuple[str, ...] = ()


# --- reading --------------------------------------------------------------------------------


class DescriptorError(ValueError):
    """A descriptor file that does not follow firmware.json: skipped with a warning."""


def parse_descriptor(path: str, text: str) -> Descriptor:
    """A Descriptor from the JSON text of `path`; DescriptorError when it is not one."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DescriptorError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise DescriptorError(f"{path}: not a JSON object")
    mapping = data.get("mapping")
    if not isinstance(mapping, dict) or not isinstance(mapping.get("device"), str):
        raise DescriptorError(f"{path}: no mapping.device")
    device = mapping["device"]
    executable: str | None = None
    exe_fmt = "raw"
    nvram: str | None = None
    nvram_fmt = "raw"
    if device == "flash":
        executable, exe_fmt = _file(path, mapping, "executable")
        if "nvram-template" in mapping:
            nvram, nvram_fmt = _file(path, mapping, "nvram-template")
    elif device == "memory":
        filename = mapping.get("filename")
        if not isinstance(filename, str):
            raise DescriptorError(f"{path}: mapping.filename missing")
        executable = filename
    targets = []
    for t in _list(path, data, "targets"):
        if not isinstance(t, dict) or not isinstance(t.get("architecture"), str):
            raise DescriptorError(f"{path}: a target without an architecture")
        machines = t.get("machines", [])
        if not isinstance(machines, list) or not all(isinstance(m, str) for m in machines):
            raise DescriptorError(f"{path}: target machines must be a list of strings")
        targets.append((t["architecture"], tuple(machines)))
    return Descriptor(
        path=path,
        interfaces=tuple(str(i) for i in _list(path, data, "interface-types")),
        device=device,
        mode=str(mapping.get("mode", "split")),
        executable=executable,
        executable_format=exe_fmt,
        nvram_template=nvram,
        nvram_format=nvram_fmt,
        targets=tuple(targets),
        features=frozenset(str(f) for f in data.get("features", []) or []),
    )


def _file(path: str, mapping: Mapping[str, Any], key: str) -> tuple[str, str]:
    entry = mapping.get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
        raise DescriptorError(f"{path}: mapping.{key}.filename missing")
    return entry["filename"], str(entry.get("format", "raw"))


def _list(path: str, data: Mapping[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise DescriptorError(f"{path}: {key} must be a list")
    return value


def search_dirs() -> tuple[str, ...]:
    """Descriptor directories, highest priority first: the user's, /etc, then the packages'."""
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return (os.path.join(xdg, "qemu", "firmware"), *SYSTEM_DIRS)


def descriptor_files(dirs: Sequence[str]) -> list[str]:
    """The descriptor files in effect, in priority order (by file name).

    A name in an earlier directory shadows the same name in later ones; an empty file there
    hides the name altogether (QEMU's firmware.json rules, as libvirt applies them).
    """
    chosen: dict[str, str] = {}
    for d in dirs:
        try:
            names = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            if name.endswith(".json") and name not in chosen:
                chosen[name] = os.path.join(d, name)
    files = []
    for name in sorted(chosen):
        try:
            if os.path.getsize(chosen[name]) == 0:
                continue
        except OSError:
            continue
        files.append(chosen[name])
    return files


def load_descriptors(
    dirs: Sequence[str] | None = None, *, exists: Callable[[str], bool] = os.path.exists
) -> list[Descriptor]:
    """Every descriptor in effect, in priority order; broken ones are skipped with a warning.

    Each notes the files it names that are missing (Debian's aarch64 secure descriptor names
    an AAVMF_CODE.secboot.fd the package does not ship), so that `select` passes over it.
    """
    out = []
    for path in descriptor_files(search_dirs() if dirs is None else dirs):
        try:
            with open(path, encoding="utf-8") as f:
                d = parse_descriptor(path, f.read())
        except (OSError, UnicodeDecodeError, DescriptorError) as e:
            log.warning("firmware descriptor skipped: %s", e)
            continue
        named = [p for p in (d.executable, d.nvram_template) if p]
        missing = tuple(p for p in named if not exists(p))
        if missing:
            d = dataclasses.replace(d, missing=missing)
        out.append(d)
    return out


# --- choosing -------------------------------------------------------------------------------


def machine_matches(machine: str, pattern: str) -> bool:
    """Does a descriptor's machine glob cover this machine type?

    An alias (q35, pc, virt) stands for its family's newest version, which only QEMU knows, so
    it matches a pattern that takes every version of the family ("pc-q35-*"), not one that
    names some ("pc-q35-2.*").
    """
    if fnmatch.fnmatchcase(machine, pattern):
        return True
    family = MACHINE_FAMILY.get(machine)
    return family is not None and fnmatch.fnmatchcase(f"{family}-*", pattern)


def _targets(d: Descriptor, arch: str, machine: str) -> bool:
    return any(
        a == arch and any(machine_matches(machine, m) for m in machines)
        for a, machines in d.targets
    )


def _usable_mapping(d: Descriptor, kind: str) -> bool:
    if kind == "uefi":
        # Split flash only: qlaunch gives every VM its own copy of the variable store.
        return d.device == "flash" and d.mode == "split" and d.nvram_template is not None
    return d.device == "memory"


def _wanted(d: Descriptor, wanted: str) -> bool:
    secure = "secure-boot" in d.features
    if wanted == "uefi-secure":
        # Secure Boot with no keys enrolled is in setup mode and enforces nothing.
        return secure and "enrolled-keys" in d.features
    if wanted == "uefi":
        return not secure
    return True


def check_kind(wanted: str, arch: str) -> None:
    """Refuse a firmware name qlaunch does not know, or BIOS where there is none."""
    if wanted not in FIRMWARE_KINDS:
        raise UsageError(
            f"unknown firmware {wanted!r}", hint=f"one of: auto, {', '.join(FIRMWARE_KINDS)}"
        )
    if wanted == "bios" and arch not in BIOS_ARCHES:
        raise UsageError(
            f"there is no BIOS for {arch} guests",
            hint='use firmware = "uefi" (or "auto"), or boot a kernel directly',
        )


def select(
    descriptors: Iterable[Descriptor], arch: str, machine: str, wanted: str
) -> FirmwareChoice:
    """The firmware for (arch, machine, wanted), from descriptors in priority order.

    wanted: "bios", "uefi" (without Secure Boot) or "uefi-secure" (Secure Boot with keys
    enrolled). The first descriptor that fits wins, as in libvirt.
    """
    check_kind(wanted, arch)
    descs = list(descriptors)
    kind = "bios" if wanted == "bios" else "uefi"
    if kind == "bios":
        for d in descs:
            usable = "bios" in d.interfaces and _usable_mapping(d, "bios")
            if usable and _targets(d, arch, machine) and not d.missing:
                return _choice(d, "bios")
        # No descriptor: QEMU loads SeaBIOS itself (the seabios package comes with QEMU).
        return FirmwareChoice("bios", None, None, "raw", "raw", False, False, None, "memory")
    package = FIRMWARE_PACKAGE.get(arch)
    for_arch = [
        d
        for d in descs
        if "uefi" in d.interfaces
        and _usable_mapping(d, "uefi")
        and any(a == arch for a, _ in d.targets)
    ]
    if not [d for d in for_arch if not d.missing]:
        missing = sorted({p for d in for_arch for p in d.missing})
        what = f" ({', '.join(missing)} missing)" if missing else ""
        raise HostError(
            f"no UEFI firmware for {arch} guests is installed{what}",
            hint=f"apt-get install {package}" if package else "install UEFI firmware for it",
        )
    for_machine = [d for d in for_arch if _targets(d, arch, machine)]
    if not for_machine:
        globs = sorted({m for d in for_arch for a, ms in d.targets if a == arch for m in ms})
        raise UsageError(
            f"no UEFI firmware for machine {machine!r} ({arch})",
            hint=f"the firmware installed runs on machines {', '.join(globs)}",
        )
    fits = [d for d in for_machine if _wanted(d, wanted)]
    present = [d for d in fits if not d.missing]
    if present:
        return _choice(present[0], "uefi")
    if fits:
        raise HostError(
            f"the {wanted} firmware for {arch} names files that are missing: "
            + ", ".join(sorted({p for d in fits for p in d.missing})),
            hint=f"reinstall it: apt-get install --reinstall {package}",
        )
    if wanted == "uefi-secure":
        hint = "Secure Boot on x86_64 needs machine q35 (with SMM)" if arch == "x86_64" else None
        raise UsageError(
            f"no UEFI firmware with Secure Boot and enrolled keys for machine {machine!r} ({arch})",
            hint=hint or 'use firmware = "uefi"',
        )
    raise UsageError(
        f"no UEFI firmware without Secure Boot for machine {machine!r} ({arch})",
        hint='use firmware = "uefi-secure"',
    )


def _choice(d: Descriptor, kind: str) -> FirmwareChoice:
    return FirmwareChoice(
        kind=kind,
        code=d.executable,
        vars_template=d.nvram_template,
        format=d.executable_format,
        vars_format=d.nvram_format,
        secure_boot="secure-boot" in d.features,
        requires_smm="requires-smm" in d.features,
        descriptor=d.path,
        device=d.device,
    )


def choose(
    arch: str, machine: str, wanted: str, dirs: Sequence[str] | None = None
) -> FirmwareChoice:
    """select() over the descriptors installed on this host."""
    check_kind(wanted, arch)
    return select(load_descriptors(dirs), arch, machine, wanted)


def resolve_auto(arch: str, *, kernel: bool, disk: bool) -> str | None:
    """firmware = "auto": None (direct kernel boot) when there is a kernel; else what a disk
    on this arch boots with. Nothing to boot at all is an error before QEMU starts."""
    if kernel:
        return None
    if not disk:
        raise UsageError(
            "nothing to boot: no [boot] kernel and no [[disk]]",
            hint="give a kernel, or a disk with an operating system on it",
        )
    if arch in ("ppc64le", "s390x", "mips64el"):
        # pseries runs VOF, which boots no disk; s390x's and malta's firmware qlaunch does not
        # drive.
        raise UsageError(
            f"qlaunch boots {arch} guests from a [boot] kernel only, not from a disk",
            hint=f"give a kernel (asset:{arch}/kernel, or the guest's own) and its initrd",
        )
    return "bios" if arch in BIOS_ARCHES else "uefi"


# --- using ----------------------------------------------------------------------------------


def _esc(value: str) -> str:
    # qlaunch.launch.argv.esc's rule (a comma is written twice); boot sits below launch in
    # the layers, so it cannot import it.
    return value.replace(",", ",,")


def qemu_args(choice: FirmwareChoice, vars_path: str | None) -> FirmwareArgs:
    """The argv fragment for a choice; vars_path is this VM's own copy of the variable store."""
    if choice.code is None:
        return FirmwareArgs()
    if choice.device == "memory":
        return FirmwareArgs(args=("-bios", choice.code))
    args = [
        "-drive",
        f"if=pflash,format={choice.format},unit=0,readonly=on,file={_esc(choice.code)}",
    ]
    if choice.vars_template is not None:
        if vars_path is None:
            raise ValueError("a split-flash firmware needs the path of the VM's variable store")
        args += ["-drive", f"if=pflash,format={choice.vars_format},unit=1,file={_esc(vars_path)}"]
    machine_opts: tuple[str, ...] = ()
    if choice.requires_smm:
        # The build keeps its variable store behind SMM: without SMM it hangs before printing
        # anything, and the flash must be writable from SMM only.
        machine_opts = ("smm=on",)
        args += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    return FirmwareArgs(machine_opts=machine_opts, args=tuple(args))


def ensure_vars(choice: FirmwareChoice, dest: str | os.PathLike[str]) -> bool:
    """Give a VM its own variable store: a copy of the template, made once and then kept
    (a VM's UEFI variables live on across stops). True when it was made now."""
    if choice.vars_template is None:
        raise ValueError(f"{choice.descriptor}: this firmware has no variable store")
    target = Path(dest)
    if target.exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(choice.vars_template, "rb") as src:
            shutil.copyfileobj(src, out)
        try:
            # A hard link publishes it only if no other start made one meanwhile.
            os.link(tmp, target)
        except FileExistsError:
            return False
    except FileNotFoundError as e:
        raise HostError(
            f"firmware variable store template {choice.vars_template} is missing",
            hint="reinstall the firmware package",
        ) from e
    finally:
        os.unlink(tmp)
    return True
