"""`qlaunch image build debian`: what the image holds (partition table, bootloader at the
place the firmware looks, a grub.cfg and fstab that name the root by UUID), and that a failed
or interrupted build leaves nothing behind: no file, no mount, no loop device."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from debimage import SUITE, debian_image

from qlaunch.storage import build

QLAUNCH = str(Path(sys.executable).parent / "qlaunch")
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
PE_MACHINE = {"x86_64": 0x8664, "aarch64": 0xAA64}


@pytest.fixture(scope="session")
def built() -> Callable[[str, str], Path]:
    """The cached image of each kind, built at most once per run (and per recipe)."""
    made: dict[tuple[str, str], Path] = {}

    def get(arch: str, firmware: str) -> Path:
        if (arch, firmware) not in made:
            made[arch, firmware] = debian_image(arch, firmware)
        return made[arch, firmware]

    return get


def sh(*argv: str, env: dict[str, str] | None = None) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert r.returncode == 0, (argv, r.stderr)
    return r.stdout


def as_raw(image: Path, tmp_path: Path) -> Path:
    raw = tmp_path / "disk.raw"
    sh("qemu-img", "convert", "-O", "raw", str(image), str(raw))
    return raw


def ext4_bytes(raw: Path, offset: int, path: str) -> bytes:
    # e2fsprogs reads the file system at an offset of the raw file: no loop device, no mount.
    argv = ["debugfs", "-R", f"cat {path}", f"{raw}?offset={offset}"]
    r = subprocess.run(argv, capture_output=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def ext4_file(raw: Path, offset: int, path: str) -> str:
    return ext4_bytes(raw, offset, path).decode()


@pytest.mark.slow
# Every image the suite boots; `make test-images` has built them (aarch64 under qemu-user)
# before pytest starts, so this reads the cache.
@pytest.mark.parametrize(("arch", "firmware"), SUITE)
def test_image_layout(built, tmp_path: Path, arch: str, firmware: str) -> None:  # type: ignore[no-untyped-def]
    image = built(arch, firmware)
    info = json.loads(sh("qemu-img", "info", "--output=json", str(image)))
    assert info["format"] == "qcow2" and info["virtual-size"] == build.DEFAULT_SIZE
    raw = as_raw(image, tmp_path)
    table = json.loads(sh("sfdisk", "--json", str(raw)))["partitiontable"]
    assert table["label"] == "gpt"
    first, root = table["partitions"]
    assert root["type"] == build.ARCHES[arch].root_guid
    root_off = root["start"] * 512

    fstab = ext4_file(raw, root_off, "/etc/fstab")
    root_uuid = re.search(r"^UUID=(\S+) / ext4", fstab, re.M)
    assert root_uuid, fstab
    cfg = ext4_file(raw, root_off, "/boot/grub/grub.cfg")
    console = build.ARCHES[arch].console
    assert f"root=UUID={root_uuid.group(1)} ro console=tty0 console={console},115200" in cfg
    kver = re.search(r"linux /boot/vmlinuz-(\S+)", cfg)
    assert kver and len(ext4_bytes(raw, root_off, f"/boot/vmlinuz-{kver.group(1)}")) > 1 << 20
    assert ext4_file(raw, root_off, "/etc/machine-id") == ""  # each VM makes its own

    with open(raw, "rb") as f:
        mbr = f.read(512)
        f.seek(first["start"] * 512)
        boot_part = f.read(512)
    assert mbr[510:512] == b"\x55\xaa"  # the protective MBR of the GPT
    if firmware == "bios":
        assert first["type"] == BIOS_BOOT
        assert b"GRUB" in mbr[:440]  # boot.img in the MBR's code area
        # core.img embedded in the BIOS boot partition (grub-bios-setup fills in the block
        # list at the end of its first sector, so compare the code before it)
        core = ext4_bytes(raw, root_off, "/boot/grub/i386-pc/core.img")
        assert len(core) > 512 and boot_part[:0x100] == core[:0x100]
    else:
        assert first["type"] == ESP
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
        esp = f"{raw}@@{first['start'] * 512}"
        name = build.ARCHES[arch].efi_file
        listing = sh("mdir", "-b", "-i", esp, "::/EFI/BOOT", env=env)
        assert f"::/EFI/BOOT/{name}" in listing
        loader = subprocess.run(
            ["mtype", "-i", esp, f"::/EFI/BOOT/{name}"], capture_output=True, env=env
        ).stdout
        assert loader[:2] == b"MZ"
        pe = int.from_bytes(loader[0x3C:0x40], "little")
        assert loader[pe : pe + 4] == b"PE\0\0"
        assert int.from_bytes(loader[pe + 4 : pe + 6], "little") == PE_MACHINE[arch]


def leftovers(directory: Path) -> list[str]:
    """What a build could leave: files beside OUT, mounts and loop devices under the dir."""
    found = [p.name for p in directory.iterdir()]
    real = os.path.realpath(directory)
    with open("/proc/self/mountinfo") as f:
        found += [ln.split()[4] for ln in f if ln.split()[4].startswith(real)]
    loops = subprocess.run(["losetup", "--list", "--json"], capture_output=True, text=True)
    for dev in json.loads(loops.stdout or '{"loopdevices": []}')["loopdevices"]:
        if (dev.get("back-file") or "").startswith(real):
            found.append(dev["name"])
    return found


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    # A mirror nobody answers: mmdebstrap fails once the disk is partitioned and mounted.
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "d.qcow2"
    r = subprocess.run(
        [QLAUNCH, "image", "build", "debian", "--mirror", "http://127.0.0.1:9/debian", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "QLAUNCH_CACHE": str(tmp_path / "cache")},
    )
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("qlaunch: error: mmdebstrap failed (exit "), r.stderr
    assert "E: Failed to fetch http://127.0.0.1:9/debian/" in last
    assert "  | " in r.stderr  # the tool's last lines come before it
    assert "[1/5]" not in r.stderr  # no progress when stderr is not a terminal
    assert "Traceback" not in r.stderr
    assert leftovers(tmp_path / "out") == []
    # ...but the whole log, where the error says
    kept = re.search(r"the whole log: (\S+)\)$", last)
    assert kept, last
    log = Path(kept.group(1))
    assert log.parent == tmp_path / "cache" / "logs"
    assert "E: Failed to fetch" in log.read_text() and "$ mmdebstrap --mode=root" in log.read_text()


@pytest.mark.slow
# SIGINT is in test_signals_during_the_cleanup_leave_nothing: each partial build costs the
# suite a minute or two, and one per way of ending is enough.
@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_interrupted_build_leaves_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "d.qcow2"
    proc = subprocess.Popen(
        [QLAUNCH, "image", "build", "debian", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Interrupt it in the middle of mmdebstrap: the root is mounted, packages installing.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            roots = list(tmp_path.glob(".d.qcow2.*.build/root/var/lib/dpkg/status"))
            if roots and roots[0].stat().st_size > 0:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    assert leftovers(tmp_path) == []
    assert not [p for p in Path("/proc").glob("[0-9]*/cmdline") if _mmdebstrap_in(p, tmp_path)]


def _mmdebstrap_in(cmdline: Path, directory: Path) -> bool:
    try:
        args = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"mmdebstrap" in a for a in args[:2]) and str(directory).encode() in b" ".join(args)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("first", "then"),
    [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGHUP)],
    ids=["ctrl-c-again-and-again", "sigterm-then-hangup"],
)
def test_signals_during_the_cleanup_leave_nothing(
    tmp_path: Path, first: signal.Signals, then: signal.Signals
) -> None:
    # On a terminal (the progress line's ticker thread runs), a user pressing Ctrl-C again
    # and again, or script(1)/tmux ending with SIGTERM and the terminal's hangup right after:
    # the later signals keep coming while qlaunch stops mmdebstrap and cleans up.
    out = tmp_path / "d.qcow2"
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [QLAUNCH, "image", "build", "debian", str(out)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    seen = bytearray()

    def drain() -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(master, 4096):
                seen.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            roots = list(tmp_path.glob(".d.qcow2.*.build/root/var/lib/dpkg/status"))
            if roots and roots[0].stat().st_size > 0:
                break
            time.sleep(0.5)
        assert proc.poll() is None, bytes(seen[-2000:])
        assert b"[2/5] installing Debian packages" in seen  # the ticker runs
        proc.send_signal(first)
        # Again and again until the build directory is gone (the cleanup's last step); a
        # signal after that would hit the CLI's own last words, which is not what is tested.
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.3)
            if not list(tmp_path.glob(".d.qcow2.*.build")):
                break
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(then)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = bytes(seen).decode(errors="replace")
    assert proc.returncode == 128 + first, text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    assert leftovers(tmp_path) == []
    assert not [p for p in Path("/proc").glob("[0-9]*/cmdline") if _mmdebstrap_in(p, tmp_path)]
