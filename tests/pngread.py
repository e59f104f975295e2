"""A small PNG reader for the tests (8-bit RGB or RGBA, not interlaced, all five filters), so
that a screenshot's pixels can be checked without an imaging library."""

from __future__ import annotations

import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data.startswith(SIGNATURE), data[:8]
    out = []
    i = len(SIGNATURE)
    while i < len(data):
        (n,) = struct.unpack(">I", data[i : i + 4])
        tag, body = data[i + 4 : i + 8], data[i + 8 : i + 8 + n]
        (crc,) = struct.unpack(">I", data[i + 8 + n : i + 12 + n])
        assert zlib.crc32(tag + body) == crc, f"bad CRC in {tag!r}"
        out.append((tag, body))
        i += 12 + n
    assert out[0][0] == b"IHDR" and out[-1][0] == b"IEND"
    return out


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def read(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes)."""
    cs = chunks(data)
    w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", cs[0][1])
    assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(b"".join(body for tag, body in cs if tag == b"IDAT"))
    stride = w * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            pred = (0, a, b, (a + b) // 2, _paeth(a, b, c))[f]
            line[x] = (line[x] + pred) & 0xFF
        prev = line
        rgb = line if bpp == 3 else bytearray(v for i, v in enumerate(line) if i % 4 != 3)
        rows.append(bytes(rgb))
    return w, h, rows
