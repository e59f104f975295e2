"""The save file format (qlaunch.vm.migrate): what restore accepts and what it refuses before it
starts anything."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from qlaunch.errors import UsageError
from qlaunch.vm import migrate

STREAM = b"QEVM" + bytes(range(256)) * 64


def write_save(path: Path, stream: bytes = STREAM, **trailer: object) -> Path:
    t = {"stream_bytes": len(stream), "sha256": hashlib.sha256(stream).hexdigest(), "disks": []}
    t.update(trailer)
    hdr = migrate._header_bytes({"format": 1, "name": "web", "profile": {}})
    path.write_bytes(hdr + stream + migrate._trailer_bytes(t))
    return path


def test_a_complete_file_reads_back(tmp_path: Path) -> None:
    sf = migrate.read_save(write_save(tmp_path / "ok"))
    assert sf.header["name"] == "web"
    assert sf.stream_bytes == len(STREAM)
    data = (tmp_path / "ok").read_bytes()
    assert data[sf.stream_offset : sf.stream_offset + sf.stream_bytes] == STREAM


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda b: b[: len(b) // 2], "no trailer, so the save never finished"),
        (lambda b: b"XX" + b[2:], "no qlaunch save header"),
        (lambda b: b[:7] + b"\x09" + b[8:], "of format 9"),
        (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], "damaged|not JSON|no QEMU"),
        (lambda b: b[:5000] + bytes([b[5000] ^ 1]) + b[5001:], "fails its SHA-256"),
        (lambda b: b"", "no qlaunch save header"),
    ],
)
def test_damage_is_refused(tmp_path: Path, damage: object, match: str) -> None:
    good = write_save(tmp_path / "good").read_bytes()
    bad = tmp_path / "bad"
    bad.write_bytes(damage(good))  # type: ignore[operator]
    with pytest.raises(UsageError, match=match):
        migrate.read_save(bad)


def test_a_stream_that_is_not_qemus(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no QEMU migration stream"):
        migrate.read_save(write_save(tmp_path / "x", stream=b"ELF!" + bytes(100)))
    with pytest.raises(UsageError, match="the trailer says"):
        migrate.read_save(write_save(tmp_path / "y", stream_bytes=3))


def test_macs_are_pinned_to_the_saved_name() -> None:
    from qlaunch.names import stable_mac

    raw = {
        "net": [{"mode": "none"}, {"mode": "user"}, {"mode": "user", "mac": "52:54:00:00:00:01"}]
    }
    out = migrate._pin_macs(raw, "old")
    assert out["net"][0] == {"mode": "none"}
    assert out["net"][1]["mac"] == stable_mac("old", 0)
    assert out["net"][2]["mac"] == "52:54:00:00:00:01"
    assert "mac" not in raw["net"][1]  # the saved header is left as it was
