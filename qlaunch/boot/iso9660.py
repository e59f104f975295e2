"""A minimal ISO 9660 writer: plain files in the root directory, Rock Ridge and Joliet names.

Enough for a cloud-init NoCloud seed, and no more: no subdirectories, files under 4 GiB.

Three name spaces point at the same file data, as genisoimage's `-rock -joliet` lays them out:
- the ISO 9660 names (upper case, `USER_DATA.;1`), for readers that know nothing else;
- Rock Ridge (SUSP/RRIP 1.09: SP, CE->ER in the root's "." record, PX and NM per file), which
  Linux prefers whenever it finds the ER entry, giving exact names such as `user-data`;
- Joliet (UCS-2 names in a supplementary volume descriptor), for Windows and `-o norock`.

The output depends only on the inputs: every timestamp is a fixed one, so the same seed builds
to the same bytes.
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

SECTOR = 2048
SYSTEM_AREA_SECTORS = 16
FIXED_TIME = datetime(2000, 1, 1, tzinfo=UTC)
MAX_FILE_SIZE = 2**32 - 1  # directory records store sizes in 32 bits

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
VOLUME_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
JOLIET_ESCAPE = b"%/E"  # UCS-2 level 3

FLAG_DIRECTORY = 0x02
MODE_FILE = 0o100444
MODE_DIR = 0o040555

RRIP_ID = b"RRIP_1991A"
RRIP_DESCRIPTOR = (
    b"THE ROCK RIDGE INTERCHANGE PROTOCOL PROVIDES SUPPORT FOR POSIX FILE SYSTEM SEMANTICS"
)
RRIP_SOURCE = (
    b"PLEASE CONTACT DISC PUBLISHER FOR SPECIFICATION SOURCE.  SEE PUBLISHER IDENTIFIER IN "
    b"PRIMARY VOLUME DESCRIPTOR FOR CONTACT INFORMATION."
)


# --- encodings -------------------------------------------------------------------------------


def both16(n: int) -> bytes:
    """ECMA-119 7.2.3: little-endian then big-endian."""
    return struct.pack("<H", n) + struct.pack(">H", n)


def both32(n: int) -> bytes:
    """ECMA-119 7.3.3: little-endian then big-endian."""
    return struct.pack("<I", n) + struct.pack(">I", n)


def _dir_date(t: datetime) -> bytes:
    """ECMA-119 9.1.5: seven bytes, years since 1900, offset from GMT in 15-minute units."""
    t = t.astimezone(UTC)
    return bytes([t.year - 1900, t.month, t.day, t.hour, t.minute, t.second, 0])


def _volume_date(t: datetime | None) -> bytes:
    """ECMA-119 8.4.26.1: sixteen digits and a GMT offset byte; all zeros means "not set"."""
    if t is None:
        return b"0" * 16 + b"\x00"
    t = t.astimezone(UTC)
    return t.strftime("%Y%m%d%H%M%S").encode() + b"00\x00"


def _ascii_field(text: str, length: int) -> bytes:
    return text.encode("ascii").ljust(length, b" ")


def _ucs2_field(text: str, length: int) -> bytes:
    data = text.encode("utf-16-be")
    while len(data) + 2 <= length:
        data += b"\x00 "
    return data.ljust(length, b"\x00")


# --- names -----------------------------------------------------------------------------------


def iso_name(name: str, suffix: str = "") -> str:
    """A Level 2 ISO 9660 file identifier for `name`: d-characters, one dot, version ;1."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    stem = re.sub(r"[^A-Z0-9_]", "_", stem.upper())
    ext = re.sub(r"[^A-Z0-9_]", "_", ext.upper())[:8]
    stem = stem[: 30 - len(ext) - len(suffix)] + suffix
    return f"{stem}.{ext};1"


def _unique_iso_names(names: list[str]) -> dict[str, str]:
    """ISO names for each file; a clash ("a-b" and "a_b") gets a ~N suffix."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for name in names:
        ident, n = iso_name(name), 0
        while ident in taken:
            n += 1
            ident = iso_name(name, f"~{n}")
        taken.add(ident)
        out[name] = ident
    return out


def _iso_sort_key(ident: str) -> tuple[bytes, bytes]:
    """ECMA-119 9.3: by name, then extension, the shorter padded with spaces."""
    stem, _, rest = ident.partition(".")
    ext = rest.partition(";")[0]
    return stem.encode().ljust(32, b" "), ext.encode().ljust(32, b" ")


# --- system use entries (SUSP 1.10, RRIP 1.09) ----------------------------------------------


def susp_sp() -> bytes:
    return b"SP" + bytes([7, 1, 0xBE, 0xEF, 0])


def susp_ce(block: int, offset: int, length: int) -> bytes:
    return b"CE" + bytes([28, 1]) + both32(block) + both32(offset) + both32(length)


def susp_er(ext_id: bytes, descriptor: bytes, source: bytes) -> bytes:
    head = bytes([8 + len(ext_id) + len(descriptor) + len(source), 1])
    return (
        b"ER"
        + head
        + bytes([len(ext_id), len(descriptor), len(source), 1])
        + ext_id
        + (descriptor + source)
    )


def rrip_px(mode: int, nlink: int) -> bytes:
    return b"PX" + bytes([36, 1]) + both32(mode) + both32(nlink) + both32(0) + both32(0)


def rrip_nm(name: bytes) -> bytes:
    return b"NM" + bytes([5 + len(name), 1, 0]) + name


# --- records ---------------------------------------------------------------------------------


def dir_record(
    ident: bytes, extent: int, size: int, *, flags: int, when: datetime, system_use: bytes = b""
) -> bytes:
    """ECMA-119 9.1: one directory record; its length is even and at most 255."""
    pad = b"\x00" if len(ident) % 2 == 0 else b""
    body = (
        both32(extent)
        + both32(size)
        + _dir_date(when)
        + bytes([flags, 0, 0])
        + both16(1)
        + bytes([len(ident)])
        + ident
        + pad
        + system_use
    )
    if (len(body) + 2) % 2:
        body += b"\x00"
    length = len(body) + 2
    if length > 255:
        raise ValueError(f"directory record for {ident!r} is {length} bytes, more than 255")
    return bytes([length, 0]) + body


def _pack_directory(records: list[bytes]) -> list[bytes]:
    """Records into sectors: ECMA-119 6.8.1.1 forbids a record spanning two sectors."""
    sectors: list[bytes] = []
    cur = b""
    for rec in records:
        if len(cur) + len(rec) > SECTOR:
            sectors.append(cur.ljust(SECTOR, b"\x00"))
            cur = b""
        cur += rec
    sectors.append(cur.ljust(SECTOR, b"\x00"))
    return sectors


def path_table(root_extent: int, *, big_endian: bool) -> bytes:
    """ECMA-119 9.4 with the root as the only directory."""
    order = ">" if big_endian else "<"
    return bytes([1, 0]) + struct.pack(order + "IH", root_extent, 1) + b"\x00\x00"


@dataclass(frozen=True)
class _Entry:
    name: str
    data: bytes
    extent: int


@dataclass(frozen=True)
class _Layout:
    total: int
    pvd: int
    svd: int | None
    terminator: int
    l_table: int
    m_table: int
    jl_table: int | None
    jm_table: int | None
    root: int
    root_sectors: int
    ce: int | None
    jroot: int | None
    jroot_sectors: int
    entries: tuple[_Entry, ...]


def _root_records(
    entries: list[_Entry],
    names: dict[str, str],
    *,
    root: int,
    root_size: int,
    ce: int | None,
    er_len: int,
    when: datetime,
) -> list[bytes]:
    rock = ce is not None
    # SUSP 5.3: SP opens the root's "." record; ER is too long to fit beside it, so a CE
    # entry points at a continuation sector that holds it.
    dot_su = susp_sp() + rrip_px(MODE_DIR, 2) + susp_ce(ce, 0, er_len) if ce is not None else b""
    dotdot_su = rrip_px(MODE_DIR, 2) if rock else b""
    records = [
        dir_record(b"\x00", root, root_size, flags=FLAG_DIRECTORY, when=when, system_use=dot_su),
        dir_record(b"\x01", root, root_size, flags=FLAG_DIRECTORY, when=when, system_use=dotdot_su),
    ]
    for e in sorted(entries, key=lambda e: _iso_sort_key(names[e.name])):
        su = rrip_px(MODE_FILE, 1) + rrip_nm(e.name.encode()) if rock else b""
        records.append(
            dir_record(
                names[e.name].encode(), e.extent, len(e.data), flags=0, when=when, system_use=su
            )
        )
    return records


def _joliet_records(
    entries: list[_Entry], *, root: int, root_size: int, when: datetime
) -> list[bytes]:
    records = [
        dir_record(b"\x00", root, root_size, flags=FLAG_DIRECTORY, when=when),
        dir_record(b"\x01", root, root_size, flags=FLAG_DIRECTORY, when=when),
    ]
    # Joliet names carry no ";1": Linux and libarchive strip it anyway, Windows shows it raw.
    for e in sorted(entries, key=lambda e: e.name.encode("utf-16-be")):
        ident = e.name.encode("utf-16-be")
        records.append(dir_record(ident, e.extent, len(e.data), flags=0, when=when))
    return records


def _volume_descriptor(
    *,
    joliet: bool,
    volume_id: str,
    space: int,
    table_size: int,
    l_table: int,
    m_table: int,
    root_record: bytes,
    when: datetime,
) -> bytes:
    """ECMA-119 8.4 (primary) or 8.5 (supplementary, here always Joliet)."""
    field = _ucs2_field if joliet else _ascii_field
    d = bytearray(SECTOR)
    d[0] = 2 if joliet else 1
    d[1:6] = b"CD001"
    d[6] = 1
    d[8:40] = field("", 32)
    # Joliet volume ids are 16 UCS-2 characters at most.
    d[40:72] = field(volume_id[:16] if joliet else volume_id, 32)
    d[80:88] = both32(space)
    if joliet:
        d[88:120] = JOLIET_ESCAPE.ljust(32, b"\x00")
    d[120:124] = both16(1)
    d[124:128] = both16(1)
    d[128:132] = both16(SECTOR)
    d[132:140] = both32(table_size)
    d[140:144] = struct.pack("<I", l_table)
    d[148:152] = struct.pack(">I", m_table)
    d[156:190] = root_record
    d[190:318] = field("", 128)  # volume set
    d[318:446] = field("", 128)  # publisher
    d[446:574] = field("", 128)  # data preparer
    d[574:702] = field("QLAUNCH", 128)  # application
    for start in (702, 739, 776):  # copyright, abstract, bibliographic file ids
        d[start : start + 37] = field("", 37)
    d[813:830] = _volume_date(when)
    d[830:847] = _volume_date(when)
    d[847:864] = _volume_date(None)
    d[864:881] = _volume_date(None)
    d[881] = 1
    return bytes(d)


def _terminator() -> bytes:
    d = bytearray(SECTOR)
    d[0] = 255
    d[1:6] = b"CD001"
    d[6] = 1
    return bytes(d)


def _sectors(n: int) -> int:
    return (n + SECTOR - 1) // SECTOR


def build_iso(
    files: Mapping[str, bytes],
    *,
    volume_id: str,
    rock_ridge: bool = True,
    joliet: bool = True,
    when: datetime = FIXED_TIME,
) -> bytes:
    """The bytes of an ISO 9660 image holding `files` (name -> content) in its root."""
    if not VOLUME_ID_RE.fullmatch(volume_id):
        raise ValueError(f"bad volume id {volume_id!r}: 1-32 of A-Z a-z 0-9 _ -")
    for name, data in files.items():
        if not NAME_RE.fullmatch(name) or name in (".", ".."):
            raise ValueError(f"bad file name {name!r}: 1-64 of A-Z a-z 0-9 . _ -")
        if len(data) > MAX_FILE_SIZE:
            raise ValueError(f"{name}: {len(data)} bytes, more than ISO 9660 allows in one extent")
    names = _unique_iso_names(sorted(files))
    er = susp_er(RRIP_ID, RRIP_DESCRIPTOR, RRIP_SOURCE)

    # Record lengths do not depend on extents, so one dry run sizes the directories.
    dry = [_Entry(n, d, 0) for n, d in files.items()]
    root_sectors = len(
        _pack_directory(
            _root_records(
                dry, names, root=0, root_size=0, ce=0 if rock_ridge else None, er_len=0, when=when
            )
        )
    )
    jroot_sectors = len(_pack_directory(_joliet_records(dry, root=0, root_size=0, when=when)))

    nxt = SYSTEM_AREA_SECTORS
    pvd, nxt = nxt, nxt + 1
    svd: int | None = None
    if joliet:
        svd, nxt = nxt, nxt + 1
    terminator, nxt = nxt, nxt + 1
    l_table, m_table, nxt = nxt, nxt + 1, nxt + 2
    jl_table = jm_table = None
    if joliet:
        jl_table, jm_table, nxt = nxt, nxt + 1, nxt + 2
    root, nxt = nxt, nxt + root_sectors
    ce: int | None = None
    if rock_ridge:
        ce, nxt = nxt, nxt + 1
    jroot: int | None = None
    if joliet:
        jroot, nxt = nxt, nxt + jroot_sectors
    entries: list[_Entry] = []
    # Sorted, so that the bytes depend on the files and not on the order they were given in.
    for name, data in sorted(files.items()):
        # An empty file owns no sector. Its extent is never read; 0 keeps it inside the volume
        # (Linux, libarchive, isoinfo and xorriso all accept it).
        entries.append(_Entry(name, data, nxt if data else 0))
        nxt += _sectors(len(data))
    total = nxt

    out = bytearray(total * SECTOR)

    def put(sector: int, data: bytes) -> None:
        out[sector * SECTOR : sector * SECTOR + len(data)] = data

    root_size = root_sectors * SECTOR
    root_dir = _pack_directory(
        _root_records(
            entries, names, root=root, root_size=root_size, ce=ce, er_len=len(er), when=when
        )
    )
    put(root, b"".join(root_dir))
    put(l_table, path_table(root, big_endian=False))
    put(m_table, path_table(root, big_endian=True))
    root_record = dir_record(b"\x00", root, root_size, flags=FLAG_DIRECTORY, when=when)
    put(
        pvd,
        _volume_descriptor(
            joliet=False,
            volume_id=volume_id,
            space=total,
            table_size=10,
            l_table=l_table,
            m_table=m_table,
            root_record=root_record,
            when=when,
        ),
    )
    if ce is not None:
        put(ce, er)
    if joliet:
        assert svd is not None and jroot is not None
        assert jl_table is not None and jm_table is not None
        jroot_size = jroot_sectors * SECTOR
        put(
            jroot,
            b"".join(
                _pack_directory(
                    _joliet_records(entries, root=jroot, root_size=jroot_size, when=when)
                )
            ),
        )
        put(jl_table, path_table(jroot, big_endian=False))
        put(jm_table, path_table(jroot, big_endian=True))
        jroot_record = dir_record(b"\x00", jroot, jroot_size, flags=FLAG_DIRECTORY, when=when)
        put(
            svd,
            _volume_descriptor(
                joliet=True,
                volume_id=volume_id,
                space=total,
                table_size=10,
                l_table=jl_table,
                m_table=jm_table,
                root_record=jroot_record,
                when=when,
            ),
        )
    put(terminator, _terminator())
    for e in entries:
        if e.data:
            put(e.extent, e.data)
    return bytes(out)


def write_iso(
    path: str | os.PathLike[str],
    files: Mapping[str, bytes],
    *,
    volume_id: str,
    rock_ridge: bool = True,
    joliet: bool = True,
    when: datetime = FIXED_TIME,
) -> Path:
    """build_iso into `path`, replacing it atomically: a reader never sees half an image.

    The file stays mode 0600 (mkstemp's): seeds carry user-data, which may hold passwords.
    """
    data = build_iso(files, volume_id=volume_id, rock_ridge=rock_ridge, joliet=joliet, when=when)
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
