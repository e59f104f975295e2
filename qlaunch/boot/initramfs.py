"""The guest's initramfs: a pure-Python newc cpio writer, module resolution, and caching.

The kernel unpacks any number of concatenated (and separately compressed) newc archives into
its rootfs, later files replacing earlier ones. That lets one cached base image (busybox, init,
modules) be reused for every boot, with a tiny per-run archive appended for the command.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import lzma
import os
import shlex
import stat
import struct
import tempfile
import typing
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from qlaunch.boot import busybox
from qlaunch.boot.assets import AssetSet
from qlaunch.errors import AssetError
from qlaunch.paths import cache_dir

log = logging.getLogger(__name__)

INIT_SCRIPT = Path(__file__).resolve().parent / "guest" / "init"

# Bumped whenever the layout of the base image changes, so cached images built by an older
# qlaunch are not reused.
LAYOUT_VERSION = 5

_COMMON_MODULES = [
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_scsi",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "9p",
    "9pnet_virtio",
    "netfs",
    "virtiofs",
    "evdev",  # acpid reads the power button from /dev/input/event*
    "af_packet",  # udhcpc's raw socket
    "ext4",
    "crc32c_generic",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_utf8",
    "iso9660",
    "sr_mod",  # CD-ROMs on virtio-scsi: the cloud-init seed
    "sd_mod",  # disks on virtio-scsi
]

DEFAULT_MODULES: dict[str, list[str]] = {
    # The cloud kernel builds the ACPI power button as a module: without it
    # system_powerdown reaches no one.
    "x86_64": [*_COMMON_MODULES, "button"],
    # virt signals powerdown through a PL061 GPIO wired to gpio-keys; raspi3b has its SD on
    # sdhci-iproc (and bcm2835 for the second controller).
    "aarch64": [*_COMMON_MODULES, "gpio_keys", "armmmci", "sdhci_iproc", "bcm2835"],
    # vexpress has PL181 (armmmci) for SD and a LAN9118 (smsc911x); raspi2b as on aarch64.
    "arm": [*_COMMON_MODULES, "gpio_keys", "armmmci", "sdhci_iproc", "bcm2835", "smsc911x"],
    # The 686 kernel, like the cloud one, builds the ACPI power button as a module.
    "i386": [*_COMMON_MODULES, "button"],
    # No board of these three has virtio-mmio or a power button on an input device: pseries
    # signals powerdown with an EPOW interrupt and s390x with an SCLP quiesce event, both
    # handled in the kernel, and malta has none.
    "ppc64le": [m for m in _COMMON_MODULES if m not in ("virtio_mmio", "evdev")],
    # virtio-ccw is built in (S390_GUEST); there is no PCI bus to serve.
    "s390x": [m for m in _COMMON_MODULES if m not in ("virtio_pci", "virtio_mmio", "evdev")],
    "mips64el": [m for m in _COMMON_MODULES if m not in ("virtio_mmio", "evdev")],
}


# What each default module serves. A guest that runs one command (`run PROFILE -- CMD`) loads
# only the modules for the devices its profile has (each insmod is a few hundred ms under TCG:
# on i386 the whole list cost 2 s of a 12 s boot); the rest is packed for `modprobe NAME`.
_SERVES = {
    "disk": {
        "virtio_blk",
        "virtio_scsi",
        "ext4",
        "crc32c_generic",
        "vfat",
        "nls_cp437",
        "nls_ascii",
        "nls_utf8",
        "iso9660",
        "sr_mod",
        "sd_mod",
        "armmmci",
        "sdhci_iproc",
        "bcm2835",
    },
    "net": {"virtio_net", "af_packet", "smsc911x"},
    "share": {"9p", "9pnet_virtio", "netfs", "virtiofs"},
    # What carries the power button (a background VM's stop).
    "button": {"evdev", "button", "gpio_keys"},
}
# The virtio transports' drivers serve the disks, NICs and shares above; with none of them the
# board's only virtio device is the RNG, which a command's guest does without. Three insmods
# (virtio_pci and its two helpers): about 0.1 s of a `run -- true` under TCG on aarch64.
_TRANSPORTS = {"virtio_pci", "virtio_mmio"}


def command_modules(
    arch: str, *, disks: bool, nets: bool, shares: bool, button: bool = True
) -> tuple[list[str], list[str]]:
    """(modules to load, modules to pack only) of DEFAULT_MODULES[arch], for a guest that runs
    one command on a board with these devices.

    Nothing is packed only: the default modules a command's devices do not need serve devices
    its board does not have, and carrying them (23 on aarch64, 1.4 MB of gzip) cost 6 to 9% of
    a `run -- true`'s CPU under TCG, for the kernel's inflating and unpacking them. A module a
    command wants goes in the profile's [boot] modules (loaded at boot, or `exec --module`).
    button=False (a foreground run, which nothing powers down: it ends with its command):
    not even the power button's.
    """
    wanted = set(_SERVES["button"]) if button else set()
    for kind, has in (("disk", disks), ("net", nets), ("share", shares)):
        if has:
            wanted |= _SERVES[kind] | _TRANSPORTS
    return [m for m in DEFAULT_MODULES[arch] if m in wanted], []


# --- newc writer --------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One archive member. mode carries the file type bits (S_IFREG, S_IFDIR, ...)."""

    path: str
    mode: int
    data: bytes = b""
    target: str | None = None  # symlinks only
    rdev: tuple[int, int] = (0, 0)  # device nodes only: (major, minor)

    @classmethod
    def file(cls, path: str, data: bytes, perm: int = 0o644) -> Entry:
        return cls(path, stat.S_IFREG | perm, data)

    @classmethod
    def dir(cls, path: str, perm: int = 0o755) -> Entry:
        return cls(path, stat.S_IFDIR | perm)

    @classmethod
    def symlink(cls, path: str, target: str) -> Entry:
        return cls(path, stat.S_IFLNK | 0o777, target=target)

    @classmethod
    def chardev(cls, path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
        return cls(path, stat.S_IFCHR | perm, rdev=(major, minor))


def _norm(path: str) -> str:
    p = PurePosixPath("/" + path.lstrip("/"))
    parts = [x for x in p.parts[1:] if x not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"bad archive path {path!r}")
    return "/".join(parts)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(
    ino: int, mode: int, nlink: int, size: int, rdev: tuple[int, int], name: bytes
) -> bytes:
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def newc_archive(entries: Iterable[Entry]) -> bytes:
    """An uncompressed newc archive, byte for byte the same for the same entries.

    Members are sorted by path, so parents come before children as the kernel needs; a later
    entry with the same path replaces an earlier one; missing parent directories are added.
    Owner root, mtime 0.
    """
    by_path: dict[str, Entry] = {}
    for e in entries:
        by_path[_norm(e.path)] = e
    for p in list(by_path):
        parent = PurePosixPath(p).parent
        while str(parent) != ".":
            by_path.setdefault(str(parent), Entry.dir(str(parent)))
            parent = parent.parent
    out = bytearray()
    for ino, p in enumerate(sorted(by_path), start=1):
        e = by_path[p]
        if stat.S_ISLNK(e.mode):
            if not e.target:
                raise ValueError(f"symlink {p} has no target")
            body = e.target.encode()
        elif stat.S_ISREG(e.mode):
            body = e.data
        else:
            body = b""
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        name = p.encode()
        head = _header(ino, e.mode, nlink, len(body), e.rdev, name) + name + b"\0"
        out += head + _pad4(len(head)) + body + _pad4(len(body))
    trailer = _header(0, 0, 1, 0, (0, 0), b"TRAILER!!!") + b"TRAILER!!!\0"
    out += trailer + _pad4(len(trailer))
    return bytes(out)


def gzip_stable(data: bytes) -> bytes:
    """gzip with no timestamp, so equal input gives equal output."""
    return gzip.compress(data, compresslevel=6, mtime=0)


# --- modules ------------------------------------------------------------------------------


def _modname(relpath: str) -> str:
    name = relpath.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.gz", ".ko.zst", ".ko"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


@dataclass
class _ModIndex:
    deps: dict[str, list[str]] = field(default_factory=dict)  # module name -> its dep names
    path: dict[str, str] = field(default_factory=dict)  # module name -> relpath
    builtin: set[str] = field(default_factory=set)
    alias: dict[str, list[str]] = field(default_factory=dict)  # exact aliases only
    softpre: dict[str, list[str]] = field(default_factory=dict)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _index(modules_dir: Path) -> _ModIndex:
    idx = _ModIndex()
    for line in _read_lines(dep_file(modules_dir)):
        mod, sep, rest = line.partition(":")
        if not sep:
            continue
        name = _modname(mod)
        idx.path[name] = mod
        idx.deps[name] = [_modname(d) for d in rest.split()]
    idx.builtin = {_modname(x) for x in _read_lines(modules_dir / "modules.builtin") if x}
    for line in _read_lines(modules_dir / "modules.alias"):
        parts = line.split()
        if len(parts) == 3 and parts[0] == "alias" and not any(c in parts[1] for c in "*?["):
            idx.alias.setdefault(parts[1].replace("-", "_"), []).append(_modname(parts[2]))
    for line in _read_lines(modules_dir / "modules.softdep"):
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "softdep":
            pre: list[str] = []
            mode = ""
            for word in parts[2:]:
                if word in ("pre:", "post:"):
                    mode = word
                elif mode == "pre:":
                    pre.append(word)
            if pre:
                idx.softpre[_modname(parts[1])] = pre
    return idx


_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz")


def dep_file(modules_dir: Path) -> Path:
    """The tree's modules.dep, or one made from the modules' .modinfo when the tree has none.

    Debian kernel packages ship no modules.dep (their install script runs depmod); rather than
    write into a user's tree, the index is made here and kept in the cache, keyed by the tree.
    """
    real = modules_dir / "modules.dep"
    if real.is_file():
        return real
    if not (modules_dir / "kernel").is_dir() and not any(modules_dir.glob("*.ko*")):
        raise AssetError(
            f"{modules_dir} holds no kernel modules (no modules.dep, no kernel/ directory)",
            hint="give lib/modules/VERSION of a `make modules_install` tree or an unpacked "
            "linux-image package",
        )
    h = hashlib.sha256(_identity(modules_dir.resolve()))
    for name in ("kernel", "modules.order", "modules.builtin"):
        if (modules_dir / name).exists():
            h.update(_identity(modules_dir / name))
    out = cache_dir() / "modules-dep" / f"{h.hexdigest()[:24]}.dep"
    if not out.is_file():
        lines = []
        for path in sorted(modules_dir.rglob("*.ko*")):
            if not path.name.endswith(_MODULE_SUFFIXES) or not path.is_file():
                continue
            lines.append((path.relative_to(modules_dir).as_posix(), modinfo(path)))
        by_name = {_modname(rel): rel for rel, _ in lines}
        infos = {_modname(rel): info for rel, info in lines}
        text = []
        for rel, _ in lines:
            closure = _closure(_modname(rel), infos)
            text.append(f"{rel}: " + " ".join(by_name[d] for d in closure if d in by_name))
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(out, ("\n".join(t.rstrip() for t in text) + "\n").encode())
    return out


def _closure(name: str, infos: dict[str, dict[str, str]]) -> list[str]:
    """Every module name the module depends on, directly or not, nearest first (as depmod)."""
    seen: list[str] = []
    todo = [name]
    while todo:
        cur = todo.pop(0)
        for dep in infos.get(cur, {}).get("depends", "").split(","):
            dep = dep.strip().replace("-", "_")
            if dep and dep != name and dep not in seen:
                seen.append(dep)
                todo.append(dep)
    return seen


def modinfo(path: Path) -> dict[str, str]:
    """A module's .modinfo strings (depends, name, alias...; the last value of each key wins)."""
    if path.name.endswith((".ko.xz", ".ko.gz")):
        try:
            return _parse_modinfo(_elf_section(_module_bytes(path)[1], ".modinfo"))
        except (struct.error, lzma.LZMAError, OSError, EOFError):
            return {}
    with open(path, "rb") as f:
        try:
            return _parse_modinfo(_elf_section_from_file(f, ".modinfo"))
        except struct.error:
            # Truncated or not ELF: a module without dependencies as far as the index goes; a
            # broken file still shows as insmod's error at boot.
            return {}


def _parse_modinfo(blob: bytes) -> dict[str, str]:
    info: dict[str, str] = {}
    for item in blob.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            info[key.decode(errors="replace")] = value.decode(errors="replace")
    return info


def _elf_section(data: bytes, name: str) -> bytes:
    import io

    return _elf_section_from_file(io.BytesIO(data), name)


def _elf_section_from_file(f: typing.BinaryIO, name: str) -> bytes:
    """One section of an ELF file, read with a few seeks (modules are many; only this is needed)."""
    ident = f.read(64)
    if ident[:4] != b"\x7fELF":
        return b""
    wide = ident[4] == 2
    end = "<" if ident[5] == 1 else ">"
    if wide:
        (shoff,) = struct.unpack_from(end + "Q", ident, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", ident, 0x3A)
    else:
        (shoff,) = struct.unpack_from(end + "I", ident, 0x20)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", ident, 0x2E)
    f.seek(shoff)
    table = f.read(shentsize * shnum)
    if len(table) < shentsize * shnum or shstrndx >= shnum:
        return b""

    def section(i: int) -> tuple[int, int, int]:
        base = i * shentsize
        if wide:
            (sh_name,) = struct.unpack_from(end + "I", table, base)
            off, size = struct.unpack_from(end + "QQ", table, base + 0x18)
        else:
            (sh_name,) = struct.unpack_from(end + "I", table, base)
            off, size = struct.unpack_from(end + "II", table, base + 0x10)
        return sh_name, off, size

    _, str_off, str_size = section(shstrndx)
    f.seek(str_off)
    names = f.read(str_size)
    want = name.encode()
    for i in range(shnum):
        sh_name, off, size = section(i)
        if names[sh_name : sh_name + len(want) + 1] == want + b"\0":
            f.seek(off)
            return f.read(size)
    return b""


def resolve_modules(
    modules_dir: Path, names: list[str], *, optional: bool | Collection[str] = False
) -> list[Path]:
    """Module files for names and all they depend on, in load order (dependencies first).

    Names use `-` or `_` alike and may be exact aliases (fs-9p). Built-in modules are skipped.
    A name that is neither built in nor present raises AssetError, unless optional is True or
    holds that name. Soft "pre:" dependencies (ext4 wants crc32c) are added when present.
    """
    idx = _index(modules_dir)
    if isinstance(optional, bool):
        skippable = {n.replace("-", "_") for n in names} if optional else set()
    else:
        skippable = {n.replace("-", "_") for n in optional}
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for pre in idx.softpre.get(name, []):
            for target in _lookup(idx, pre):
                visit(target)
        # modules.dep lists the whole closure; modprobe loads it back to front.
        for dep in reversed(idx.deps[name]):
            visit(dep)
        order.append(name)

    for raw in names:
        key = raw.replace("-", "_")
        if key in idx.builtin:
            continue
        found = _lookup(idx, key)
        if not found:
            if key in skippable:
                continue
            raise AssetError(
                f"kernel module {raw!r} is neither built in nor in {modules_dir}",
                hint="check the name with: grep -i NAME " + str(modules_dir / "modules.order"),
            )
        for target in found:
            visit(target)
    return [modules_dir / idx.path[n] for n in order]


def module_names(modules_dir: Path) -> tuple[set[str], set[str]]:
    """(loadable module names, built-in module names) of a tree, `-` written as `_`.

    Reads only modules.dep and modules.builtin (the alias table is large, and slow to parse
    on every `qlaunch exec`)."""
    have = {_modname(ln.partition(":")[0]) for ln in _read_lines(dep_file(modules_dir)) if ln}
    builtin = {_modname(x) for x in _read_lines(modules_dir / "modules.builtin") if x}
    return have, builtin


def _lookup(idx: _ModIndex, key: str) -> list[str]:
    key = key.replace("-", "_")
    if key in idx.path:
        return [key]
    if key in idx.builtin:
        return []
    return [m for m in idx.alias.get(key, []) if m in idx.path]


def _module_bytes(path: Path) -> tuple[str, bytes]:
    """Module contents as busybox insmod can load them, and the file name to store."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return path.name[:-3], lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return path.name[:-3], gzip.decompress(data)
    return path.name, data


# --- base image ---------------------------------------------------------------------------


def _identity(path: Path) -> bytes:
    st = path.stat()
    return f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode()


def _cache_key(
    asset: AssetSet,
    modules: list[str],
    extra: dict[str, bytes] | None,
    pack: Collection[str] = (),
) -> str:
    h = hashlib.sha256()
    h.update(f"layout {LAYOUT_VERSION}\0{asset.name}\0{asset.version}\0".encode())
    # Identity, not content: a re-fetch rewrites the manifest; hashing 100 MB would not be warm.
    # A module tree that is not an asset set (`qlaunch exec --modules`) has no manifest.
    manifest = asset.manifest
    for p in (manifest, asset.busybox, dep_file(asset.modules)):
        if p != manifest or p.exists():
            h.update(_identity(p))
    h.update(INIT_SCRIPT.read_bytes())
    h.update(("\0".join(modules) + "\0").encode())
    h.update(("pack\0" + "\0".join(sorted(pack)) + "\0").encode())
    for name in sorted(extra or {}):
        h.update(name.encode() + b"\0" + hashlib.sha256((extra or {})[name]).digest())
    return h.hexdigest()


def _filtered(lines: list[str], keep: set[str], col: int) -> bytes:
    out = [
        ln
        for ln in lines
        if len(ln.split()) > col and _modname(ln.split()[col].rstrip(":")) in keep
    ]
    return ("\n".join(out) + "\n").encode() if out else b""


def base_entries(
    asset: AssetSet,
    modules: list[str] | None = None,
    *,
    extra: dict[str, bytes] | None = None,
    pack: Collection[str] = (),
) -> list[Entry]:
    """Everything in the base image, before it is archived (exposed for tests).

    pack: modules stored (with their dependencies) for the guest's modprobe, but not loaded at
    boot; the boot loads only `modules`.
    """
    names = DEFAULT_MODULES[asset.arch] if modules is None else modules
    files = resolve_modules(asset.modules, names, optional=DEFAULT_MODULES[asset.arch])
    loaded = set(files)
    packed = resolve_modules(asset.modules, list(pack), optional=DEFAULT_MODULES[asset.arch])
    for f in packed if pack else []:
        if f not in loaded:
            files.append(f)
    init = INIT_SCRIPT.read_bytes()
    modroot = f"lib/modules/{asset.version}"
    entries = [
        Entry.dir(d)
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev")
        + ("run", "root", "mnt", "var/log", "qlaunch", modroot)
    ]
    entries.append(Entry.dir("tmp", 0o1777))
    entries += [
        Entry.chardev("dev/console", 5, 1),
        Entry.chardev("dev/null", 1, 3, 0o666),
        Entry.file("bin/busybox", asset.busybox.read_bytes(), 0o755),
        # The init script's interpreter; everything else is linked at boot by busybox --install.
        Entry.symlink("bin/sh", "busybox"),
        Entry.file("init", init, 0o755),
        # exec's framed output goes through these (the init need not run mkfifo).
        Entry("run/qlaunch.o", stat.S_IFIFO | 0o600),
        Entry("run/qlaunch.e", stat.S_IFIFO | 0o600),
    ]
    # busybox's applet links, made here rather than by `busybox --install` at every boot.
    # (Never over what is there: the applets include busybox itself, and sh.)
    links = busybox.applet_links(asset.busybox)
    if links is not None:
        have = {e.path for e in entries}
        paths = [f"{d}/{n}" if d else n for d, n in links]
        entries += [Entry.symlink(p, "/bin/busybox") for p in paths if p not in have]
        entries.append(Entry.file("qlaunch/linked", b""))
    listed: list[str] = []
    kept: set[str] = set()
    for f in files:
        rel = f.relative_to(asset.modules).as_posix()
        stored_name, data = _module_bytes(f)
        rel = rel.rsplit("/", 1)[0] + "/" + stored_name
        entries.append(Entry.file(f"{modroot}/{rel}", data))
        if f in loaded:
            listed.append(f"/{modroot}/{rel}")
        kept.add(_modname(rel))
    entries.append(Entry.file("qlaunch/modules", "".join(p + "\n" for p in listed).encode()))
    # Trimmed index files so the kernel's on-demand module requests (through busybox modprobe)
    # can load what is packed.
    dep_lines = [
        ln.replace(".ko.xz", ".ko").replace(".ko.gz", ".ko")
        for ln in _read_lines(dep_file(asset.modules))
    ]
    entries.append(Entry.file(f"{modroot}/modules.dep", _filtered(dep_lines, kept, 0)))
    alias = _read_lines(asset.modules / "modules.alias")
    entries.append(Entry.file(f"{modroot}/modules.alias", _filtered(alias, kept, 2)))
    builtin = "".join(ln + "\n" for ln in _read_lines(asset.modules / "modules.builtin"))
    entries.append(Entry.file(f"{modroot}/modules.builtin", builtin.encode()))
    for name, data in sorted((extra or {}).items()):
        perm = 0o755 if data.startswith((b"#!", b"\x7fELF")) else 0o644
        entries.append(Entry.file(name, data, perm))
    return entries


def build_initramfs(
    asset: AssetSet,
    modules: list[str] | None = None,
    *,
    extra: dict[str, bytes] | None = None,
    pack: Collection[str] = (),
) -> Path:
    """The base initramfs for an asset set, built once and cached by its inputs.

    modules None means DEFAULT_MODULES for the arch. Names from DEFAULT_MODULES are skipped
    when this kernel lacks them (the cloud kernel has no 9p), also inside an explicit list such
    as DEFAULT_MODULES + a profile's own; any other missing name raises AssetError. extra maps
    archive paths to file contents. pack: see base_entries.
    """
    names = DEFAULT_MODULES[asset.arch] if modules is None else list(modules)
    key = _cache_key(asset, names, extra, pack)
    out_dir = cache_dir() / "initramfs"
    out = out_dir / f"{key[:24]}.cpio.gz"
    if out.is_file():
        return out
    data = gzip_stable(newc_archive(base_entries(asset, modules, extra=extra, pack=pack)))
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, data)
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- per-run command ----------------------------------------------------------------------


def command_script(
    argv: list[str], *, env: dict[str, str] | None = None, workdir: str | None = None
) -> str:
    """The /qlaunch/cmd script: exports, cd, then the argv quoted so it survives exactly."""
    if not argv:
        raise ValueError("empty command")
    lines = ["# written by qlaunch: the command to run, then power off"]
    for k, v in (env or {}).items():
        if not k.isidentifier():
            raise ValueError(f"bad environment variable name {k!r}")
        lines.append(f"export {k}={shlex.quote(v)}")
    if workdir:
        lines.append(f"cd {shlex.quote(workdir)} || exit 126")
    lines.append(shlex.join(argv))
    return "\n".join(lines) + "\n"


def command_archive(
    argv: list[str], *, env: dict[str, str] | None = None, workdir: str | None = None
) -> bytes:
    """A gzip'd newc archive holding /qlaunch/cmd, to append to a base initramfs."""
    script = command_script(argv, env=env, workdir=workdir).encode()
    return gzip_stable(newc_archive([Entry.file("qlaunch/cmd", script, 0o755)]))


def initrd_with_command(
    base: Path,
    argv: list[str],
    out: Path,
    *,
    env: dict[str, str] | None = None,
    workdir: str | None = None,
) -> Path:
    """Write base + a command archive to out (the kernel unpacks both, in order)."""
    data = base.read_bytes() + command_archive(argv, env=env, workdir=workdir)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, data)
    return out
