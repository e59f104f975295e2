"""A running VM's screen as a PNG file: QMP `screendump` (libvirt's `virsh screenshot`).

    from qlaunch.vm import screen
    shot = screen.screenshot("web", "web.png")       # Shot(path, width, height, bytes)

Only for VMs with a display ([display] type = "vnc"): without one QEMU has no graphical
console to dump. QEMU writes the picture itself, into a file in the VM's state directory,
as PNG where it can (7.1 and later, built with libpng, as Debian's is); otherwise as PPM,
which qlaunch turns into PNG here (zlib, no imaging library). A QEMU that runs as another
user (--runas) cannot open files in the state directory (0700, root's): it gets an open file
descriptor instead (QMP add-fd; screendump to /dev/fdset/N), and writes PPM, the format whose
writer closes that descriptor the way QEMU's fd sets expect.

The PNG reaches OUT as every file qlaunch writes does (qlaunch.storage.outfile): through a
temporary file and a rename, never over a file qlaunch did not write unless forced, never over
a file a VM holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlaunch.errors import QemuError, StateError
from qlaunch.storage import outfile
from qlaunch.vm import state

if TYPE_CHECKING:
    from qlaunch.vm.api import VM
    from qlaunch.vm.qmp import Monitor

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DUMP_TIMEOUT = 30.0  # a screendump is a copy of video memory: seconds mean QEMU is stuck


@dataclass(frozen=True)
class Shot:
    name: str
    path: str
    width: int
    height: int
    bytes: int
    via: str  # "png" (QEMU wrote PNG) or "ppm" (QEMU wrote PPM, converted here)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---- PNG and PPM ---------------------------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR; ValueError if data is no PNG."""
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR" or len(data) < 33:
        raise ValueError("not a PNG file")
    w, h = struct.unpack(">II", data[16:24])
    return int(w), int(h)


def _chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def png_from_rgb(width: int, height: int, rgb: bytes) -> bytes:
    """An 8-bit RGB PNG of rgb (rows top to bottom, 3 bytes a pixel), unfiltered rows."""
    stride = width * 3
    if len(rgb) != stride * height:
        raise ValueError(f"{len(rgb)} bytes of pixels for {width}x{height} RGB")
    rows = b"".join(b"\x00" + rgb[y * stride : (y + 1) * stride] for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(rows, 6))
        + _chunk(b"IEND", b"")
    )


def _ppm_tokens(data: bytes, count: int) -> tuple[list[int], int]:
    """The first count header numbers of a PPM after its magic, and where the pixels start
    (after exactly one whitespace byte)."""
    out: list[int] = []
    i = 2
    while len(out) < count:
        while i < len(data) and data[i : i + 1].isspace():
            i += 1
        if data[i : i + 1] == b"#":
            while i < len(data) and data[i : i + 1] not in (b"\n", b"\r"):
                i += 1
            continue
        j = i
        while j < len(data) and data[j : j + 1].isdigit():
            j += 1
        if j == i:
            raise ValueError("a PPM header with no number where one belongs")
        out.append(int(data[i:j]))
        i = j
    return out, i + 1


def png_from_ppm(data: bytes) -> bytes:
    """Binary PPM (P6, as QEMU writes it) to PNG; ValueError for anything else."""
    if not data.startswith(b"P6"):
        raise ValueError("not a binary PPM (P6) file")
    (width, height, maxval), start = _ppm_tokens(data, 3)
    if not 0 < maxval < 256:
        raise ValueError(f"PPM with maxval {maxval}: only 8-bit samples are read")
    pixels = data[start : start + width * height * 3]
    if maxval != 255:
        pixels = bytes(v * 255 // maxval for v in pixels)
    return png_from_rgb(width, height, pixels)


# ---- the screenshot ------------------------------------------------------------------------


def _display_of(vm: VM) -> str:
    from qlaunch.config import profile as profmod

    try:
        pj = json.loads((vm.dir / "profile.json").read_bytes())
        prof = profmod.build(pj["profile"], name=pj["name"], source="the VM's profile")
    except (OSError, ValueError, KeyError, TypeError):
        raise StateError(f"VM {vm.name} has no readable record of its profile") from None
    return prof.display


def _runs_as_other_user(vm: VM) -> bool:
    with contextlib.suppress(OSError, ValueError):
        return "-runas" in json.loads((vm.dir / "argv.json").read_bytes())
    return False


def screenshot(
    name: str, out: str | os.PathLike[str], *, force: bool = False, base: Path | None = None
) -> Shot:
    """The VM's screen now, as a PNG at out. StateError for a VM that is not running or has
    no display; UsageError for an out that may not be written."""
    from qlaunch.vm.api import VM

    vm = VM.get(name, base)
    display = _display_of(vm)
    if display == "none":
        raise StateError(
            f"VM {vm.name} has no display (its profile's [display] type is none): there is no "
            "screen to take",
            hint=f"start it with --set display.type=vnc (qlaunch stop {vm.name} first)",
        )
    dest = outfile.check_target(out, "screenshot", force=force)
    who = state.holder_of(dest, vm.base)
    if who is not None:
        raise StateError(f"{dest} is {who}; a screenshot never replaces it", hint="choose another")
    live = state.inspect(vm.dir)
    if live.qemu is None:
        raise StateError(f"VM {vm.name} is not running (state {live.state})")
    with vm.monitor(purpose="screenshot") as mon:
        if _runs_as_other_user(vm):
            png, via = dump_via_fd(mon, vm.dir), "ppm"
        else:
            png, via = dump_in_state_dir(mon, vm.dir)
    width, height = png_size(png)
    outfile.write_bytes(dest, png)
    return Shot(vm.name, str(dest), width, height, len(png), via)


def _temp(d: Path, suffix: str) -> tuple[Path, int]:
    p = d / f".screendump.{os.getpid()}.{suffix}"
    with contextlib.suppress(FileNotFoundError):
        p.unlink()  # a leftover of a killed screenshot of ours (same pid: a reused one)
    return p, os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


def dump_in_state_dir(mon: Monitor, d: Path) -> tuple[bytes, str]:
    """QEMU writes the screen into a file in the state directory: PNG where it can, else PPM
    (converted here). Returns (PNG bytes, "png" or "ppm")."""
    from qlaunch.vm.qmp import QMPError

    for fmt in ("png", "ppm"):
        path, fd = _temp(d, fmt)
        os.close(fd)
        try:
            args: dict[str, object] = {"filename": str(path)}
            if fmt == "png":
                args["format"] = "png"
            try:
                mon.execute("screendump", args, timeout=DUMP_TIMEOUT)
            except QMPError as e:
                # QEMU before 7.1 knows no format; one built without libpng refuses PNG.
                if fmt == "png" and ("format" in e.desc or "PNG" in e.desc.upper()):
                    continue
                raise _dump_error(e) from None
            return _as_png(path.read_bytes(), fmt), fmt
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    raise QemuError("screendump: QEMU wrote neither PNG nor PPM")  # pragma: no cover


def dump_via_fd(mon: Monitor, d: Path) -> bytes:
    """QEMU writes PPM into a descriptor qlaunch opened (an fd set): for a QEMU that cannot
    open files where qlaunch keeps them. Returns PNG bytes."""
    from qlaunch.vm.qmp import QMPError, QMPUnavailable

    path, fd = _temp(d, "ppm")
    fdset: int | None = None
    try:
        try:
            # Monitor.getfd names an fd for fd:NAME users; qemu_open wants an fd set, so the
            # descriptor goes with add-fd on the same session.
            mon._need().send_fd_scm(fd)
        except OSError as e:
            raise QMPUnavailable(f"cannot pass a file descriptor: {e}") from None
        fdset = int(mon.execute("add-fd", {})["fdset-id"])
        try:
            mon.execute("screendump", {"filename": f"/dev/fdset/{fdset}"}, timeout=DUMP_TIMEOUT)
        except QMPError as e:
            raise _dump_error(e) from None
        return _as_png(path.read_bytes(), "ppm")
    finally:
        if fdset is not None:
            with contextlib.suppress(QMPError, QMPUnavailable):
                mon.execute("remove-fd", {"fdset-id": fdset})
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _as_png(data: bytes, fmt: str) -> bytes:
    try:
        if fmt == "png":
            png_size(data)
            return data
        return png_from_ppm(data)
    except ValueError as e:
        raise QemuError(f"screendump: QEMU's {fmt.upper()} file is unreadable: {e}") from None


def _dump_error(e: Exception) -> QemuError:
    desc = getattr(e, "desc", str(e))
    return QemuError(f"screendump failed: {desc}", hint="see the VM's qemu.log")
