"""Screenshots' file formats without QEMU: PPM (what QEMU's screendump writes) to PNG, read
back pixel for pixel; what is not a PPM or a PNG is refused."""

from __future__ import annotations

import pngread
import pytest

from qlaunch.vm import screen


def ppm(w: int, h: int, pixels: bytes, header: bytes | None = None) -> bytes:
    return (header or f"P6\n{w} {h}\n255\n".encode()) + pixels


def test_ppm_to_png_keeps_every_pixel() -> None:
    w, h = 7, 3
    pixels = bytes(
        (x * 37 + y * 91 + c * 13) % 256 for y in range(h) for x in range(w) for c in range(3)
    )
    png = screen.png_from_ppm(ppm(w, h, pixels))
    assert screen.png_size(png) == (7, 3)
    rw, rh, rows = pngread.read(png)
    assert (rw, rh) == (w, h)
    assert b"".join(rows) == pixels


def test_ppm_header_with_comments_and_a_lower_maxval() -> None:
    pixels = bytes([0, 1, 3, 3, 2, 1])
    png = screen.png_from_ppm(ppm(2, 1, pixels, b"P6 # made by hand\n2 1\n# max\n3\n"))
    assert pngread.read(png)[2] == [bytes([0, 85, 255, 255, 170, 85])]


def test_not_a_ppm_or_png() -> None:
    with pytest.raises(ValueError, match="P6"):
        screen.png_from_ppm(b"P3\n1 1\n255\n0 0 0\n")
    with pytest.raises(ValueError, match="no number"):
        screen.png_from_ppm(b"P6\nx 1\n255\n")
    with pytest.raises(ValueError, match="not a PNG"):
        screen.png_size(b"GIF89a" + bytes(40))
    with pytest.raises(ValueError, match="bytes of pixels"):
        screen.png_from_rgb(2, 2, bytes(11))
