"""qlaunch.storage.image against the real qemu-img, and the seed ISO against blkid.

A guest kernel reads the seed too: tests/integration/test_disks_boot.py.

The first section is pure (sizes, powers of two, JSON parsing) and needs no qemu-img.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from qlaunch.boot.seed import build_seed, user_data_from
from qlaunch.errors import HostError, QemuError, UsageError
from qlaunch.storage import image
from qlaunch.storage.holders import ImageInUse

MiB = 1 << 20
HAVE_QEMU_IMG = shutil.which("qemu-img") is not None
needs_qemu_img = pytest.mark.skipif(not HAVE_QEMU_IMG, reason="qemu-img not installed")
needs_qemu_io = pytest.mark.skipif(not shutil.which("qemu-io"), reason="qemu-io not installed")


# --- pure ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("0", 0),
        ("512M", 512 * MiB),
        ("10G", 10 << 30),
        ("1T", 1 << 40),
        ("1.5G", 1536 * MiB),
        (".5K", 512),
        ("64k", 64 << 10),
        ("64KiB", 64 << 10),
        ("2 M", 2 * MiB),
        ("1gb", 1 << 30),
        ("100B", 100),
        (" 8G ", 8 << 30),
        ("7E", 7 << 60),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert image.parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "bad size"),
        ("G", "bad size"),
        ("-1G", "bad size"),
        ("10X", "bad size"),
        ("1e3", "bad size"),
        ("0x10", "bad size"),
        ("1.5.2G", "bad size"),
        ("10 G B", "bad size"),
        ("1iB", "bad size"),
        ("1.3K", "not a whole number of bytes"),
        ("1.5", "not a whole number of bytes"),
        ("8E", "too large"),
    ],
)
def test_parse_size_rejects(text: str, why: str) -> None:
    with pytest.raises(UsageError, match=why) as exc:
        image.parse_size(text)
    assert exc.value.hint and exc.value.exit_code == 2


@pytest.mark.parametrize(
    ("n", "text"), [(1 << 30, "1G"), (1536 * MiB, "1536M"), (4097, "4097"), (0, "0")]
)
def test_format_size(n: int, text: str) -> None:
    assert image.format_size(n) == text


def test_powers_of_two() -> None:
    assert [n for n in range(-2, 70) if image.is_power_of_two(n)] == [1, 2, 4, 8, 16, 32, 64]
    table = {0: 1, 1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 100 * MiB: 128 * MiB, (1 << 40) + 1: 1 << 41}
    assert {n: image.round_up_pow2(n) for n in table} == table


def test_progress_parser_handles_split_chunks() -> None:
    seen: list[float] = []
    p = image._ProgressParser(seen.append)
    stream = b"    (0.00/100%)\r    (12.50/100%)\r    (12.50/100%)\r    (100.00/100%)\r\n"
    for i in range(0, len(stream), 3):  # reports cut at every possible place
        p.feed(stream[i : i + 3])
    p.finish()
    assert seen == [0.0, 12.5, 100.0]


def test_info_json_chain_parsing() -> None:
    text = json.dumps(
        [
            {
                "filename": "top.qcow2",
                "format": "qcow2",
                "virtual-size": 1024,
                "actual-size": 10,
                "dirty-flag": True,
                "full-backing-filename": "/b/base.raw",
                "backing-filename": "base.raw",
                "backing-filename-format": "raw",
                "format-specific": {"type": "qcow2", "data": {"corrupt": True}},
            },
            {"filename": "/b/base.raw", "format": "raw", "virtual-size": 1024},
        ]
    )
    info = image.parse_info_json(text)
    assert info.dirty and info.corrupt and info.backing_file == "/b/base.raw"
    assert [i.format for i in info.chain] == ["qcow2", "raw"]
    assert info.chain[1].actual_size is None
    d = info.as_dict()
    assert [b["path"] for b in d["backing_chain"]] == ["/b/base.raw"]
    assert "backing_chain" not in d["backing_chain"][0]


def test_lock_error_is_explained() -> None:
    err = image._error(
        "resize",
        "qemu-img: Could not open '/x/d.qcow2': Failed to get \"write\" lock\n"
        "Is another process using the image [/x/d.qcow2]?\n",
    )
    assert isinstance(err, ImageInUse)
    # Nobody has /x/d.qcow2 open here, so no holder can be named.
    assert (
        err.message == "/x/d.qcow2 is in use by another process (qemu-img could not get its lock)"
    )


def test_generic_error_takes_qemu_img_line() -> None:
    err = image._error("convert", "qemu-img: error while reading at byte 0: Input/output error\n")
    assert (
        err.message == "qemu-img convert failed: error while reading at byte 0: Input/output error"
    )


def test_missing_qemu_img(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(HostError, match="qemu-img not found") as exc:
        image.create(tmp_path / "d.qcow2", MiB)
    assert exc.value.hint and "apt-get install -y qemu-utils" in exc.value.hint
    assert not (tmp_path / "d.qcow2").exists()


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown image format 'qed'"):
        image.create(tmp_path / "d", MiB, fmt="qed")


# --- real qemu-img ---------------------------------------------------------------------------

PATTERN_SIZE = 8 * MiB


def write_pattern(path: Path) -> bytes:
    """A raw image with distinct data in a few places and holes between them."""
    with path.open("wb") as f:
        f.truncate(PATTERN_SIZE)
        for off in (0, 3 * MiB + 512, PATTERN_SIZE - 64 * 1024):
            f.seek(off)
            f.write(hashlib.sha256(str(off).encode()).digest() * 1024)  # 32 KiB
    return path.read_bytes()


def qemu_io(path: Path, fmt: str, command: str) -> str:
    proc = subprocess.run(
        ["qemu-io", "-f", fmt, "-c", command, str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr
    return proc.stdout


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@needs_qemu_img
@pytest.mark.parametrize("fmt", image.FORMATS)
def test_create_each_format(tmp_path: Path, fmt: str) -> None:
    p = tmp_path / f"d.{fmt}"
    info = image.create(p, 64 * MiB, fmt=fmt)
    assert (info.format, info.virtual_size, info.backing) == (fmt, 64 * MiB, None)
    assert info.path == str(p)
    assert image.info(p).as_dict() == info.as_dict()
    json.dumps(info.as_dict())


@needs_qemu_img
def test_create_refuses_overwrite_and_leaves_file_alone(tmp_path: Path) -> None:
    p = tmp_path / "d.qcow2"
    p.write_bytes(b"precious")
    with pytest.raises(UsageError, match="already exists"):
        image.create(p, MiB)
    assert p.read_bytes() == b"precious"


@needs_qemu_img
def test_failed_create_leaves_nothing(tmp_path: Path) -> None:
    p = tmp_path / "d.vdi"
    with pytest.raises(QemuError, match="qemu-img create failed"):
        image.create(p, 1 << 60, fmt="vdi")  # beyond vdi's limit
    assert not p.exists()


@needs_qemu_img
def test_create_backing_rules(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    image.create(base, MiB, fmt="raw")
    with pytest.raises(UsageError, match="cannot have a backing file"):
        image.create(tmp_path / "o.raw", None, fmt="raw", backing=base)
    with pytest.raises(UsageError, match="needs a size"):
        image.create(tmp_path / "o.qcow2", None)
    with pytest.raises(UsageError, match="no such image"):
        image.create(tmp_path / "o.qcow2", None, backing=tmp_path / "missing")
    o = image.create(tmp_path / "o.qcow2", None, backing=base)
    assert (o.backing_file, o.backing_format, o.virtual_size) == (str(base), "raw", MiB)


@needs_qemu_img
def test_path_with_colon_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    info = image.create("nbd:disk.qcow2", MiB)
    assert info.path == str(tmp_path / "nbd:disk.qcow2")
    assert (tmp_path / "nbd:disk.qcow2").exists()


@needs_qemu_img
def test_convert_among_all_formats_keeps_content(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    pattern = write_pattern(src)
    firsts: dict[str, Path] = {}
    for fmt in image.FORMATS:
        firsts[fmt] = tmp_path / f"first.{fmt}"
        image.convert(src, firsts[fmt], fmt)
        assert image.info(firsts[fmt]).format == fmt
    for a, b in itertools.product(image.FORMATS, repeat=2):
        mid = tmp_path / f"{a}-to-{b}.{b}"
        back = tmp_path / f"{a}-to-{b}.back.raw"
        image.convert(firsts[a], mid, b)
        image.convert(mid, back, "raw")
        assert back.read_bytes() == pattern, f"{a} -> {b} -> raw changed the content"
        mid.unlink()
        back.unlink()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@needs_qemu_img
def test_convert_progress_and_mode(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    write_pattern(src)
    seen: list[float] = []
    image.convert(src, tmp_path / "d.qcow2", "qcow2", progress=seen.append)
    assert seen[0] >= 0.0 and seen[-1] == 100.0
    assert seen == sorted(set(seen))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "d.qcow2").stat().st_mode & 0o777 == 0o644 & ~umask


@needs_qemu_img
def test_convert_refusals(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    write_pattern(src)
    dst = tmp_path / "dst.qcow2"
    dst.write_bytes(b"keep")
    with pytest.raises(UsageError, match="already exists"):
        image.convert(src, dst, "qcow2")
    assert dst.read_bytes() == b"keep"
    with pytest.raises(UsageError, match="no such image"):
        image.convert(tmp_path / "missing", tmp_path / "x.raw", "raw")
    with pytest.raises(UsageError, match="no such directory"):
        image.convert(src, tmp_path / "nodir" / "x.raw", "raw")


@needs_qemu_img
def test_convert_failure_names_qemu_img_error_and_cleans_up(tmp_path: Path) -> None:
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\xff" * 4092)  # qcow2 magic, nonsense header
    with pytest.raises(QemuError, match="qemu-img convert failed: .*") as exc:
        image.convert(bad, tmp_path / "out.raw", "raw", src_fmt="qcow2")
    assert ".partial" not in exc.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.qcow2"]


@needs_qemu_img
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_resize_grow_and_shrink(tmp_path: Path, fmt: str) -> None:
    p = tmp_path / f"d.{fmt}"
    image.create(p, 64 * MiB, fmt=fmt)
    assert image.resize(p, 128 * MiB).virtual_size == 128 * MiB
    with pytest.raises(UsageError) as exc:
        image.resize(p, 32 * MiB)
    assert "new size 32M (33554432 bytes)" in exc.value.message
    assert "current 128M (134217728 bytes)" in exc.value.message
    assert exc.value.hint and "--shrink" in exc.value.hint
    assert image.info(p).virtual_size == 128 * MiB
    assert image.resize(p, 32 * MiB, shrink=True).virtual_size == 32 * MiB


@needs_qemu_img
def test_resize_to_pow2(tmp_path: Path) -> None:
    p = tmp_path / "sd.raw"
    image.create(p, 100 * MiB, fmt="raw")
    assert image.resize_to_pow2(p).virtual_size == 128 * MiB
    assert image.resize_to_pow2(p).virtual_size == 128 * MiB


@needs_qemu_img
@needs_qemu_io
def test_overlay_leaves_base_unchanged(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    pattern = write_pattern(base)
    before = sha(base)
    ov = image.overlay(base, tmp_path / "ov.qcow2")
    assert (ov.format, ov.backing_format, ov.virtual_size) == ("qcow2", "raw", PATTERN_SIZE)
    qemu_io(tmp_path / "ov.qcow2", "qcow2", "write -P 0xab 0 64k")
    qemu_io(tmp_path / "ov.qcow2", "qcow2", "read -P 0xab 0 64k")
    assert sha(base) == before
    image.convert(tmp_path / "ov.qcow2", tmp_path / "flat.raw", "raw")
    flat = (tmp_path / "flat.raw").read_bytes()
    assert flat[: 64 * 1024] == b"\xab" * 64 * 1024
    assert flat[64 * 1024 :] == pattern[64 * 1024 :]


@needs_qemu_img
def test_info_on_a_chain(tmp_path: Path) -> None:
    image.create(tmp_path / "base.qcow2", 16 * MiB)
    image.overlay(tmp_path / "base.qcow2", tmp_path / "mid.qcow2")
    top = image.overlay(tmp_path / "mid.qcow2", tmp_path / "top.qcow2")
    assert [Path(i.path).name for i in top.chain] == ["top.qcow2", "mid.qcow2", "base.qcow2"]
    assert top.backing_file == str(tmp_path / "mid.qcow2")
    assert top.chain[1].backing_file == str(tmp_path / "base.qcow2")
    d = json.loads(json.dumps(top.as_dict()))
    assert [Path(b["path"]).name for b in d["backing_chain"]] == ["mid.qcow2", "base.qcow2"]
    assert all(i.virtual_size == 16 * MiB and not i.dirty for i in top.chain)


@needs_qemu_img
def test_check(tmp_path: Path) -> None:
    q = tmp_path / "d.qcow2"
    image.create(q, 16 * MiB)
    r = image.check(q)
    assert (r.clean, r.status, r.supported, r.corruptions, r.leaks) == (True, "clean", True, 0, 0)
    raw = tmp_path / "d.raw"
    image.create(raw, MiB, fmt="raw")
    r = image.check(raw)
    assert (r.supported, r.clean, r.status) == (False, False, "unsupported")
    assert "raw images have no metadata" in r.message
    json.dumps(r.as_dict())


@needs_qemu_img
def test_check_reports_a_leak(tmp_path: Path) -> None:
    q = tmp_path / "d.qcow2"
    image.create(q, 16 * MiB)
    # Forge the classic after-crash leak: a cluster with a refcount that nothing references.
    with q.open("r+b") as f:
        header = f.read(104)
        cluster = 1 << struct.unpack_from(">I", header, 20)[0]
        table_off = struct.unpack_from(">Q", header, 48)[0]
        assert struct.unpack_from(">I", header, 96)[0] == 4  # 16-bit refcounts
        f.seek(table_off)
        block_off = struct.unpack(">Q", f.read(8))[0]
        leaked = -(-f.seek(0, os.SEEK_END) // cluster)  # the first cluster past the end
        f.truncate((leaked + 1) * cluster)
        f.seek(block_off + 2 * leaked)
        f.write(struct.pack(">H", 1))
    r = image.check(q)
    assert (r.status, r.clean, r.leaks, r.corruptions) == ("leaks", False, 1, 0)


@pytest.fixture
def locked_image(tmp_path: Path) -> Iterator[Path]:
    """A qcow2 image held open read-write by a live qemu-io, as a running VM would hold it."""
    p = tmp_path / "busy.qcow2"
    image.create(p, 16 * MiB)
    proc = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", str(p)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        # qemu-io prints its prompt once the image is open and locked.
        assert proc.stdout is not None
        prompt = proc.stdout.read(len("qemu-io> "))
        assert prompt == b"qemu-io> ", prompt
        yield p
    finally:
        proc.kill()
        proc.wait()


@needs_qemu_img
@needs_qemu_io
def test_locked_image(locked_image: Path) -> None:
    info = image.info(locked_image)  # -U: still works while the image is in use
    assert info.format == "qcow2"
    holder = r"is in use by another process \(pid \d+, qemu-io\)"
    with pytest.raises(ImageInUse, match=holder) as exc:
        image.resize(locked_image, 32 * MiB)
    assert str(locked_image) in exc.value.message
    assert exc.value.exit_code == 5
    with pytest.raises(ImageInUse, match=holder):
        image.check(locked_image)
    with pytest.raises(ImageInUse, match=holder):
        image.convert(locked_image, locked_image.with_suffix(".raw"), "raw")
    assert not locked_image.with_suffix(".raw").exists()
    # qemu-img create alone would happily put an overlay on a disk that is being written.
    ov = locked_image.with_name("ov.qcow2")
    with pytest.raises(ImageInUse, match=holder + ", which may still write to it; an overlay"):
        image.overlay(locked_image, ov)
    assert not ov.exists()


@needs_qemu_img
@needs_qemu_io
def test_overlay_on_a_base_other_vms_only_read(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    image.create(base, 16 * MiB)
    image.overlay(base, tmp_path / "vm1.qcow2")
    # A VM on vm1.qcow2 holds base.qcow2 open read-only, sharing it with other readers.
    proc = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", str(tmp_path / "vm1.qcow2")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.read(len("qemu-io> ")) == b"qemu-io> "
        assert image.overlay(base, tmp_path / "vm2.qcow2").backing_file == str(base)
    finally:
        proc.kill()
        proc.wait()


# --- the seed ISO, read by others ------------------------------------------------------------

USER_DATA = user_data_from("seedtest", ["ssh-ed25519 AAAAC3Nza test@qlaunch"], {"runcmd": []})


@pytest.fixture
def seed_iso(tmp_path: Path) -> Path:
    return build_seed(tmp_path / "seed.iso", user_data=USER_DATA, network_config=b"version: 2\n")


def test_blkid_sees_cidata(seed_iso: Path) -> None:
    # util-linux is Essential in Debian: blkid is always there.
    out = subprocess.run(
        ["blkid", "-p", "-o", "export", str(seed_iso)], capture_output=True, text=True, check=True
    ).stdout
    fields = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert fields["TYPE"] == "iso9660"
    assert fields["LABEL"] == "cidata"
