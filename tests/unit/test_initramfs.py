"""The newc writer, module resolution and the base image, on fake trees: no QEMU, no apt."""

from __future__ import annotations

import gzip
import json
import shlex
import shutil
import stat
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from qlaunch.boot import assets, initramfs
from qlaunch.boot.initramfs import Entry, newc_archive, resolve_modules
from qlaunch.errors import AssetError, UsageError


@dataclass
class Member:
    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    rdev: tuple[int, int]
    data: bytes


def read_newc(blob: bytes) -> list[list[Member]]:
    """Every archive in blob (one list per archive), checking alignment as the kernel does."""
    archives: list[list[Member]] = []
    current: list[Member] = []
    pos = 0
    while pos < len(blob):
        if blob[pos : pos + 4] == b"\0\0\0\0":  # padding between concatenated archives
            pos += 4
            continue
        assert pos % 4 == 0
        assert blob[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        f = [int(blob[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size, _, _, rmaj, rmin, namesize, check = f
        assert check == 0
        name_start = pos + 110
        name = blob[name_start : name_start + namesize]
        assert name.endswith(b"\0") and b"\0" not in name[:-1]
        data_start = name_start + namesize
        data_start += -data_start % 4
        data = blob[data_start : data_start + size]
        pos = data_start + size
        pos += -pos % 4
        member = Member(name[:-1].decode(), ino, mode, uid, gid, nlink, mtime, (rmaj, rmin), data)
        if member.name == "TRAILER!!!":
            archives.append(current)
            current = []
        else:
            current.append(member)
    assert not current, "archive without trailer"
    return archives


def gunzip_all(blob: bytes) -> bytes:
    """Decompress concatenated gzip members, as the kernel does for a multi-part initrd."""
    out = b""
    while blob:
        d = zlib.decompressobj(wbits=31)
        out += d.decompress(blob)
        blob = d.unused_data
    return out


# --- newc writer --------------------------------------------------------------------------


def test_newc_round_trip() -> None:
    entries = [
        Entry.file("/bin/busybox", b"\x7fELF" + bytes(range(256)), 0o755),
        Entry.symlink("bin/sh", "busybox"),
        Entry.chardev("dev/console", 5, 1),
        Entry.dir("proc", 0o555),
        Entry.file("etc/odd", b"x" * 5),
        Entry.file("empty", b""),
    ]
    (members,) = read_newc(newc_archive(entries))
    by_name = {m.name: m for m in members}
    assert [m.name for m in members] == sorted(by_name)
    assert set(by_name) == {
        "bin",
        "bin/busybox",
        "bin/sh",
        "dev",
        "dev/console",
        "etc",
        "etc/odd",
        "empty",
        "proc",
    }
    assert by_name["bin/busybox"].data == b"\x7fELF" + bytes(range(256))
    assert by_name["bin/busybox"].mode == stat.S_IFREG | 0o755
    assert by_name["bin/sh"].mode == stat.S_IFLNK | 0o777
    assert by_name["bin/sh"].data == b"busybox"
    assert by_name["dev/console"].mode == stat.S_IFCHR | 0o600
    assert by_name["dev/console"].rdev == (5, 1)
    assert by_name["proc"].mode == stat.S_IFDIR | 0o555
    assert by_name["bin"].mode == stat.S_IFDIR | 0o755  # added as the parent of bin/busybox
    assert by_name["etc/odd"].data == b"xxxxx"
    assert by_name["empty"].data == b""
    assert all(m.uid == 0 and m.gid == 0 and m.mtime == 0 for m in members)
    assert len({m.ino for m in members}) == len(members)


def test_newc_is_deterministic_and_last_entry_wins() -> None:
    a = [Entry.file("x/a", b"1"), Entry.file("x/b", b"2"), Entry.file("x/a", b"3")]
    b = [Entry.file("x/b", b"2"), Entry.file("x/a", b"3")]
    assert newc_archive(a) == newc_archive(b)
    (members,) = read_newc(newc_archive(a))
    assert {m.name: m.data for m in members}["x/a"] == b"3"
    assert initramfs.gzip_stable(newc_archive(a)) == initramfs.gzip_stable(newc_archive(b))


def test_newc_empty_archive_is_just_a_trailer() -> None:
    assert read_newc(newc_archive([])) == [[]]


@pytest.mark.parametrize("bad", ["", "/", "../etc/passwd", "a/../../b"])
def test_newc_rejects_escaping_paths(bad: str) -> None:
    with pytest.raises(ValueError):
        newc_archive([Entry.file(bad, b"")])


def test_newc_readable_by_busybox_cpio(tmp_path: Path) -> None:
    bb = shutil.which("busybox")
    if not bb:
        pytest.skip("busybox not installed")
    archive = newc_archive(
        [Entry.file("d/f", b"hello\n"), Entry.symlink("d/l", "f"), Entry.dir("e")]
    )
    out = subprocess.run(
        [bb, "cpio", "-t"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    assert out.split() == ["d", "d/f", "d/l", "e"]


# --- command archive ----------------------------------------------------------------------


def test_command_script_keeps_arguments_exactly() -> None:
    argv = ["printf", "%s|", "a b", "it's", 'say "hi"', "$HOME", "", "x;y", "tab\there"]
    script = initramfs.command_script(argv, env={"A": "1 2", "B": "$x"}, workdir="/tmp/w d")
    lines = script.splitlines()
    assert shlex.split(lines[-1]) == argv
    assert "export A='1 2'" in lines
    assert "export B='$x'" in lines
    assert "cd '/tmp/w d' || exit 126" in lines


def test_command_script_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        initramfs.command_script([])
    with pytest.raises(ValueError):
        initramfs.command_script(["true"], env={"A B": "x"})


def test_initrd_with_command_concatenates(tmp_path: Path) -> None:
    base = tmp_path / "base.cpio.gz"
    base.write_bytes(initramfs.gzip_stable(newc_archive([Entry.file("init", b"#!/bin/sh\n")])))
    out = initramfs.initrd_with_command(base, ["echo", "a b"], tmp_path / "run" / "initrd")
    first, second = read_newc(gunzip_all(out.read_bytes()))
    assert [m.name for m in first] == ["init"]
    cmd = {m.name: m for m in second}["qlaunch/cmd"]
    assert cmd.data.decode().splitlines()[-1] == "echo 'a b'"
    assert initramfs.command_archive(["true"]) == initramfs.command_archive(["true"])


# --- modules ------------------------------------------------------------------------------


def make_modules_tree(root: Path) -> Path:
    mods = root / "modules"
    files = {
        "kernel/drivers/virtio/virtio_pci.ko": ["kernel/drivers/virtio/virtio_ring.ko"],
        "kernel/drivers/virtio/virtio_ring.ko": [],
        "kernel/drivers/block/virtio_blk.ko": [
            "kernel/drivers/virtio/virtio_pci.ko",
            "kernel/drivers/virtio/virtio_ring.ko",
        ],
        "kernel/fs/9p/9p.ko": ["kernel/net/9p/9pnet.ko", "kernel/fs/netfs/netfs.ko"],
        "kernel/net/9p/9pnet.ko": [],
        "kernel/fs/netfs/netfs.ko": [],
        "kernel/net/9p/9pnet_virtio.ko": ["kernel/net/9p/9pnet.ko"],
        "kernel/drivers/char/hw_random/virtio-rng.ko": ["kernel/drivers/char/rng-core.ko"],
        "kernel/drivers/char/rng-core.ko": [],
        "kernel/fs/ext4/ext4.ko": ["kernel/fs/jbd2/jbd2.ko"],
        "kernel/fs/jbd2/jbd2.ko": [],
        "kernel/crypto/crc32c_generic.ko": [],
    }
    lines = []
    for rel, deps in files.items():
        (mods / rel).parent.mkdir(parents=True, exist_ok=True)
        (mods / rel).write_bytes(b"\x7fELF module " + rel.encode())
        lines.append(f"{rel}: {' '.join(deps)}".rstrip())
    (mods / "modules.dep").write_text("\n".join(lines) + "\n")
    (mods / "modules.builtin").write_text("kernel/drivers/input/evdev.ko\nkernel/fs/fat/vfat.ko\n")
    (mods / "modules.alias").write_text(
        "alias fs-9p 9p\nalias crypto-crc32c crc32c_generic\nalias pci:v00001AF4d* virtio_pci\n"
    )
    (mods / "modules.softdep").write_text("# x\nsoftdep ext4 pre: crypto-crc32c\n")
    return mods


def names(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_resolve_modules_orders_dependencies_first(tmp_path: Path) -> None:
    mods = make_modules_tree(tmp_path)
    got = resolve_modules(mods, ["virtio-blk", "9p", "9pnet_virtio"])
    assert names(got) == [
        "virtio_ring.ko",
        "virtio_pci.ko",
        "virtio_blk.ko",
        "netfs.ko",
        "9pnet.ko",
        "9p.ko",
        "9pnet_virtio.ko",
    ]
    assert all(p.is_file() and p.is_relative_to(mods) for p in got)


def test_resolve_modules_names_aliases_softdeps_builtins(tmp_path: Path) -> None:
    mods = make_modules_tree(tmp_path)
    assert names(resolve_modules(mods, ["virtio_rng"])) == ["rng-core.ko", "virtio-rng.ko"]
    assert names(resolve_modules(mods, ["fs-9p"])) == ["netfs.ko", "9pnet.ko", "9p.ko"]
    assert names(resolve_modules(mods, ["ext4"])) == ["crc32c_generic.ko", "jbd2.ko", "ext4.ko"]
    assert resolve_modules(mods, ["evdev", "vfat"]) == []
    # Asked twice, or reached twice through dependencies: loaded once.
    assert names(resolve_modules(mods, ["virtio_pci", "virtio_blk", "virtio_pci"])) == [
        "virtio_ring.ko",
        "virtio_pci.ko",
        "virtio_blk.ko",
    ]


def test_resolve_modules_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QLAUNCH_CACHE", str(tmp_path / "cache"))
    mods = make_modules_tree(tmp_path)
    with pytest.raises(AssetError, match="'no_such_mod'"):
        resolve_modules(mods, ["virtio_blk", "no_such_mod"])
    assert names(resolve_modules(mods, ["no_such_mod", "jbd2"], optional=True)) == ["jbd2.ko"]
    assert resolve_modules(mods, ["no_such_mod"], optional=["no-such-mod"]) == []
    with pytest.raises(AssetError, match="'other'"):
        resolve_modules(mods, ["no_such_mod", "other"], optional=["no_such_mod"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AssetError, match="no kernel modules"):
        resolve_modules(empty, ["jbd2"])


def elf_module(depends: str, bits: int = 64) -> bytes:
    """A minimal relocatable ELF with a .modinfo section, as a kernel module has."""
    modinfo = f"license=GPL\0depends={depends}\0name=x\0".encode()
    shstr = b"\0.shstrtab\0.modinfo\0"
    if bits == 64:
        ehsize, shentsize = 64, 64
    else:
        ehsize, shentsize = 52, 40
    str_off = ehsize
    info_off = str_off + len(shstr)
    shoff = info_off + len(modinfo)
    shoff += -shoff % 8
    head = bytearray(ehsize)
    head[:6] = b"\x7fELF" + bytes([2 if bits == 64 else 1, 1])
    if bits == 64:
        struct.pack_into("<Q", head, 0x28, shoff)
        struct.pack_into("<HHH", head, 0x3A, shentsize, 3, 1)
    else:
        struct.pack_into("<I", head, 0x20, shoff)
        struct.pack_into("<HHH", head, 0x2E, shentsize, 3, 1)
    body = bytes(head) + shstr + modinfo
    body += b"\0" * (shoff - len(body))

    def sh(name: int, off: int, size: int) -> bytes:
        entry = bytearray(shentsize)
        struct.pack_into("<I", entry, 0, name)
        if bits == 64:
            struct.pack_into("<QQ", entry, 0x18, off, size)
        else:
            struct.pack_into("<II", entry, 0x10, off, size)
        return bytes(entry)

    return body + sh(0, 0, 0) + sh(1, str_off, len(shstr)) + sh(11, info_off, len(modinfo))


@pytest.mark.parametrize("bits", [64, 32])
def test_tree_without_modules_dep_is_indexed_from_modinfo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bits: int
) -> None:
    # An unpacked linux-image package has no modules.dep: dependencies come from .modinfo, and
    # the user's tree is left as it was.
    monkeypatch.setenv("QLAUNCH_CACHE", str(tmp_path / "cache"))
    mods = tmp_path / "lib" / "modules" / "6.1.0-test"
    for rel, deps in {
        "kernel/fs/9p/9p.ko": "9pnet,netfs",
        "kernel/net/9p/9pnet.ko": "",
        "kernel/fs/netfs/netfs.ko": "",
        "kernel/net/9p/9pnet_virtio.ko": "9pnet,virtio_ring",
        "kernel/drivers/virtio/virtio_ring.ko": "",
    }.items():
        (mods / rel).parent.mkdir(parents=True, exist_ok=True)
        (mods / rel).write_bytes(elf_module(deps, bits))
    assert initramfs.modinfo(mods / "kernel/fs/9p/9p.ko")["depends"] == "9pnet,netfs"
    got = names(resolve_modules(mods, ["9p", "9pnet_virtio"]))
    assert set(got) == {"9p.ko", "9pnet.ko", "netfs.ko", "9pnet_virtio.ko", "virtio_ring.ko"}
    assert got.index("9pnet.ko") < got.index("9p.ko")
    assert got.index("virtio_ring.ko") < got.index("9pnet_virtio.ko")
    assert sorted(p.name for p in mods.iterdir()) == ["kernel"]


# --- base image ---------------------------------------------------------------------------


@pytest.fixture
def fake_asset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> assets.AssetSet:
    monkeypatch.setenv("QLAUNCH_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "cache" / "assets" / "x86_64"
    make_modules_tree(root)
    (root / "busybox").write_bytes(b"\x7fELF busybox")
    (root / "kernel").write_bytes(b"bzImage")
    (root / "config").write_text(
        "CONFIG_ACPI_BUTTON=m\nCONFIG_PACKET=y\n# CONFIG_9P_FS is not set\n"
    )
    (root / "dtbs").mkdir()
    manifest = {"format": assets.MANIFEST_FORMAT, "set": "x86_64", "kernel_version": "6.1.0-9"}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return assets.require("x86_64")


def test_build_initramfs_contents(fake_asset: assets.AssetSet) -> None:
    path = initramfs.build_initramfs(fake_asset, ["virtio_blk", "ext4"])
    (members,) = read_newc(gzip.decompress(path.read_bytes()))
    by_name = {m.name: m for m in members}
    assert by_name["init"].data == initramfs.INIT_SCRIPT.read_bytes()
    assert by_name["init"].mode & 0o111
    assert by_name["bin/busybox"].data == b"\x7fELF busybox"
    assert by_name["dev/console"].rdev == (5, 1)
    listed = by_name["qlaunch/modules"].data.decode().split()
    assert [p.rsplit("/", 1)[1] for p in listed] == [
        "virtio_ring.ko",
        "virtio_pci.ko",
        "virtio_blk.ko",
        "crc32c_generic.ko",
        "jbd2.ko",
        "ext4.ko",
    ]
    for p in listed:
        assert p.startswith("/lib/modules/6.1.0-9/kernel/")
        assert by_name[p[1:]].data.startswith(b"\x7fELF module")
    dep = by_name["lib/modules/6.1.0-9/modules.dep"].data.decode()
    assert "kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko" in dep
    assert "9p.ko" not in dep  # not packed, so not offered to modprobe


def test_build_initramfs_is_cached_by_inputs(fake_asset: assets.AssetSet) -> None:
    first = initramfs.build_initramfs(fake_asset, ["jbd2"])
    stamp = first.stat().st_mtime_ns
    assert initramfs.build_initramfs(fake_asset, ["jbd2"]) == first
    assert first.stat().st_mtime_ns == stamp
    other = initramfs.build_initramfs(fake_asset, ["jbd2"], extra={"etc/motd": b"hi\n"})
    assert other != first
    (members,) = read_newc(gzip.decompress(other.read_bytes()))
    assert {m.name: m.data for m in members}["etc/motd"] == b"hi\n"
    # A re-fetch rewrites the manifest: the old image must not be reused.
    fake_asset.manifest.write_text(fake_asset.manifest.read_text() + " ")
    assert initramfs.build_initramfs(fake_asset, ["jbd2"]) != first
    assert not list(first.parent.glob(".*"))  # no temporary files left behind


def test_build_initramfs_default_modules_skip_missing(fake_asset: assets.AssetSet) -> None:
    path = initramfs.build_initramfs(fake_asset)
    (members,) = read_newc(gzip.decompress(path.read_bytes()))
    listed = {m.name: m for m in members}["qlaunch/modules"].data.decode().split()
    got = {p.rsplit("/", 1)[1] for p in listed}
    assert {"virtio_blk.ko", "9p.ko", "9pnet_virtio.ko", "ext4.ko", "virtio-rng.ko"} <= got
    # The way profiles ask: the defaults (some missing here) plus modules of their own.
    both = initramfs.build_initramfs(fake_asset, [*initramfs.DEFAULT_MODULES["x86_64"], "jbd2"])
    (members,) = read_newc(gzip.decompress(both.read_bytes()))
    assert "jbd2.ko" in {m.name: m for m in members}["qlaunch/modules"].data.decode()
    with pytest.raises(AssetError, match="no_such_mod"):
        initramfs.build_initramfs(fake_asset, [*initramfs.DEFAULT_MODULES["x86_64"], "no_such_mod"])


def test_default_modules_cover_every_arch() -> None:
    assert {assets.arch_of(s) for s in assets.ASSET_SETS} == set(initramfs.DEFAULT_MODULES)


# --- assets bookkeeping (no fetching) -----------------------------------------------------


def test_kernel_has(fake_asset: assets.AssetSet) -> None:
    assert assets.kernel_has("x86_64", "ACPI_BUTTON") == "m"
    assert assets.kernel_has(fake_asset.config, "CONFIG_PACKET") == "y"
    assert assets.kernel_has(str(fake_asset.config), "9P_FS") is None
    with pytest.raises(AssetError):
        assets.kernel_has(fake_asset.root / "nope", "PACKET")


def test_require_and_list(fake_asset: assets.AssetSet) -> None:
    assert fake_asset.version == "6.1.0-9"
    assert fake_asset.kernel.name == "kernel"
    with pytest.raises(AssetError) as err:
        assets.require("aarch64")
    assert err.value.hint == "run: qlaunch assets fetch --arch aarch64"
    with pytest.raises(UsageError):
        assets.require("mips")
    rows = {r["set"]: r for r in assets.list_assets()}
    assert set(rows) == set(assets.ASSET_SETS)
    assert rows["x86_64"]["present"] is True
    assert rows["x86_64"]["version"] == "6.1.0-9"
    assert rows["arm"]["present"] is False
    assert assets.arch_of("x86_64-generic") == "x86_64"


def test_fetch_of_present_sets_asks_apt_nothing(
    fake_asset: assets.AssetSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_subprocess(*a: object, **k: object) -> None:
        raise AssertionError("fetch ran a program for a set already present")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    lines: list[str] = []
    assert assets.fetch(["x86_64"], progress=lines.append) == [fake_asset]
    assert lines == ["x86_64: present (6.1.0-9)"]
