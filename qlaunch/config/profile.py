"""Profiles: TOML loading, `extends` chains, `--set` overrides, validation into frozen dataclasses.

Every error names the file and the key, so that a user can go straight to the line.
"""

from __future__ import annotations

import copy
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from qlaunch import paths
from qlaunch.config import boards
from qlaunch.config.settings import ARRAY_SECTIONS, SECTIONS, Setting
from qlaunch.errors import ProfileError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Machine:
    arch: str
    machine: str
    cpu: str | None
    smp: int
    memory_mib: int
    accel: str
    tpm: bool = False


@dataclass(frozen=True)
class Boot:
    kernel: str | None
    initrd: str | None
    append: str
    dtb: str | None
    modules: tuple[str, ...]
    quiet: bool
    firmware: str = "auto"  # auto, bios, uefi, uefi-secure
    order: tuple[str, ...] = ()  # boot devices in the firmware's order


@dataclass(frozen=True)
class Disk:
    path: str
    format: str
    interface: str
    media: str
    readonly: bool
    cache: str
    snapshot: bool
    size: int | None = None  # bytes; creates a missing image at start
    force_unsafe: bool = False
    # The [cloud-init] seed CD-ROM: its path is a placeholder until the launch builds it.
    cloud_init_seed: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class CloudInit:
    hostname: str | None
    ssh_authorized_keys: tuple[str, ...]
    user_data: str | None  # paths, read at launch
    network_config: str | None


SEED_PLACEHOLDER = "<cloud-init seed ISO built at start>"


@dataclass(frozen=True)
class Net:
    mode: str
    forward: tuple[str, ...]
    model: str | None
    mac: str | None
    network: str | None
    bridge: str | None
    ip: str | None
    smb: str | None


@dataclass(frozen=True)
class Share:
    """[[share]]: a host directory the guest mounts by its tag (qlaunch.launch.shares)."""

    path: str
    tag: str
    guest: str
    readonly: bool = False
    type: str = "auto"  # auto, virtiofs, 9p


# A virtio-9p mount tag is at most 31 bytes; the same names then work for both kinds.
SHARE_TAG_RE = re.compile(r"^[A-Za-z0-9_.-]{1,31}$")


@dataclass(frozen=True)
class Resources:
    """[resources]: what qlaunch.vm.resources applies on the host at start."""

    cpu_affinity: tuple[int, ...] = ()
    cpu_limit: int | None = None  # percent of one host CPU
    memory_limit: int | None = None  # bytes
    mem_merge: bool | None = None  # None: QEMU's default
    hugepages: bool = False

    @property
    def any(self) -> bool:
        """Something for qlaunch.vm.resources to do on the host (mem_merge = false is only
        argv)."""
        return bool(
            self.cpu_affinity
            or self.cpu_limit
            or self.memory_limit
            or self.mem_merge
            or self.hugepages
        )


@dataclass(frozen=True)
class Profile:
    name: str
    source: str  # the file it came from, for messages
    machine: Machine
    boot: Boot
    disks: tuple[Disk, ...]
    nets: tuple[Net, ...]
    console_tty: str
    display: str
    vnc: str
    qemu_extra: tuple[str, ...]
    qemu_binary: str | None
    raw: dict[str, Any] = field(compare=False, repr=False)  # merged TOML, for the state record
    cloud_init: CloudInit | None = None
    resources: Resources = field(default_factory=Resources)
    shares: tuple[Share, ...] = ()

    @property
    def board(self) -> boards.Board:
        b = boards.board_for(self.machine.arch, self.machine.machine)
        assert b is not None  # validated in build()
        return b


# ---- finding and loading -------------------------------------------------------------------


def find(name_or_path: str) -> Path:
    """A profile by path (contains / or ends in .toml) or by name in the profile directories."""
    if "/" in name_or_path or name_or_path.endswith(".toml"):
        p = Path(name_or_path)
        what = _not_a_file(p)
        if what is not None:
            raise ProfileError(f"profile file {name_or_path} {what}")
        return p
    if not NAME_RE.match(name_or_path):
        raise ProfileError(
            f"{name_or_path!r} is not a profile name",
            hint="names use letters, digits, '-', '_' and '.'; or give a path to a .toml file",
        )
    for d in paths.profile_dirs():
        p = d / f"{name_or_path}.toml"
        what = _not_a_file(p)
        if what is None:
            return p
        if what != "does not exist":
            raise ProfileError(f"profile {name_or_path}: {p} {what}")
    known = ", ".join(sorted(available())) or "none"
    raise ProfileError(
        f"no profile named {name_or_path!r}",
        hint=f"known profiles: {known}",
    )


def _not_a_file(p: Path) -> str | None:
    """None for a regular file; else what is there instead, in words. A FIFO is refused
    before it is opened: reading one would wait for a writer forever."""
    try:
        st = p.stat()
    except (FileNotFoundError, NotADirectoryError):
        return "does not exist"
    except OSError as e:
        return f"cannot be read: {e.strerror}"
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a profile file"
    if stat.S_ISFIFO(st.st_mode):
        return "is a FIFO (named pipe), not a profile file"
    return "is not a regular file"


def available() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in reversed(paths.profile_dirs()):
        if d.is_dir():
            for p in d.glob("*.toml"):
                found[p.stem] = p
    return found


def _read_toml(path: Path) -> dict[str, Any]:
    what = _not_a_file(path)
    if what is not None:
        raise ProfileError(f"{path} {what}")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ProfileError(
            f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})",
            hint="TOML files are UTF-8; convert it, e.g. with iconv",
        ) from None
    except OSError as e:
        raise ProfileError(f"{path}: cannot read: {e.strerror}") from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; arrays of tables ([[disk]], [[net]]) and lists replace."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_raw(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The profile's TOML with its `extends` chain merged in (parents first)."""
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(p.stem for p in (*_chain, resolved))
        raise ProfileError(f"{path}: extends: cycle {cycle}")
    data = _read_toml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ProfileError(f"{path}: extends: expected a profile name, got {parent!r}")
    try:
        parent_path = _find_relative(parent, path)
    except ProfileError as e:
        raise ProfileError(f"{path}: extends: {e.message}", hint=e.hint) from None
    return _merge(load_raw(parent_path, (*_chain, resolved)), data)


def _find_relative(name: str, child: Path) -> Path:
    sibling = child.parent / f"{name}.toml"
    if "/" not in name and sibling.is_file():
        return sibling
    return find(name)


def parse_set(assignment: str) -> tuple[list[str], Any]:
    """`machine.memory=1G` or `disk.0.path=x.img` -> (["machine", "memory"], "1G").

    The value is read as TOML where it parses (numbers, booleans, lists), else as a string.
    """
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ProfileError(
            f"--set {assignment!r}: expected SECTION.KEY=VALUE", hint="e.g. --set machine.memory=1G"
        )
    parts = key.strip().split(".")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return parts, value


def apply_sets(data: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for assignment in sets:
        parts, value = parse_set(assignment)
        where = f"--set {assignment}"
        if len(parts) == 2 and parts[0] not in ARRAY_SECTIONS:
            out.setdefault(parts[0], {})
            if not isinstance(out[parts[0]], dict):
                raise ProfileError(f"{where}: [{parts[0]}] is not a table")
            out[parts[0]][parts[1]] = value
        elif len(parts) == 3 and parts[0] in ARRAY_SECTIONS and parts[1].isdigit():
            items = out.setdefault(parts[0], [])
            index = int(parts[1])
            if index > len(items):
                raise ProfileError(
                    f"{where}: there is no {parts[0]} {index - 1} to add {index} after",
                    hint=f"the profile has {len(items)} [[{parts[0]}]] entries",
                )
            if index == len(items):
                items.append({})
            items[index][parts[2]] = value
        else:
            raise ProfileError(
                f"{where}: expected SECTION.KEY=VALUE or disk.N.KEY=VALUE",
                hint="e.g. --set machine.memory=1G or --set disk.0.path=root.img",
            )
    return out


# ---- validation ----------------------------------------------------------------------------


def _value(src: str, section: str, s: Setting, table: dict[str, Any], label: str) -> Any:
    if s.key not in table:
        return copy.deepcopy(s.default)
    v = table[s.key]
    where = f"{src}: {label} {s.key}"
    if s.type is list:
        if not isinstance(v, list) or not all(isinstance(i, s.item_type or str) for i in v):
            raise ProfileError(f"{where}: expected a {s.type_name}, got {v!r}")
    elif s.type is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ProfileError(f"{where}: expected an integer, got {v!r}")
    elif s.type is bool:
        if not isinstance(v, bool):
            raise ProfileError(f"{where}: expected true or false, got {v!r}")
    elif s.type is str:
        # Sizes may be written as bare numbers (memory = 512 means 512M).
        if isinstance(v, int) and not isinstance(v, bool) and s.convert is not None:
            pass
        elif not isinstance(v, str):
            raise ProfileError(f"{where}: expected a string, got {v!r}")
    if s.choices and v not in s.choices:
        raise ProfileError(f"{where}: {v!r} is not one of {', '.join(s.choices)}")
    if s.convert is not None:
        try:
            v = s.convert(v)
        except (ValueError, TypeError) as e:
            raise ProfileError(f"{where}: {e}") from None
    return v


def _table(src: str, data: dict[str, Any], section: str) -> dict[str, Any]:
    t = data.get(section, {})
    if not isinstance(t, dict):
        raise ProfileError(f"{src}: [{section}] must be a table")
    unknown = sorted(set(t) - set(SECTIONS[section]))
    if unknown:
        raise ProfileError(
            f"{src}: [{section}] unknown key {unknown[0]!r}",
            hint="known keys: " + ", ".join(SECTIONS[section]),
        )
    return {k: _value(src, section, s, t, f"[{section}]") for k, s in SECTIONS[section].items()}


def _entries(src: str, data: dict[str, Any], section: str) -> list[dict[str, Any]]:
    items = data.get(section, [])
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ProfileError(f"{src}: [[{section}]] must be an array of tables")
    out = []
    for n, item in enumerate(items):
        unknown = sorted(set(item) - set(SECTIONS[section]))
        label = f"[[{section}]] #{n}"
        if unknown:
            raise ProfileError(
                f"{src}: {label} unknown key {unknown[0]!r}",
                hint="known keys: " + ", ".join(SECTIONS[section]),
            )
        out.append({k: _value(src, section, s, item, label) for k, s in SECTIONS[section].items()})
    return out


KNOWN_TOP = {s for s in SECTIONS} | {"extends", "description"}


def build(data: dict[str, Any], *, name: str, source: str) -> Profile:
    """Validate merged TOML into a Profile. Pure: touches no files."""
    unknown = sorted(set(data) - KNOWN_TOP)
    if unknown:
        raise ProfileError(
            f"{source}: unknown section {unknown[0]!r}",
            hint="known sections: " + ", ".join(sorted(KNOWN_TOP - {"extends", "description"})),
        )
    m = _table(source, data, "machine")
    arch = m["arch"]
    machine = m["machine"] or boards.DEFAULT_MACHINE[arch]
    board = boards.board_for(arch, machine)
    if board is None:
        fits = ", ".join(sorted(boards.machines_for(arch)))
        other = [a for a in boards.ARCHES if boards.board_for(a, machine)]
        hint = f"machines for {arch}: {fits}"
        if other:
            hint = f"{machine} is a board for {other[0]}: set [machine] arch = {other[0]!r}"
        raise ProfileError(
            f"{source}: [machine] machine: {machine!r} is not a machine for arch {arch}", hint=hint
        )
    smp = m["smp"]
    if board.smp_fixed is not None and "smp" in data.get("machine", {}) and smp != board.smp_fixed:
        raise ProfileError(
            f"{source}: [machine] smp: {machine} has exactly {board.smp_fixed} CPUs, not {smp}"
        )
    if board.smp_fixed is not None:
        smp = board.smp_fixed
    if board.smp_max is not None and smp > board.smp_max:
        raise ProfileError(
            f"{source}: [machine] smp: {machine} takes at most {board.smp_max} CPUs, not {smp}"
        )
    mem = m["memory"] if m["memory"] is not None else board.memory_default_mib
    if board.memory_fixed_mib is not None and mem != board.memory_fixed_mib:
        raise ProfileError(
            f"{source}: [machine] memory: {machine} takes exactly "
            f"{_mib(board.memory_fixed_mib)} of RAM, not {_mib(mem)}",
            hint=f'set [machine] memory = "{_mib(board.memory_fixed_mib)}" or leave it out',
        )
    if board.memory_max_mib is not None and mem > board.memory_max_mib:
        raise ProfileError(
            f"{source}: [machine] memory: {machine} takes at most "
            f"{_mib(board.memory_max_mib)} of RAM, not {_mib(mem)}"
        )
    align = board.memory_align_mib
    if align is not None and mem % align:
        raise ProfileError(
            f"{source}: [machine] memory: {machine} takes RAM in steps of {_mib(align)}, "
            f"not {_mib(mem)}",
            hint=f'set [machine] memory = "{_mib(-(-mem // align) * align)}"',
        )
    b = _table(source, data, "boot")
    con = _table(source, data, "console")
    disp = _table(source, data, "display")
    q = _table(source, data, "qemu")
    if disp["type"] == "vnc" and board.virtio == "":
        raise ProfileError(f"{source}: [display] type: {machine} has no display qlaunch can drive")

    disks: list[Disk] = []
    for n, d in enumerate(_entries(source, data, "disk")):
        if not d["path"]:
            raise ProfileError(f"{source}: [[disk]] #{n} path: required")
        iface = d["interface"] or board.storage[0]
        if iface not in board.storage:
            raise ProfileError(
                f"{source}: [[disk]] #{n} interface: {machine} has no {iface} storage",
                hint="interfaces for this board: " + ", ".join(board.storage),
            )
        if iface == "sd" and sum(x.interface == "sd" for x in disks) >= board.sd_slots:
            raise ProfileError(
                f"{source}: [[disk]] #{n} interface: {machine} has {board.sd_slots} SD card "
                f"slot{'s' if board.sd_slots != 1 else ''}, filled by an earlier [[disk]]"
            )
        fmt = d["format"] or _format_from_name(d["path"])
        disk = Disk(
            path=d["path"],
            format=fmt,
            interface=iface,
            media=d["media"],
            readonly=d["readonly"] or d["media"] == "cdrom",
            cache=d["cache"],
            snapshot=d["snapshot"],
            size=d["size"],
            force_unsafe=d["force_unsafe"],
        )
        _check_disk(source, n, disk)
        disks.append(disk)
    cloud_init = _cloud_init(source, data)
    if cloud_init is not None:
        disks.append(_seed_disk(source, board))
    nets = []
    for n, e in enumerate(_entries(source, data, "net")):
        if e["mode"] == "none":
            continue
        if board.nic_model is None and e["model"] is None:
            raise ProfileError(
                f"{source}: [[net]] #{n}: {machine} has no network card",
                hint='set [[net]] model = "usb-net" to add a USB one, or mode = "none"',
            )
        if e["mode"] == "network" and not e["network"]:
            raise ProfileError(f"{source}: [[net]] #{n} network: required with mode = network")
        if e["mode"] == "bridge" and not e["bridge"]:
            raise ProfileError(f"{source}: [[net]] #{n} bridge: required with mode = bridge")
        if e["forward"] and e["mode"] != "user":
            raise ProfileError(f"{source}: [[net]] #{n} forward: only with mode = user")
        nets.append(
            Net(
                mode=e["mode"],
                forward=tuple(e["forward"]),
                model=e["model"],
                mac=e["mac"],
                network=e["network"],
                bridge=e["bridge"],
                ip=e["ip"],
                smb=e["smb"],
            )
        )
    r = _table(source, data, "resources")
    if r["memory_limit"] is not None and r["memory_limit"] <= mem << 20:
        raise ProfileError(
            f"{source}: [resources] memory_limit: {_mib(r['memory_limit'] >> 20)} does not "
            f"even hold the guest's {_mib(mem)} of RAM",
            hint="the limit counts QEMU's own memory too: allow 100M or more above the RAM",
        )
    resources = Resources(
        tuple(r["cpu_affinity"]), r["cpu_limit"], r["memory_limit"], r["mem_merge"], r["hugepages"]
    )
    shares = _shares(source, data, board)
    if b["initrd"] == "qlaunch" and not b["kernel"]:
        raise ProfileError(f'{source}: [boot] kernel: required with initrd = "qlaunch"')
    return Profile(
        name=name,
        source=source,
        machine=Machine(arch, machine, m["cpu"], smp, mem, m["accel"], m["tpm"]),
        boot=Boot(
            b["kernel"],
            b["initrd"],
            b["append"],
            b["dtb"] or _board_dtb(board, b),
            tuple(b["modules"]),
            b["quiet"],
            _firmware(source, b, arch),
            tuple(b["order"]),
        ),
        disks=tuple(disks),
        nets=tuple(nets),
        console_tty=con["tty"] or board.console,
        display=disp["type"],
        vnc=disp["vnc"],
        qemu_extra=tuple(q["extra"]),
        qemu_binary=q["binary"],
        raw=data,
        cloud_init=cloud_init,
        resources=resources,
        shares=shares,
    )


def _shares(source: str, data: dict[str, Any], board: boards.Board) -> tuple[Share, ...]:
    out: list[Share] = []
    for n, e in enumerate(_entries(source, data, "share")):
        where = f"{source}: [[share]] #{n}"
        if not e["path"]:
            raise ProfileError(f"{where} path: required")
        if not board.virtio:
            raise ProfileError(
                f"{where}: {board.machine} has no virtio transport for a share",
                hint="use a virt board (aarch64-virt, arm-virt) or an x86_64 profile",
            )
        tag = e["tag"] or f"share{n}"
        if not SHARE_TAG_RE.match(tag):
            raise ProfileError(
                f"{where} tag: {tag!r} is not a mount tag (1 to 31 of A-Z a-z 0-9 _ . -)"
            )
        if any(x.tag == tag for x in out):
            raise ProfileError(f"{where} tag: {tag!r} is the tag of an earlier [[share]]")
        guest = e["guest"] or f"/mnt/{tag}"
        g = PurePosixPath(guest)
        if not g.is_absolute() or ".." in g.parts or any(c.isspace() for c in guest):
            raise ProfileError(
                f"{where} guest: {guest!r} must be an absolute path, without '..' or spaces"
            )
        if e["readonly"] and e["type"] == "virtiofs":
            raise ProfileError(
                f"{where} type: virtiofsd cannot export a directory read-only",
                hint='set type = "9p" or "auto" for a read-only share',
            )
        out.append(Share(e["path"], tag, str(g), e["readonly"], e["type"]))
    return tuple(out)


def _format_from_name(path: str) -> str:
    """Never guessed from the content: a raw image could then pose as qcow2 with a backing file."""
    for fmt in ("qcow2", "vdi", "vmdk"):
        if path.endswith(f".{fmt}"):
            return fmt
    return "raw"


def _check_disk(source: str, n: int, d: Disk) -> None:
    where = f"{source}: [[disk]] #{n}"
    if d.cache == "unsafe" and not (d.readonly or d.snapshot or d.force_unsafe):
        raise ProfileError(
            f'{where} cache: "unsafe" ignores the guest\'s flushes, so a crash of QEMU or the '
            f"host can corrupt {d.path}",
            hint="add snapshot = true for a throwaway disk, or force_unsafe = true on this disk "
            "if its data is expendable",
        )
    if d.size is not None:
        if d.readonly:
            raise ProfileError(
                f"{where} size: a read-only disk or CD-ROM cannot start as a new empty image",
                hint="drop size, or make the image first (qlaunch image create)",
            )
        if d.interface == "sd" and d.size & (d.size - 1):
            from qlaunch.units import format_size, round_up_pow2

            raise ProfileError(
                f"{where} size: SD card images must be a power of two in size, not "
                f"{format_size(d.size)}",
                hint=f'size = "{format_size(round_up_pow2(d.size))}"',
            )


def _firmware(source: str, b: dict[str, Any], arch: str) -> str:
    """[boot] firmware, checked against the arch (what there is to boot: at launch)."""
    fw = str(b["firmware"])
    if fw == "bios" and arch not in ("x86_64", "i386"):
        raise ProfileError(
            f"{source}: [boot] firmware: there is no BIOS for {arch} guests",
            hint='use firmware = "uefi" (or "auto"), or boot a kernel directly',
        )
    if b["order"] and fw == "auto" and b["kernel"]:
        raise ProfileError(
            f"{source}: [boot] order: a kernel given in [boot] boots directly, with no "
            "firmware to follow a boot order",
            hint='drop the kernel to boot from the disks, or set firmware = "uefi" or "bios"',
        )
    return fw


def _cloud_init(source: str, data: dict[str, Any]) -> CloudInit | None:
    if "cloud-init" not in data:
        return None
    from qlaunch.config import cloud_init
    from qlaunch.errors import UsageError

    c = _table(source, data, "cloud-init")
    try:
        if c["hostname"] is not None:
            cloud_init.check_hostname(c["hostname"])
        keys = cloud_init.check_keys(c["ssh_authorized_keys"])
    except UsageError as e:
        raise ProfileError(f"{source}: [cloud-init] {e.message}", hint=e.hint) from None
    return CloudInit(c["hostname"], keys, c["user_data"], c["network_config"])


def _seed_disk(source: str, board: boards.Board) -> Disk:
    # argv puts a CD-ROM on virtio-scsi unless it is IDE; boards with only SD have no CD-ROM.
    if board.storage == ("sd",):
        raise ProfileError(
            f"{source}: [cloud-init]: {board.machine} has only an SD card slot, no bus for the "
            "seed CD-ROM",
            hint="use a virt board, or put the seed files on the SD card's image yourself",
        )
    return Disk(
        path=SEED_PLACEHOLDER,
        format="raw",
        interface="scsi",
        media="cdrom",
        readonly=True,
        cache="writeback",
        snapshot=False,
        cloud_init_seed=True,
    )


def _board_dtb(board: boards.Board, b: dict[str, Any]) -> str | None:
    """Boards that need a DTB take it from the kernel's asset set when the kernel is an asset."""
    kernel = b["kernel"] or ""
    if board.dtb and kernel.startswith("asset:"):
        return f"{kernel.split('/', 1)[0]}/dtbs/{board.dtb}"
    return None


def _mib(n: int) -> str:
    return f"{n // 1024}G" if n % 1024 == 0 else f"{n}M"


def load(name_or_path: str, sets: list[str] | None = None) -> Profile:
    path = find(name_or_path)
    data = load_raw(path)
    if not sets:
        return build(data, name=path.stem, source=str(path))
    final = apply_sets(data, sets)
    label = f"--set {sets[0]}" if len(sets) == 1 else _culprit(data, sets, path)
    return build_blaming(data, final, name=path.stem, path=path, label=label)


def _culprit(data: dict[str, Any], sets: list[str], path: Path) -> str:
    """Which of several --set breaks the profile: the one without which it builds, else the
    last one that sets the key the error names; "--set" when neither tells."""
    try:
        build(apply_sets(data, sets), name=path.stem, source=str(path))
        return "--set"
    except ProfileError as e:
        message = e.message
    fixes = []
    for i in range(len(sets)):
        try:
            build(apply_sets(data, sets[:i] + sets[i + 1 :]), name=path.stem, source=str(path))
            fixes.append(sets[i])
        except ProfileError:
            continue
    if len(fixes) == 1:
        return f"--set {fixes[0]}"
    for assignment in reversed(sets):
        parts, _ = parse_set(assignment)
        if len(parts) == 2:
            names = [f"[{parts[0]}] {parts[1]}"]
        else:
            names = [f"[[{parts[0]}]] #{parts[1]} {parts[2]}", f"[[{parts[0]}]] #{parts[1]}:"]
        if any(n in message for n in names):
            return f"--set {assignment}"
    return "--set"


def build_blaming(
    base: dict[str, Any], final: dict[str, Any], *, name: str, path: Path, label: str
) -> Profile:
    """build(final), where final is the file's base plus command-line overrides. An error that
    the overrides brought in names them (label), not the file: the file is fine as it is."""
    try:
        return build(final, name=name, source=str(path))
    except ProfileError as e:
        try:
            build(base, name=name, source=str(path))
        except ProfileError:
            raise e from None  # the file is at fault as it stands
        try:
            build(final, name=name, source=f"{label} on {path}")
        except ProfileError as relabelled:
            raise relabelled from None
        raise
