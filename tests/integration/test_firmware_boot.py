"""The firmware fragments on the real QEMU: OVMF and AAVMF start, each with its own variable
store, and Secure Boot with enrolled keys refuses the unsigned UEFI shell."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from qlaunch.boot import firmware as fw
from qlaunch.spawn import spawn, stop_child

pytestmark = pytest.mark.boot

ANSI = re.compile(rb"\x1b\[[0-9;?=]*[a-zA-Z]")


def boot_until(argv: list[str], pattern: bytes, timeout: float) -> bytes:
    """Run QEMU with the serial console on stdout until pattern shows; return what it printed."""
    proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        while pattern not in ANSI.sub(b"", seen) and time.monotonic() < deadline:
            chunk = proc.stdout.read1(4096)
            if not chunk:
                break
            seen += chunk
    finally:
        stop_child(proc, grace=2.0)
        proc.stdout.close()
    return ANSI.sub(b"", seen)


def qemu(arch: str, machine: str, cpu: str | None, frag: fw.FirmwareArgs) -> list[str]:
    binary = {"x86_64": "qemu-system-x86_64", "aarch64": "qemu-system-aarch64"}[arch]
    m = ",".join([machine, "accel=tcg", *frag.machine_opts])
    argv = [binary, "-machine", m, "-m", "512", "-nographic", "-nic", "none"]
    argv += ["-cpu", cpu] if cpu else []
    return argv + list(frag.args)


@pytest.mark.parametrize(
    ("arch", "machine", "cpu", "wanted", "expect"),
    [
        ("x86_64", "q35", None, "uefi", b"UEFI Interactive Shell"),
        ("aarch64", "virt", "cortex-a57", "uefi", b"UEFI Interactive Shell"),
        # Keys enrolled: the firmware refuses the shell, which is not signed.
        ("x86_64", "q35", None, "uefi-secure", b"Security Violation"),
    ],
)
def test_firmware_boots(
    tmp_path: Path, arch: str, machine: str, cpu: str | None, wanted: str, expect: bytes
) -> None:
    choice = fw.choose(arch, machine, wanted)
    vars_path = tmp_path / "efi,vars.fd"  # a comma: the fragment must escape it
    assert fw.ensure_vars(choice, vars_path)
    out = boot_until(qemu(arch, machine, cpu, fw.qemu_args(choice, str(vars_path))), expect, 90)
    assert expect in out, out[-2000:].decode(errors="replace")
    if wanted == "uefi-secure":
        assert b"UEFI Interactive Shell" not in out
