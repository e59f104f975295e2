"""Warm start, the pure part: what refuses, what the key changes with, what a restored guest is
sent, and the crng reseed helper's ELF (run natively on this x86_64 host)."""

from __future__ import annotations

import base64
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qlaunch.boot import initramfs, reseed
from qlaunch.config import profile
from qlaunch.launch import warm

BASE: dict[str, Any] = {
    "machine": {"arch": "aarch64", "machine": "virt", "memory": "512M"},
    "boot": {"kernel": "asset:aarch64/kernel", "initrd": "qlaunch"},
}


def _prof(**extra: Any) -> profile.Profile:
    data = {k: dict(v) for k, v in BASE.items()} | extra
    return profile.build(data, name="t", source="t.toml")


def test_a_plain_command_profile_may_be_warm() -> None:
    assert warm.refusal(_prof(), has_cmd=True) is None


@pytest.mark.parametrize(
    ("extra", "has_cmd", "words"),
    [
        ({}, False, "needs a command"),
        ({"disk": [{"path": "/images/root.qcow2"}]}, True, "writable and persistent"),
        ({"net": [{"mode": "bridge", "bridge": "br0"}]}, True, "tap"),
        ({"machine": {"arch": "arm", "machine": "vexpress-a9"}}, True, "vexpress-a9"),
        ({"machine": {"arch": "mips64el", "machine": "malta"}}, True, "reseed helper"),
        ({"boot": {"kernel": "/boot/vmlinuz", "initrd": "/boot/initrd.img"}}, True, "own initrd"),
    ],
)
def test_what_cannot_be_warm_says_why_in_one_line(
    extra: dict[str, Any], has_cmd: bool, words: str
) -> None:
    why = warm.refusal(_prof(**extra), has_cmd)
    assert why is not None and words in why and "\n" not in why


def test_throwaway_and_readonly_disks_may_be_warm() -> None:
    disks = [{"path": "/i/a.qcow2", "snapshot": True}, {"path": "/i/b.raw", "readonly": True}]
    assert warm.refusal(_prof(disk=disks), has_cmd=True) is None


def test_key_changes_with_qemu_argv_and_file_content() -> None:
    argv = ["qemu-system-aarch64", "-kernel", "/k", "-m", "512M"]
    files = {"/k": "a" * 64}
    k = warm.key("qemu 1", argv, files)
    assert k == warm.key("qemu 1", list(argv), dict(files))
    assert k != warm.key("qemu 2", argv, files)
    assert k != warm.key("qemu 1", [*argv[:-1], "384M"], files)
    assert k != warm.key("qemu 1", argv, {"/k": "b" * 64})


def test_named_files_reads_boot_files_and_drives_with_commas() -> None:
    argv = [
        *("qemu", "-kernel", "/k", "-initrd", "/i.gz", "-dtb", "/d.dtb"),
        *("-drive", "file.driver=file,file.filename=/img/a,,b.qcow2,format=qcow2"),
        *("-append", "console=ttyS0"),
    ]
    assert warm.named_files(argv) == ["/k", "/i.gz", "/d.dtb", "/img/a,b.qcow2"]


def test_payload_survives_the_console_and_writes_the_command(tmp_path: Path) -> None:
    argv = ["sh", "-c", "echo 'it''s' \"$HOME\" \x03 \x01; exit 7"]
    script = initramfs.command_script(argv)
    seed = bytes(range(32))
    data = warm.payload(script, epoch=1700000000.4, seed=seed)
    assert data.startswith(warm.LEAD + warm.BEGIN.encode() + b"\n")
    assert data.endswith(b"\n" + warm.END.encode() + b"\n")
    body = data[len(warm.LEAD) :].split(b"\n")[1:-2]
    # Only base64 on the wire: no byte the guest's tty or QEMU's mux (Ctrl-a) would take.
    assert all(len(line) <= 76 and line.isascii() and line.isalnum() or b"+" in line or
               b"/" in line or b"=" in line for line in body)  # fmt: skip
    text = base64.b64decode(b"".join(body)).decode()
    assert "date -u -s @1700000000 " in text
    # The seed's printf, run by a real sh, gives back the very bytes.
    printf = next(line for line in text.splitlines() if line.startswith("printf '\\"))
    out = tmp_path / "seed"
    subprocess.run(["sh", "-c", printf.replace(warm.SEED, str(out))], check=True)
    assert out.read_bytes() == seed
    # So does the command's.
    last = text[text.index("printf '%s'") :]
    cmd_file = tmp_path / "cmd"
    subprocess.run(["sh", "-c", last.replace("/qlaunch/cmd", str(cmd_file))], check=True)
    assert cmd_file.read_text() == script


@pytest.mark.parametrize("arch", sorted(reseed.ARCHES))
def test_reseed_helper_is_one_loadable_segment(arch: str) -> None:
    elf = reseed.program(arch)
    is64, machine, flags, _ = reseed.ARCHES[arch]
    assert elf[:4] == b"\x7fELF" and elf[4] == (2 if is64 else 1)
    if is64:
        _, e_machine, _, entry, phoff = struct.unpack_from("<HHIQQ", elf, 16)
        _, _, _, vaddr, _, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", elf, phoff)
    else:
        _, e_machine, _, entry, phoff = struct.unpack_from("<HHIII", elf, 16)
        _, _, vaddr, _, filesz, _, _, _ = struct.unpack_from("<IIIIIIII", elf, phoff)
    assert e_machine == machine
    assert vaddr == reseed.BASE and filesz == len(elf)
    assert reseed.BASE < entry < reseed.BASE + len(elf)
    # The pool the ioctl reads: 256 bits credited, 32 bytes (filled by the read).
    assert struct.pack("<ii", 256, 32) + bytes(32) == elf[-40:]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="runs the x86_64 helper natively")
def test_reseed_helper_runs_its_syscalls(tmp_path: Path) -> None:
    exe = tmp_path / "qlaunch-reseed"
    exe.write_bytes(reseed.program("x86_64"))
    exe.chmod(0o755)
    seed = tmp_path / "seed"
    seed.write_bytes(os.urandom(32))
    # On /dev/null the first ioctl fails with ENOTTY (25), and the helper exits with that errno:
    # it read its seed and got as far as RNDADDENTROPY on its stdout.
    with open(seed, "rb") as i, open(os.devnull, "wb") as o:
        r = subprocess.run([str(exe)], stdin=i, stdout=o, check=False)
    assert r.returncode == 25
    if os.geteuid() == 0 and sys.platform == "linux":
        with open(seed, "rb") as i, open("/dev/urandom", "wb") as o:
            assert subprocess.run([str(exe)], stdin=i, stdout=o, check=False).returncode == 0
