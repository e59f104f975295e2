"""`qlaunch screenshot` on a real VM with a VNC display: a valid PNG of the VGA text mode that
shows what the guest wrote on its screen; the fd-set way (for --runas VMs) gives the same
picture; VMs without a display and files qlaunch did not write are refused; VNC still serves."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pngread
import pytest
from vmlab import BOOT_TIMEOUT, BOOTED, ok, ql, vmroot  # noqa: F401

from qlaunch.vm import screen
from qlaunch.vm.api import VM

pytestmark = pytest.mark.boot

VNC = "127.0.0.1:57"  # display 57: port 5957, away from the usual :0..:10


def lit(png: bytes) -> int:
    """Pixels brighter than the VGA text mode's black background."""
    _, _, rows = pngread.read(png)
    return sum(1 for row in rows for i in range(0, len(row), 3) if sum(row[i : i + 3]) > 96)


def test_screenshot_of_the_vga_text_screen(vmroot: Path) -> None:  # noqa: F811
    ok(
        "start",
        "default",
        "--name",
        "shot",
        "--set",
        "display.type=vnc",
        "--set",
        f"display.vnc={VNC}",
    )
    vm = VM.get("shot")
    vm.console.expect(BOOTED, BOOT_TIMEOUT)

    first = vmroot / "first.png"
    r = ok("screenshot", "shot", str(first), "--json")
    shot = json.loads(r.stdout)
    data = first.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    w, h, rows = pngread.read(data)  # checks every chunk's CRC and inflates every row
    assert (w, h) == (shot["width"], shot["height"]) and len(rows) == h
    assert (w, h) in ((720, 400), (640, 480)), (w, h)  # a VGA mode: SeaBIOS left text mode
    assert shot["bytes"] == len(data) and shot["path"] == str(first)
    assert shot["via"] == "png"  # Debian's QEMU 7.2 writes PNG itself
    before = lit(data)
    assert before > 0  # SeaBIOS's banner is on the screen

    # The guest writes a block of text on its VGA console; the next picture shows it.
    vm.console.sendline(
        "L=XXXXXXXXXXXXXXXXXXXXXXXX; for i in 1 2 3 4 5 6 7 8; do echo $L > /dev/tty1; done; "
        "echo wrote-$?"
    )
    vm.console.expect(rb"wrote-0", 30)
    second = vmroot / "second.png"
    ok("screenshot", "shot", str(second))
    after = lit(second.read_bytes())
    assert after > before + 8 * 24 * 20, (before, after)  # 8 lines of 24 glyphs, 20+ pixels each

    # The fd-set way (a QEMU that cannot open files in the state dir) gives the same picture,
    # through PPM converted here, and leaves no fd set behind in QEMU.
    with vm.monitor() as mon:
        via_fd = screen.dump_via_fd(mon, vm.dir)
        assert mon.execute("query-fdsets") == []
    _, _, a = pngread.read(second.read_bytes())
    _, _, b = pngread.read(via_fd)
    differ = sum(1 for x, y in zip(a, b, strict=True) for i in range(len(x)) if x[i] != y[i])
    assert differ < w * h * 3 // 100, differ  # the blinking cursor may differ, nothing else
    assert not [p for p in vm.dir.iterdir() if p.name.startswith(".screendump")]

    # OUT: a file qlaunch did not write needs --force; one it wrote is replaced.
    mine = vmroot / "mine.png"
    mine.write_bytes(b"keep me")
    r = ql("screenshot", "shot", str(mine))
    assert r.returncode == 2 and "did not write it" in r.stderr and len(r.stderr.splitlines()) == 1
    assert mine.read_bytes() == b"keep me"
    ok("screenshot", "shot", str(mine), "--force")
    assert pngread.read(mine.read_bytes())[:2] == (w, h)
    ok("screenshot", "shot", str(first))  # written by qlaunch before: no --force needed
    r = ql("screenshot", "shot", str(vm.dir / "console.log"), "--force")  # not even forced
    assert r.returncode == 5 and "never replaces it" in r.stderr

    # The VNC display still serves: a VNC client gets the RFB greeting.
    with socket.create_connection(("127.0.0.1", 5957), timeout=10) as s:
        assert s.recv(12).startswith(b"RFB 003.")

    ok("stop", "shot", "--force")
    r = ql("screenshot", "shot", str(vmroot / "late.png"))
    assert r.returncode == 5 and "is not running" in r.stderr
    assert not (vmroot / "late.png").exists()


def test_a_vm_without_a_display_is_refused(vmroot: Path) -> None:  # noqa: F811
    ok("start", "default", "--name", "blind")
    r = ql("screenshot", "blind", str(vmroot / "x.png"))
    assert r.returncode == 5, r.stderr
    assert "has no display" in r.stderr and "display.type=vnc" in r.stderr
    assert len(r.stderr.splitlines()) == 1
    assert not (vmroot / "x.png").exists()
    r = ql("screenshot", "nosuch", str(vmroot / "x.png"))
    assert r.returncode == 5 and "no VM named nosuch" in r.stderr
    ok("stop", "blind", "--force")
