"""A board's device tree, adjusted for what QEMU models: nodes that only get in the way removed.

The Raspberry Pi 3's DTB hangs its Bluetooth chip on the PL011 UART. Linux then makes that
port a serdev bus for the chip instead of a tty, so ttyAMA0 is a console the kernel can write
to but no shell can read from. QEMU models no such chip, so qlaunch boots a copy of the DTB
without the node, and the port is a plain tty again.

`remove_nodes` is pure (flattened device tree bytes in, bytes out); `for_board` is the launch
edge's I/O: it writes the adjusted copy once into the cache and returns its path.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from pathlib import Path

from qlaunch import paths
from qlaunch.config.boards import Board

FDT_MAGIC = 0xD00DFEED
FDT_BEGIN_NODE, FDT_END_NODE, FDT_PROP, FDT_NOP, FDT_END = 1, 2, 3, 4, 9


def _align(n: int) -> int:
    return (n + 3) & ~3


def _node_span(blob: bytes, off_struct: int, size_struct: int, target: str) -> tuple[int, int]:
    """(start, end) of the node at path `target` in the structure block, or (-1, -1)."""
    want = target.rstrip("/").split("/")  # "/a/b" -> ["", "a", "b"]; the root's name is ""
    p, end_struct = off_struct, off_struct + size_struct
    path: list[str] = []
    start = -1
    while p + 4 <= end_struct:
        here = p
        (token,) = struct.unpack_from(">I", blob, p)
        p += 4
        if token == FDT_BEGIN_NODE:
            nul = blob.index(b"\0", p)
            path.append(blob[p:nul].decode("ascii", "replace"))
            p = _align(nul + 1)
            if start < 0 and path == want:
                start = here
        elif token == FDT_END_NODE:
            if start >= 0 and path == want:
                return start, p
            if not path:
                break
            path.pop()
        elif token == FDT_PROP:
            length = struct.unpack_from(">I", blob, p)[0]
            p = _align(p + 8 + length)
        elif token == FDT_NOP:
            continue
        else:  # FDT_END, or bytes that are not a structure block
            break
    return -1, -1


def remove_nodes(blob: bytes, nodes: tuple[str, ...]) -> bytes:
    """The DTB without the nodes at these paths (and their children); absent ones are skipped.

    Bytes that are not a flattened device tree come back as they are: QEMU judges them.
    """
    if len(blob) < 40 or struct.unpack_from(">I", blob, 0)[0] != FDT_MAGIC:
        return blob
    out = bytearray(blob)
    for node in nodes:
        (_, total, off_struct, off_strings, _, version, _, _, _, size_struct) = struct.unpack_from(
            ">10I", out, 0
        )
        if version < 17 or off_strings < off_struct + size_struct:
            return blob  # a layout this cut would corrupt
        start, end = _node_span(bytes(out), off_struct, size_struct, node)
        if start < 0:
            continue
        cut = end - start
        del out[start:end]
        struct.pack_into(">I", out, 4, total - cut)
        struct.pack_into(">I", out, 12, off_strings - cut)
        struct.pack_into(">I", out, 36, size_struct - cut)
    return bytes(out)


def for_board(board: Board, dtb: str | None) -> str | None:
    """The DTB to boot on this board: `dtb` itself, or a cached copy with the board's cuts."""
    if dtb is None or not board.dtb_remove:
        return dtb
    try:
        blob = Path(dtb).read_bytes()
    except OSError:
        return dtb  # the launch edge reports a missing DTB; `cmdline` shows the path
    cut = remove_nodes(blob, board.dtb_remove)
    if cut == blob:
        return dtb
    digest = hashlib.sha256(cut).hexdigest()[:24]
    target = paths.cache_dir() / "dtbs" / f"{Path(dtb).stem}-{digest}.dtb"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".dtb-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(cut)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
    return str(target)
