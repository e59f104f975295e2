"""What a kernel image file is: its architecture from the boot header, and its release string.

Only the few bytes the boot protocols define are read, so a wrong `--kernel` (an arm64 Image on
an x86 board, a config file, an initrd) is named before QEMU is started and fails obscurely.
Formats: x86 bzImage (boot protocol header "HdrS"), arm64 Image ("ARM\\x64" at 0x38), arm zImage
(magic 0x016f2818 at 0x24), a gzip-compressed arm64 Image (Debian's arm64 vmlinuz on older
releases), an EFI zboot image ("zimg" at 4, arm64 and others), an s390 image ("S390EP" at
0x10008, Debian's s390x vmlinuz), and ELF files: vmlinux, and the self-decompressing ELF vmlinuz
of mips (Debian's ppc64el package holds a vmlinux, its mips64el one such a vmlinuz). An ELF's
arch is its e_machine read with its class (32 or 64 bit) and byte order: EM_PPC64 little-endian
is ppc64le, EM_MIPS 64-bit little-endian is mips64el.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

# ELF e_machine values -> (32-bit name, 64-bit name), "{e}" standing for "el" in little-endian
# files and "" in big-endian ones where the arch has both.
_ELF_MACHINES = {
    62: ("x86_64", "x86_64"),
    3: ("i386", "i386"),
    183: ("aarch64", "aarch64"),
    40: ("arm", "arm"),
    243: ("riscv32", "riscv64"),
    20: ("ppc", "ppc"),  # EM_PPC
    21: ("ppc64", "ppc64"),  # EM_PPC64: ppc64 big-endian, ppc64le little
    22: ("s390", "s390x"),  # EM_S390
    8: ("mips{e}", "mips64{e}"),  # EM_MIPS
}
_S390_MAGIC_AT = 0x10008  # "S390EP": the entry marker of an s390 kernel image (boot/head.S)
_ZBOOT_ARCH = {"arm64": "aarch64", "riscv64": "riscv64", "loongarch64": "loongarch64"}
_ARM_ZIMAGE_MAGIC = 0x016F2818


def _header_arch(head: bytes) -> str | None:
    if len(head) >= 0x206 and head[0x202:0x206] == b"HdrS":
        # xloadflags bit 0 (XLF_KERNEL_64) is set by every 64-bit kernel since boot protocol 2.12;
        # older or 32-bit bzImages lack it.
        version = struct.unpack_from("<H", head, 0x206)[0] if len(head) >= 0x208 else 0
        if version >= 0x20C and len(head) >= 0x238:
            xloadflags = struct.unpack_from("<H", head, 0x236)[0]
            return "x86_64" if xloadflags & 1 else "i386"
        return "x86_64"
    if len(head) >= 0x3C and head[0x38:0x3C] == b"ARM\x64":
        return "aarch64"
    if len(head) >= 0x28 and struct.unpack_from("<I", head, 0x24)[0] == _ARM_ZIMAGE_MAGIC:
        return "arm"
    if len(head) >= 0x20 and head[:2] == b"MZ" and head[4:8] == b"zimg":
        # EFI zboot: the compressed payload type sits at 0x18, and the arch is only implied by
        # the PE machine field.
        pe_off = struct.unpack_from("<I", head, 0x3C)[0] if len(head) >= 0x40 else 0
        if pe_off and len(head) >= pe_off + 6 and head[pe_off : pe_off + 4] == b"PE\0\0":
            machine = struct.unpack_from("<H", head, pe_off + 4)[0]
            return {0xAA64: "aarch64", 0x5064: "riscv64", 0x6264: "loongarch64"}.get(machine)
        return None
    if head[:4] == b"\x7fELF" and len(head) >= 0x14:
        return _elf_arch(head)
    if len(head) >= _S390_MAGIC_AT + 6 and head[_S390_MAGIC_AT : _S390_MAGIC_AT + 6] == b"S390EP":
        return "s390x"
    return None


def _elf_arch(head: bytes) -> str | None:
    wide = head[4] == 2  # EI_CLASS: 1 ELFCLASS32, 2 ELFCLASS64
    little = head[5] == 1  # EI_DATA: 1 little-endian, 2 big-endian
    machine = struct.unpack_from("<H" if little else ">H", head, 0x12)[0]
    names = _ELF_MACHINES.get(machine)
    if names is None:
        return None
    name = names[1] if wide else names[0]
    if machine == 21 and little:
        return "ppc64le"
    return name.replace("{e}", "el" if little else "")


def detect_arch(path: str | Path) -> str | None:
    """The architecture a kernel image is built for ("x86_64", "aarch64", "arm", ...).

    None when the file is not a kernel image qlaunch recognises (the caller decides whether that
    is an error: an unknown format might still boot). Raises OSError when the file cannot be read.
    """
    with open(path, "rb") as f:
        head = f.read(_S390_MAGIC_AT + 8)  # past the s390 marker, the farthest one read
    arch = _header_arch(head)
    if arch is not None or head[:2] != b"\x1f\x8b":
        return arch
    # A gzip-compressed Image: the header is the start of the decompressed stream.
    try:
        inflated = zlib.decompressobj(16 + zlib.MAX_WBITS)
        with open(path, "rb") as f:
            plain = inflated.decompress(f.read(256 * 1024), 4096)
    except zlib.error:
        return None
    return _header_arch(plain)


_BANNER_RE = re.compile(rb"Linux version (\d+\.\d+\.\d+[\w.+~-]*) \([^()\s]*@[^()\s]*\)")


def kernel_release(path: str | Path) -> str | None:
    """The `uname -r` of a kernel image, or None when it cannot be found cheaply.

    An x86 bzImage points at its version string from the header (kernel_version at 0x20e); for
    other formats the "Linux version" banner is searched in the (decompressed) image.
    """
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(0x210)
        if len(head) >= 0x210 and head[0x202:0x206] == b"HdrS":
            off = struct.unpack_from("<H", head, 0x20E)[0]
            if off:
                f.seek(off + 0x200)
                text = f.read(256).split(b"\0", 1)[0]
                release = text.split(b" ", 1)[0].decode("ascii", "replace")
                return release or None
    return _banner_release(p)


def _banner_release(p: Path) -> str | None:
    found = _remembered(p, "kernel-release", lambda: (_search_banner(p) or "").encode())
    return found.decode() or None


def _remembered(p: Path, kind: str, compute: Callable[[], bytes]) -> bytes:
    """compute()'s answer for this file, kept in the cache by the file's identity: finding a
    banner or an embedded config means reading (and perhaps inflating) tens of megabytes, and
    `qlaunch exec` asks on every run. b"" stands for "none"."""
    import hashlib

    from qlaunch.paths import cache_dir

    st = p.stat()
    key = hashlib.sha256(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
    memo = cache_dir() / kind / key[:24]
    try:
        return memo.read_bytes()
    except FileNotFoundError:
        pass
    found = compute()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
    tmp.write_bytes(found)
    os.replace(tmp, memo)
    return found


def _search_banner(p: Path) -> str | None:
    data = p.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error):
            return None
    m = _BANNER_RE.search(data)
    return m.group(1).decode("ascii", "replace") if m else None


def describe(arch: str | None) -> str:
    """A short human name for an image architecture, for error messages."""
    return {
        "x86_64": "an x86_64 bzImage",
        "i386": "a 32-bit x86 bzImage",
        "aarch64": "an arm64 Image",
        "arm": "an arm zImage",
        "ppc64le": "a little-endian ppc64 ELF vmlinux",
        "ppc64": "a big-endian ppc64 ELF vmlinux",
        "s390x": "an s390x kernel image",
        "mips64el": "a little-endian mips64 ELF kernel",
        "mips64": "a big-endian mips64 ELF kernel",
        "mipsel": "a little-endian 32-bit mips ELF kernel",
        "mips": "a big-endian 32-bit mips ELF kernel",
    }.get(arch or "", "an unrecognised image" if arch is None else f"a {arch} kernel")


# --- modules trees and configs ------------------------------------------------------------


def find_modules_dir(given: str | Path, release: str | None) -> Path:
    """lib/modules/<release> inside what `--modules` names.

    Accepts a `make modules_install INSTALL_MOD_PATH=DIR` tree or an unpacked linux-image
    package (DIR/lib/modules/<ver>), DIR/lib/modules, or lib/modules/<ver> itself. With several
    versions, the one matching the kernel's release is taken.
    """
    from qlaunch.errors import UsageError

    root = Path(given).expanduser().resolve()
    if not root.is_dir():
        raise UsageError(f"--modules {given}: not a directory")
    if (root / "modules.dep").is_file() or (root / "kernel").is_dir():
        return root
    for base in (root / "lib" / "modules", root / "usr" / "lib" / "modules", root):
        if not base.is_dir():
            continue
        versions = sorted(
            p
            for p in base.iterdir()
            if p.is_dir() and ((p / "kernel").is_dir() or (p / "modules.dep").is_file())
        )
        if not versions:
            continue
        if release is not None:
            for v in versions:
                if v.name == release:
                    return v
            if len(versions) > 1:
                raise UsageError(
                    f"--modules {given}: no modules for kernel {release} "
                    f"(there are: {', '.join(v.name for v in versions)})"
                )
        if len(versions) == 1:
            return versions[0]
        raise UsageError(
            f"--modules {given}: modules for several kernels "
            f"({', '.join(v.name for v in versions)}), and the kernel's release is unknown",
            hint="point --modules at lib/modules/VERSION",
        )
    raise UsageError(
        f"--modules {given}: no kernel modules found (no lib/modules/VERSION with kernel/ inside)",
        hint="give the INSTALL_MOD_PATH of `make modules_install`, or an unpacked linux-image "
        "package (dpkg-deb -x)",
    )


def find_config(
    kernel: str | Path, modules_dir: Path | None, release: str | None, workdir: Path
) -> Path | None:
    """The kernel's config: the one beside the image or in its build tree, the one in the
    modules tree or its package, /boot's, or the image's own (IKCONFIG, written to workdir)."""
    k = Path(kernel).resolve()
    candidates = [k.parent / "config"]  # the asset cache's layout
    if release:
        candidates.append(k.parent / f"config-{release}")
    # arch/x86/boot/bzImage or arch/arm64/boot/Image in a build tree: .config a few levels up.
    candidates += [p / ".config" for p in list(k.parents)[:4]]
    if modules_dir is not None:
        candidates.append(modules_dir / "build" / ".config")
        # An unpacked linux-image package: ROOT/lib/modules/VER and ROOT/boot/config-VER.
        pkg_root = modules_dir.parent.parent.parent
        candidates.append(pkg_root / "boot" / f"config-{modules_dir.name}")
    if release:
        candidates.append(Path("/boot") / f"config-{release}")
    for c in candidates:
        if c.is_file():
            return c
    embedded = _remembered(k, "ikconfig", lambda: ikconfig(k) or b"")
    if not embedded:
        return None
    out = workdir / "ikconfig"
    out.write_bytes(embedded)
    return out


def ikconfig(path: str | Path) -> bytes | None:
    """The config a kernel carries inside (CONFIG_IKCONFIG), when its payload can be opened here:
    uncompressed, gzip or xz (Python has no lz4 or zstd)."""
    import lzma

    data = Path(path).read_bytes()
    bodies = [data]
    if len(data) > 0x250 and data[0x202:0x206] == b"HdrS":
        setup_sects = data[0x1F1] or 4
        offset, length = struct.unpack_from("<II", data, 0x248)
        start = (setup_sects + 1) * 512 + offset
        bodies = [data[start : start + length]]
    plain: list[bytes] = []
    for b in bodies:
        try:
            if b[:2] == b"\x1f\x8b":
                plain.append(zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(b))
            elif b[:6] == b"\xfd7zXZ\x00":
                plain.append(lzma.LZMADecompressor().decompress(b))
            else:
                plain.append(b)
        except (zlib.error, lzma.LZMAError, EOFError):
            continue
    for p in plain:
        i = p.find(b"IKCFG_ST")
        if i < 0:
            continue
        try:
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(p[i + 8 :])
        except zlib.error:
            return None
    return None
