"""busybox's applet links read from the binary: a made-up binary with the two tables, and the
real x86_64 busybox of the asset cache against its own `--list-full`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from qlaunch.boot import busybox
from qlaunch.paths import cache_dir

APPLETS = [("usr/bin", "["), ("usr/bin", "[["), ("usr/bin", "awk"), ("bin", "busybox")]
APPLETS += [("usr/bin", "env"), ("", "linuxrc"), ("bin", "ls"), ("sbin", "modprobe")]
APPLETS += [("bin", "mount"), ("sbin", "poweroff"), ("bin", "sh"), ("usr/sbin", "chroot")]
APPLETS.sort(key=lambda a: a[1])
CODES = {d: c for c, d in busybox.DIRS.items()}


def fake_binary(tmp_path: Path, applets: list[tuple[str, str]], junk: bytes = b"") -> Path:
    nibbles = [CODES[d] for d, _ in applets] + [0]
    table = bytes(nibbles[i] | nibbles[i + 1] << 4 for i in range(0, len(applets), 2))
    names = b"\0".join(n.encode() for _, n in applets) + b"\0\0"
    # Padding of a value no table can hold (nibble 0xF) around the real one.
    blob = b"\x7fELF" + b"\xff" * 300 + junk + table + b"\xff" * 40 + b"\0" + names
    p = tmp_path / "busybox"
    p.write_bytes(blob)
    return p


def test_links_from_the_tables(tmp_path: Path) -> None:
    assert busybox.applet_links(fake_binary(tmp_path, APPLETS)) == APPLETS


def test_two_tables_that_fit_give_none(tmp_path: Path) -> None:
    # An earlier copy of the same table: which is the real one cannot be told, so the init
    # installs the links itself.
    codes = [CODES[d] for d, _ in APPLETS] + [0]
    twin = bytes(codes[i] | codes[i + 1] << 4 for i in range(0, len(APPLETS), 2))
    assert busybox.applet_links(fake_binary(tmp_path, APPLETS, junk=twin + b"\xff")) is None


def test_not_busybox_gives_none(tmp_path: Path) -> None:
    p = tmp_path / "other"
    p.write_bytes(b"\x7fELF" + b"\0" * 1000)
    assert busybox.applet_links(p) is None


def test_real_busybox_matches_its_own_list() -> None:
    exe = cache_dir() / "assets" / "x86_64" / "busybox"
    if not exe.is_file():
        pytest.skip("no x86_64 asset set fetched")
    full = subprocess.run([str(exe), "--list-full"], capture_output=True, text=True, check=True)
    want = [tuple(p.rsplit("/", 1)) if "/" in p else ("", p) for p in full.stdout.split()]
    assert busybox.applet_links(exe) == want
