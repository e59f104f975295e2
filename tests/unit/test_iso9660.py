"""The ISO 9660 writer and NoCloud seeds, read back by a small independent parser."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from qlaunch.boot import iso9660, seed
from qlaunch.errors import UsageError

SECTOR = 2048
SEED_FILES = {
    "user-data": b"#cloud-config\n{}\n",
    "meta-data": b"instance-id: i-1\n",
    "network-config": b"version: 2\n",
}


# --- a reader written from ECMA-119, SUSP 1.10 and RRIP 1.09, not from the writer ---------------


def le_be32(b: bytes, off: int) -> int:
    le = struct.unpack_from("<I", b, off)[0]
    be = struct.unpack_from(">I", b, off + 4)[0]
    assert le == be, f"both-endian mismatch at {off}: {le} != {be}"
    return int(le)


def le_be16(b: bytes, off: int) -> int:
    le = struct.unpack_from("<H", b, off)[0]
    be = struct.unpack_from(">H", b, off + 2)[0]
    assert le == be
    return int(le)


@dataclass
class Record:
    ident: bytes
    extent: int
    size: int
    flags: int
    date: bytes
    system_use: bytes

    def susp(self) -> dict[bytes, list[bytes]]:
        return parse_susp(self.system_use)


def parse_record(b: bytes, off: int) -> Record:
    length = b[off]
    assert length % 2 == 0, "directory records have even length"
    len_fi = b[off + 32]
    ident = b[off + 33 : off + 33 + len_fi]
    su_start = off + 33 + len_fi + (1 if len_fi % 2 == 0 else 0)
    assert le_be16(b, off + 28) == 1  # volume sequence number
    return Record(
        ident=ident,
        extent=le_be32(b, off + 2),
        size=le_be32(b, off + 10),
        flags=b[off + 25],
        date=b[off + 18 : off + 25],
        system_use=b[su_start : off + length],
    )


def parse_susp(su: bytes) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    i = 0
    while i + 4 <= len(su):
        sig, length, version = su[i : i + 2], su[i + 2], su[i + 3]
        if length < 4:
            break
        assert version == 1
        out.setdefault(sig, []).append(su[i : i + length])
        i += length
    return out


def read_dir(img: bytes, extent: int, size: int) -> list[Record]:
    records = []
    for sector in range(size // SECTOR):
        base = (extent + sector) * SECTOR
        off = 0
        while off < SECTOR and img[base + off] != 0:
            rec = parse_record(img, base + off)
            assert off + img[base + off] <= SECTOR, "record crosses a sector boundary"
            records.append(rec)
            off += img[base + off]
    return records


def descriptors(img: bytes) -> dict[int, bytes]:
    out = {}
    n = 16
    while True:
        d = img[n * SECTOR : (n + 1) * SECTOR]
        assert d[1:6] == b"CD001" and d[6] == 1
        out[d[0]] = d
        if d[0] == 255:
            return out
        n += 1


def file_data(img: bytes, rec: Record) -> bytes:
    return img[rec.extent * SECTOR : rec.extent * SECTOR + rec.size]


def rr_names(img: bytes) -> dict[str, bytes]:
    pvd = descriptors(img)[1]
    root = parse_record(pvd, 156)
    out = {}
    for rec in read_dir(img, root.extent, root.size)[2:]:
        nm = rec.susp()[b"NM"]
        out[b"".join(e[5:] for e in nm).decode()] = file_data(img, rec)
    return out


def joliet_names(img: bytes) -> dict[str, bytes]:
    svd = descriptors(img)[2]
    root = parse_record(svd, 156)
    return {
        rec.ident.decode("utf-16-be"): file_data(img, rec)
        for rec in read_dir(img, root.extent, root.size)[2:]
    }


@pytest.fixture(scope="module")
def img() -> bytes:
    return iso9660.build_iso(SEED_FILES, volume_id="cidata")


# --- volume descriptors ---------------------------------------------------------------------


def test_system_area_is_zero_and_descriptors_in_order(img: bytes) -> None:
    assert img[: 16 * SECTOR] == bytes(16 * SECTOR)
    assert [img[n * SECTOR] for n in (16, 17, 18)] == [1, 2, 255]
    assert len(img) % SECTOR == 0


def test_pvd_fields(img: bytes) -> None:
    pvd = descriptors(img)[1]
    assert pvd[40:72] == b"cidata".ljust(32)
    assert le_be32(pvd, 80) * SECTOR == len(img)  # volume space size
    assert le_be16(pvd, 120) == 1 and le_be16(pvd, 124) == 1
    assert le_be16(pvd, 128) == SECTOR
    assert pvd[813:830] == b"2000010100000000\x00"
    assert pvd[847:864] == b"0" * 16 + b"\x00"
    assert pvd[881] == 1
    root = parse_record(pvd, 156)
    assert root.ident == b"\x00" and root.flags & 2 and root.size % SECTOR == 0


def test_path_tables_agree(img: bytes) -> None:
    for kind in (1, 2):
        d = descriptors(img)[kind]
        size = le_be32(d, 132)
        assert size == 10
        root = parse_record(d, 156)
        lt = img[struct.unpack_from("<I", d, 140)[0] * SECTOR :][:size]
        mt = img[struct.unpack_from(">I", d, 148)[0] * SECTOR :][:size]
        assert lt[0] == 1 and lt[8] == 0  # one-byte identifier 0x00: the root
        assert struct.unpack_from("<IH", lt, 2) == (root.extent, 1)
        assert struct.unpack_from(">IH", mt, 2) == (root.extent, 1)


def test_joliet_descriptor(img: bytes) -> None:
    svd = descriptors(img)[2]
    assert svd[88:91] == b"%/E"
    assert svd[40:52].decode("utf-16-be") == "cidata"
    assert svd[52:72] == b"\x00 " * 10


# --- directories and names ------------------------------------------------------------------


def test_primary_names_are_sorted_d_characters(img: bytes) -> None:
    pvd = descriptors(img)[1]
    root = parse_record(pvd, 156)
    recs = read_dir(img, root.extent, root.size)
    assert [r.ident for r in recs[:2]] == [b"\x00", b"\x01"]
    idents = [r.ident.decode() for r in recs[2:]]
    assert idents == ["META_DATA.;1", "NETWORK_CONFIG.;1", "USER_DATA.;1"]
    for r in recs:
        assert r.date == bytes([100, 1, 1, 0, 0, 0, 0])
    assert all(r.extent == root.extent for r in recs[:2])


def test_rock_ridge_root_entries(img: bytes) -> None:
    pvd = descriptors(img)[1]
    root = parse_record(pvd, 156)
    dot = read_dir(img, root.extent, root.size)[0]
    assert dot.system_use[:7] == b"SP\x07\x01\xbe\xef\x00", "SP must open the root's '.' record"
    su = dot.susp()
    (ce,) = su[b"CE"]
    block, offset, length = le_be32(ce, 4), le_be32(ce, 12), le_be32(ce, 20)
    er = img[block * SECTOR + offset :][:length]
    assert er[:2] == b"ER"
    len_id = er[4]
    assert er[8 : 8 + len_id] == b"RRIP_1991A"
    assert er[2] == length == 8 + er[4] + er[5] + er[6]
    (px,) = su[b"PX"]
    assert le_be32(px, 4) == 0o040555


def test_rock_ridge_names_and_modes(img: bytes) -> None:
    assert rr_names(img) == SEED_FILES
    pvd = descriptors(img)[1]
    root = parse_record(pvd, 156)
    for rec in read_dir(img, root.extent, root.size)[2:]:
        (px,) = rec.susp()[b"PX"]
        assert px[2] == 36 and le_be32(px, 4) == 0o100444


def test_joliet_names(img: bytes) -> None:
    assert joliet_names(img) == SEED_FILES


def test_file_extents_are_disjoint_and_padded(img: bytes) -> None:
    pvd = descriptors(img)[1]
    root = parse_record(pvd, 156)
    recs = read_dir(img, root.extent, root.size)[2:]
    extents = sorted(r.extent for r in recs)
    assert len(set(extents)) == len(extents)
    last = max(recs, key=lambda r: r.extent)
    assert (last.extent + 1) * SECTOR == len(img)


def test_empty_file_has_no_extent() -> None:
    img = iso9660.build_iso({"empty": b"", "x": b"1"}, volume_id="v")
    assert rr_names(img) == {"empty": b"", "x": b"1"}


def test_large_directory_spans_sectors_without_splitting_records() -> None:
    files = {f"file-number-{i:03d}-with-a-long-name.txt": bytes([i]) * i for i in range(80)}
    img = iso9660.build_iso(files, volume_id="big")
    pvd = descriptors(img)[1]
    root = parse_record(pvd, 156)
    assert root.size > SECTOR
    assert rr_names(img) == files
    assert joliet_names(img) == files


def test_multi_sector_file() -> None:
    data = bytes(range(256)) * 40  # 10240 bytes: five sectors, the last one partial
    assert rr_names(iso9660.build_iso({"blob": data}, volume_id="v")) == {"blob": data}


def test_clashing_iso_names_get_suffixes() -> None:
    img = iso9660.build_iso({"a-b": b"1", "a_b": b"2", "A.B": b"3"}, volume_id="v")
    pvd = descriptors(img)[1]
    root = parse_record(pvd, 156)
    idents = sorted(r.ident.decode() for r in read_dir(img, root.extent, root.size)[2:])
    assert idents == ["A.B;1", "A_B.;1", "A_B~1.;1"]
    assert rr_names(img) == {"a-b": b"1", "a_b": b"2", "A.B": b"3"}


def test_iso_name_mapping() -> None:
    assert iso9660.iso_name("user-data") == "USER_DATA.;1"
    assert iso9660.iso_name("config.json") == "CONFIG.JSON;1"
    assert iso9660.iso_name(".hidden") == "_HIDDEN.;1"
    long = iso9660.iso_name("x" * 64 + ".verylongextension")
    assert len(long.partition(";")[0]) == 31  # 30 characters and the dot


def test_without_extensions() -> None:
    img = iso9660.build_iso({"user-data": b"x"}, volume_id="v", rock_ridge=False, joliet=False)
    assert set(descriptors(img)) == {1, 255}
    pvd = descriptors(img)[1]
    root = parse_record(pvd, 156)
    recs = read_dir(img, root.extent, root.size)
    assert all(r.system_use.strip(b"\x00") == b"" for r in recs)


def test_deterministic_and_timestamp_override() -> None:
    a = iso9660.build_iso(SEED_FILES, volume_id="cidata")
    assert a == iso9660.build_iso(dict(reversed(SEED_FILES.items())), volume_id="cidata")
    b = iso9660.build_iso(SEED_FILES, volume_id="cidata", when=datetime(2024, 5, 6, tzinfo=UTC))
    assert a != b and descriptors(b)[1][813:827] == b"20240506000000"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "sp ace", "é", "x" * 65, "nul\0"])
def test_bad_names(name: str) -> None:
    with pytest.raises(ValueError):
        iso9660.build_iso({name: b""}, volume_id="v")


@pytest.mark.parametrize("vol", ["", "has space", "x" * 33, "dot.ted"])
def test_bad_volume_ids(vol: str) -> None:
    with pytest.raises(ValueError):
        iso9660.build_iso({}, volume_id=vol)


def test_write_iso_is_atomic_and_private(tmp_path: Path) -> None:
    out = tmp_path / "s.iso"
    out.write_bytes(b"old")
    iso9660.write_iso(out, SEED_FILES, volume_id="cidata")
    assert rr_names(out.read_bytes()) == SEED_FILES
    assert out.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["s.iso"]


# --- seeds ----------------------------------------------------------------------------------


def test_build_seed_files_and_label(tmp_path: Path) -> None:
    out = seed.build_seed(tmp_path / "seed.iso", user_data=b"#cloud-config\n{}\n", hostname="vm1")
    data = out.read_bytes()
    assert descriptors(data)[1][40:72].rstrip() == b"cidata"
    names = rr_names(data)
    assert set(names) == {"user-data", "meta-data"}
    meta = names["meta-data"].decode().splitlines()
    assert meta[0].startswith("instance-id: iid-qlaunch-")
    assert meta[1] == "local-hostname: vm1"


def test_seed_network_config_and_explicit_meta(tmp_path: Path) -> None:
    out = seed.build_seed(tmp_path / "s.iso", user_data=b"u", meta_data=b"m", network_config=b"n")
    assert rr_names(out.read_bytes()) == {
        "user-data": b"u",
        "meta-data": b"m",
        "network-config": b"n",
    }
    # A hostname next to a given meta-data would be lost without a word.
    with pytest.raises(UsageError, match="cannot be added to a meta-data"):
        seed.build_seed(tmp_path / "t.iso", user_data=b"u", meta_data=b"m", hostname="x")
    assert not (tmp_path / "t.iso").exists()


def test_meta_data_carries_public_keys() -> None:
    meta = seed.default_meta_data(b"u", None, "h", ["ssh-ed25519 AAAA a@b ", "ssh-rsa BBBB"])
    lines = meta.decode().splitlines()
    assert lines[1:] == [
        "local-hostname: h",
        'public-keys: ["ssh-ed25519 AAAA a@b", "ssh-rsa BBBB"]',
    ]
    # Keys are part of the content the instance-id follows.
    assert lines[0] != seed.default_meta_data(b"u", None, "h").decode().splitlines()[0]


def test_instance_id_follows_content() -> None:
    a = seed.default_meta_data(b"one", None, "h")
    assert a == seed.default_meta_data(b"one", None, "h")
    assert a != seed.default_meta_data(b"two", None, "h")
    assert a != seed.default_meta_data(b"one", b"", "h")  # empty network-config != none
    assert seed.instance_id(b"ab", b"c") != seed.instance_id(b"a", b"bc")


def test_seed_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        seed.build_seed(tmp_path / "no" / "s.iso", user_data=b"")


def _cloud_config(ud: bytes) -> dict[str, object]:
    header, _, body = ud.decode().partition("\n")
    assert header == "#cloud-config"
    doc: dict[str, object] = json.loads(body)
    return doc


def test_user_data_from() -> None:
    ud = seed.user_data_from(
        "web.example.org", ["ssh-ed25519 AAAAC3 me@host  "], {"packages": ["htop"]}
    )
    assert _cloud_config(ud) == {
        "hostname": "web",
        "fqdn": "web.example.org",
        "ssh_authorized_keys": ["ssh-ed25519 AAAAC3 me@host"],
        "packages": ["htop"],
    }
    assert _cloud_config(seed.user_data_from(None)) == {}


def test_user_data_is_yaml_too() -> None:
    yaml = pytest.importorskip("yaml")
    extra = {"write_files": [{"path": "/x", "content": "del\x7f é 😀 ctl\x01 no 0755"}]}
    ud = seed.user_data_from("h", [], extra)
    assert yaml.safe_load(ud) == {"hostname": "h", **extra}


@pytest.mark.parametrize("host", ["-bad", "bad-", "a..b", "sp ace", "x" * 64, "under_score"])
def test_bad_hostnames(host: str) -> None:
    with pytest.raises(UsageError):
        seed.user_data_from(host)


@pytest.mark.parametrize("key", ["", "  ", "ssh-ed25519 A\nssh-rsa B"])
def test_bad_keys(key: str) -> None:
    with pytest.raises(UsageError, match="ssh authorized key"):
        seed.user_data_from(None, [key])


def test_conflicting_keys() -> None:
    with pytest.raises(UsageError, match="'hostname' is set twice"):
        seed.user_data_from("a", [], {"hostname": "b"})


def test_unserialisable_extra() -> None:
    with pytest.raises(UsageError):
        seed.user_data_from(None, [], {"when": datetime(2020, 1, 1)})
