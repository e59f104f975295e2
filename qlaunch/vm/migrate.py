"""Save a running VM to a file and restore it: QEMU migration to and from a file descriptor.

    from qlaunch.vm import migrate
    report = migrate.save("web", "web.qlsave")         # the VM ends, recorded as saved
    vm = migrate.restore("web.qlsave", name="web2")     # resumes where it was

No shell is involved: `migrate "exec:..."` would run one. qlaunch opens the file itself and
hands QEMU the descriptor over the monitor socket (`getfd`), then `migrate fd:NAME` (QEMU 7.2
has no `file:` URI; it came in 8.2). The guest is paused first, so the stream is one pass with
no dirty-page rounds and what is saved is one instant.

The file is one piece that `restore` can check before it starts anything:

    "QLSAVE\\0" + version byte (1)
    u32 big-endian length, then the header: JSON (see save(): the profile as resolved, the
        command, the restart policy, hotplugged devices, QEMU's version and machine type,
        whether the guest was running)
    QEMU's migration stream (it starts with "QEVM")
    the trailer: JSON (stream length and SHA-256, each disk's size and mtime at the save)
    u32 big-endian length of the trailer, then "QLSAVEND"

A save that did not finish has no trailer (and is written under a temporary name until it
has one), so it can never be mistaken for a good one. The disks are not in the file: restore
needs the very images the VM had, unchanged since the save (checked by size and mtime).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlaunch.errors import QemuError, QlaunchError, StateError, UsageError
from qlaunch.storage import outfile
from qlaunch.vm import state

if TYPE_CHECKING:
    from qlaunch.vm.api import VM
    from qlaunch.vm.qmp import Monitor

MAGIC = b"QLSAVE\x00"
VERSION = 1
END = b"QLSAVEND"
STREAM_MAGIC = b"QEVM"
MIGRATE_TIMEOUT = 600.0
INCOMING = ("-incoming", "defer")
FD_NAME = "qlaunch-migrate"
Note = Callable[[str], None]
# How far a save or restore is: (bytes done, bytes in all), polled while QEMU works.
Progress = Callable[[int, int], None]


@dataclass
class SaveReport:
    name: str
    file: str
    bytes: int  # the whole file
    seconds: float  # pause to a complete file (QEMU's quit not included)
    was_running: bool

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SaveFile:
    """A checked save file: its header, trailer, and where QEMU's stream lies in it."""

    path: Path
    header: dict[str, Any]
    trailer: dict[str, Any]
    stream_offset: int
    stream_bytes: int


# ---- the file format -----------------------------------------------------------------------


def _header_bytes(header: dict[str, Any]) -> bytes:
    body = json.dumps(header, sort_keys=True).encode()
    return MAGIC + bytes([VERSION]) + struct.pack(">I", len(body)) + body


def _trailer_bytes(trailer: dict[str, Any]) -> bytes:
    body = json.dumps(trailer, sort_keys=True).encode()
    return body + struct.pack(">I", len(body)) + END


def read_save(path: str | Path, verify: bool = True) -> SaveFile:
    """Open and check a save file; with verify, also the stream's SHA-256. UsageError for a
    file that is not a complete qlaunch save."""
    p = Path(path)
    bad = f"{p} is not a complete qlaunch save file"
    outfile.require_file(p, "save file")
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"cannot open {p}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(len(MAGIC) + 5)
        if len(head) < len(MAGIC) + 5 or head[: len(MAGIC)] != MAGIC:
            raise UsageError(f"{bad}: no qlaunch save header")
        if head[len(MAGIC)] != VERSION:
            raise UsageError(
                f"{p} is a qlaunch save of format {head[len(MAGIC)]}; this qlaunch reads {VERSION}"
            )
        (hlen,) = struct.unpack(">I", head[len(MAGIC) + 1 :])
        offset = len(head) + hlen
        if offset + 12 > size:
            raise UsageError(f"{bad}: it ends inside its header")
        try:
            header = json.loads(f.read(hlen))
        except ValueError:
            raise UsageError(f"{bad}: its header is not JSON") from None
        if not isinstance(header, dict) or not isinstance(header.get("name"), str):
            raise UsageError(f"{bad}: its header does not name the VM")
        f.seek(size - 12)
        tail = f.read(12)
        if tail[4:] != END:
            raise UsageError(f"{bad}: it has no trailer, so the save never finished")
        (tlen,) = struct.unpack(">I", tail[:4])
        stream_bytes = size - 12 - tlen - offset
        if stream_bytes <= 0:
            raise UsageError(f"{bad}: its trailer overlaps its header")
        f.seek(size - 12 - tlen)
        try:
            trailer = json.loads(f.read(tlen))
        except ValueError:
            raise UsageError(f"{bad}: its trailer is not JSON") from None
        if not isinstance(trailer, dict) or not isinstance(trailer.get("disks", []), list):
            raise UsageError(f"{bad}: its trailer is not what a save writes")
        if trailer.get("stream_bytes") != stream_bytes:
            raise UsageError(
                f"{bad}: the stream is {stream_bytes} bytes, the trailer says "
                f"{trailer.get('stream_bytes')}"
            )
        f.seek(offset)
        if f.read(len(STREAM_MAGIC)) != STREAM_MAGIC:
            raise UsageError(f"{bad}: no QEMU migration stream after the header")
        if verify:
            f.seek(offset)
            if _sha256(f, stream_bytes) != trailer.get("sha256"):
                raise UsageError(f"{p} is damaged: its migration stream fails its SHA-256")
    return SaveFile(p, header, trailer, offset, stream_bytes)


def _sha256(f: Any, n: int) -> str:
    h = hashlib.sha256()
    left = n
    while left > 0:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def _disk_stats(paths: list[str]) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append({"path": p, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _persistent_disks(profile_json: dict[str, Any], argv: list[str]) -> list[str]:
    """Image files the guest's disks live on (not the seed ISO, which restore rebuilds)."""
    from qlaunch.config import profile as profmod

    prof = profmod.build(profile_json["profile"], name=profile_json["name"], source="saved")
    out = []
    for d in prof.disks:
        if d.cloud_init_seed:
            continue
        if d.snapshot:
            raise StateError(
                f"disk {d.path} is a throwaway (snapshot = true): its overlay ends with QEMU, "
                "so a restore would find the guest's writes gone",
                hint="save needs persistent disks; internal snapshots (qlaunch snapshot) keep "
                "a throwaway disk's state while the VM runs",
            )
        out.append(os.path.abspath(d.path))
    for i, a in enumerate(argv[:-1]):
        if a == "-blockdev":
            spec = json.loads(argv[i + 1])
            fn = (spec.get("file") or {}).get("filename")
            if fn:
                out.append(fn)
    return out


# ---- save ----------------------------------------------------------------------------------


def save(
    name: str,
    file: str | Path,
    *,
    force: bool = False,
    note: Note | None = None,
    lock_timeout: float = 30.0,
    base: Path | None = None,
    progress: Progress | None = None,
) -> SaveReport:
    """Migrate the running (or paused) VM's state into `file`; then the VM ends (QMP quit)
    and its record says where it was saved. force: replace an existing file. progress: called
    while QEMU streams, with the guest RAM done so far and the guest's RAM size."""
    from qlaunch.vm import stop
    from qlaunch.vm.api import VM

    vm = VM.get(name, base)
    # Everything that can be refused is refused before the guest is paused.
    dest = outfile.check_target(file, "save file", force=force, own=False)
    with state.locked(vm.name, "save", lock_timeout, vm.base):
        live = state.inspect(vm.dir)
        if live.qemu is None:
            raise StateError(f"VM {vm.name} is not running (state {live.state})")
        rec = live.record
        profile_json = json.loads((vm.dir / "profile.json").read_text())
        argv = json.loads((vm.dir / "argv.json").read_text())
        disks = _persistent_disks(profile_json, argv)
        _refuse_held(dest, vm, disks)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise UsageError(f"cannot write {tmp}: {e.strerror}") from None
        try:
            with vm.monitor(purpose="save") as mon:
                t0 = time.monotonic()
                was_running, header = _header(vm, mon, rec, profile_json, argv)
                _write(fd, _header_bytes(header), tmp)
                offset = os.lseek(fd, 0, os.SEEK_CUR)
                info = _migrate_out(mon, fd, was_running, progress)
                try:
                    end = _finish(fd, tmp, offset, info, disks)
                    os.close(fd)
                    fd = -1
                    _publish(tmp, dest)
                except BaseException:
                    # The state is in QEMU's hands still: the guest goes on as it was
                    # rather than stay in postmigrate, neither saved nor running.
                    _resume(mon, was_running)
                    raise
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        outfile.remember(dest)
        seconds = round(time.monotonic() - t0, 3)
        state.log(vm.dir, f"save: state saved to {dest} ({end} bytes) in {seconds:.2f} s")
        if note:
            note(f"{vm.name}: saved to {dest} ({end / 2**20:.1f} MiB) in {seconds:.2f} s")
        # The saved state is the VM now: its QEMU must not run on (nor be restarted) and
        # diverge from the file. It sits in postmigrate, so there is no guest to ask.
        stop.stop_locked(vm, timeout=0.0, force=True, on_step=None)

        def mark(r: state.Record) -> None:
            r.saved = {"file": str(dest), "at": time.time()}

        state.update(vm.dir, mark)
    return SaveReport(vm.name, str(dest), end, seconds, was_running)


def _refuse_held(dest: Path, vm: VM, disks: list[str]) -> None:
    """Never over a file a VM holds, --force or not: its own disks (the save would replace
    the very disk it needs), another VM's files, a saved VM's save file."""
    real = os.path.realpath(dest)
    if real in {os.path.realpath(d) for d in disks}:
        raise StateError(
            f"{dest} is a disk of VM {vm.name}: the save needs that disk unchanged",
            hint="save to a file of its own",
        )
    who = state.holder_of(dest, vm.base)
    if who is not None:
        raise StateError(f"{dest} is {who}; a save never replaces it", hint="choose another file")


def _write(fd: int, data: bytes, tmp: Path) -> None:
    try:
        os.write(fd, data)
    except OSError as e:
        raise UsageError(f"cannot write {tmp}: {e.strerror}") from None


def _finish(fd: int, tmp: Path, offset: int, info: dict[str, Any], disks: list[str]) -> int:
    """The trailer after QEMU's stream, synced; returns the file's size."""
    end = os.lseek(fd, 0, os.SEEK_END)
    stream_bytes = end - offset
    with os.fdopen(os.dup(fd), "rb") as f:
        f.seek(offset)
        digest = _sha256(f, stream_bytes)
    trailer = {
        "stream_bytes": stream_bytes,
        "sha256": digest,
        "disks": _disk_stats(disks),
        "completed_at": time.time(),
        "migration": {k: info.get(k) for k in ("total-time", "downtime")}
        | {"transferred": (info.get("ram") or {}).get("transferred")},
    }
    _write(fd, _trailer_bytes(trailer), tmp)
    try:
        os.fsync(fd)
    except OSError as e:
        raise UsageError(f"cannot write {tmp}: {e.strerror}") from None
    return os.fstat(fd).st_size


def _publish(tmp: Path, dest: Path) -> None:
    try:
        os.replace(tmp, dest)
    except OSError as e:
        raise UsageError(f"cannot save to {dest}: {e.strerror}") from None


def _resume(mon: Monitor, was_running: bool) -> None:
    from qlaunch.vm.qmp import QMPError

    if was_running:
        with contextlib.suppress(QMPError, QlaunchError):
            mon.execute("cont")


def _header(
    vm: VM,
    mon: Monitor,
    rec: state.Record,
    profile_json: dict[str, Any],
    argv: list[str],
) -> tuple[bool, dict[str, Any]]:
    status = mon.execute("query-status")
    runstate = str(status.get("status"))
    if runstate not in ("running", "paused"):
        raise StateError(
            f"VM {vm.name} is in run state {runstate!r}; save needs it running or paused"
        )
    machine = mon.execute("qom-get", {"path": "/machine", "property": "type"})
    return bool(status.get("running")), {
        "format": VERSION,
        "saved_at": time.time(),
        "name": vm.name,
        "uuid": rec.uuid,
        "restart_policy": rec.restart_policy,
        "running": bool(status.get("running")),
        "qemu": {
            "binary": argv[0],
            "version": mon.version,
            "machine": str(machine).removesuffix("-machine"),
        },
        "profile": profile_json,
        "hotplug": rec.hotplug,
        "argv": argv,
    }


def _migrate_out(
    mon: Monitor, fd: int, was_running: bool, progress: Progress | None = None
) -> dict[str, Any]:
    """Pause, stream the state into fd, return query-migrate's final answer. On failure the
    migration is cancelled and a guest that was running runs again."""
    from qlaunch.vm.qmp import QMPError

    if was_running:
        mon.execute("stop")
    try:
        # 7.2 throttles migration to 32 MiB/s by default: pointless into a local file.
        mon.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        mon.getfd(fd, FD_NAME)
        mon.execute("migrate", {"uri": f"fd:{FD_NAME}"})
        info = _wait_migration(mon, "save", _ram_progress(progress) if progress else None)
    except BaseException:
        with contextlib.suppress(QlaunchError):
            mon.execute("migrate_cancel")
        if was_running:
            with contextlib.suppress(QMPError, QlaunchError):
                mon.execute("cont")
        raise
    return info


def _ram_progress(progress: Progress) -> Callable[[dict[str, Any]], None]:
    """query-migrate's RAM counters as progress: RAM done is the guest's RAM less what is
    left to send (`transferred` counts bytes on the wire: zero pages cost almost none)."""

    def poll(info: dict[str, Any]) -> None:
        ram = info.get("ram") or {}
        total, remaining = ram.get("total"), ram.get("remaining")
        if isinstance(total, int) and isinstance(remaining, int) and total > 0:
            progress(max(total - remaining, 0), total)

    return poll


def _wait_migration(
    mon: Monitor, what: str, on_poll: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    deadline = time.monotonic() + MIGRATE_TIMEOUT
    delay = 0.01
    while True:
        info: dict[str, Any] = mon.execute("query-migrate")
        st = info.get("status")
        if on_poll is not None:
            on_poll(info)
        if st == "completed":
            return info
        if st in ("failed", "cancelled"):
            why = info.get("error-desc") or st
            raise QemuError(f"{what}: QEMU's migration {st}: {why}", hint="see the VM's qemu.log")
        if time.monotonic() > deadline:
            raise QemuError(f"{what}: the migration did not finish in {MIGRATE_TIMEOUT:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


# ---- restore -------------------------------------------------------------------------------


def restore(
    file: str | Path,
    name: str | None = None,
    *,
    note: Note | None = None,
    lock_timeout: float = 30.0,
    base: Path | None = None,
    progress: Progress | None = None,
) -> VM:
    """Start a VM from a save file: the same profile, command and hotplugged devices, with
    QEMU waiting for an incoming migration; feed it the file; resume the guest if it was
    running when saved. Returns the VM (name: the saved VM's unless given). progress: called
    while QEMU loads, with the bytes of the saved stream read so far and the stream's size."""
    from qlaunch.config import profile as profmod
    from qlaunch.vm.api import start_for_restore

    t0 = time.monotonic()
    sf = read_save(file)
    hdr = sf.header
    new_name = state.validate_name(name or str(hdr["name"]), new=True)
    _check_disks(sf)
    pj = hdr.get("profile")
    if not isinstance(pj, dict) or not isinstance(pj.get("profile"), dict):
        raise UsageError(f"{sf.path} is not a complete qlaunch save file: it holds no profile")
    raw = _pin_macs(pj["profile"], str(hdr["name"]))
    prof = profmod.build(raw, name=pj["name"], source=f"{pj['source']} (saved in {sf.path})")
    hot_args = [a for dev in hdr.get("hotplug", []) for a in dev.get("args", [])]
    saved_argv = list(hdr.get("argv") or [])
    runas = None
    if "-runas" in saved_argv[:-1]:
        runas = saved_argv[saved_argv.index("-runas") + 1]
    # The same plan as a start, entry "restore": -incoming defer and the hotplugged devices.
    vm = start_for_restore(
        prof,
        new_name,
        hotplug=hot_args,
        restart=str(hdr.get("restart_policy") or "no"),
        cmd=pj.get("command") or None,
        paused=True,
        note=note,
        lock_timeout=lock_timeout,
        base=base,
        runas=runas,
    )
    try:
        with state.locked(vm.name, "restore", lock_timeout, vm.base):
            with vm.monitor(purpose="restore") as mon:
                _check_version(mon, hdr)
                fd = os.open(sf.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.lseek(fd, sf.stream_offset, os.SEEK_SET)
                    mon.getfd(fd, FD_NAME)
                    mon.execute("migrate-incoming", {"uri": f"fd:{FD_NAME}"})
                    # QEMU's copy shares this descriptor's file offset: how far it has read.
                    _wait_migration(mon, "restore", _read_progress(fd, sf, progress))
                finally:
                    os.close(fd)
                if hdr.get("running"):
                    mon.execute("cont")
            _settle_restored(vm, hdr, sf)
    except BaseException:
        with contextlib.suppress(QlaunchError):
            vm.remove(force=True)
        raise
    if note:
        note(f"{vm.name}: restored from {sf.path} in {time.monotonic() - t0:.2f} s")
    return vm


def _read_progress(
    fd: int, sf: SaveFile, progress: Progress | None
) -> Callable[[dict[str, Any]], None] | None:
    """The incoming side's query-migrate counts no RAM in 7.2: the offset QEMU has read up to
    in the save file says how far it is."""
    if progress is None:
        return None

    def poll(_info: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            done = os.lseek(fd, 0, os.SEEK_CUR) - sf.stream_offset
            progress(min(max(done, 0), sf.stream_bytes), sf.stream_bytes)

    return poll


def _check_disks(sf: SaveFile) -> None:
    for d in sf.trailer.get("disks", []):
        path = d["path"]
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise StateError(
                f"disk {path} of the saved VM is gone; the guest cannot go on without it"
            ) from None
        if st.st_size != d["size"] or st.st_mtime_ns != d["mtime_ns"]:
            raise StateError(
                f"disk {path} has changed since the save ({sf.path}); the saved guest would "
                "see data under its feet and corrupt it",
                hint="restore needs the disks exactly as they were at the save",
            )


def _check_version(mon: Monitor, hdr: dict[str, Any]) -> None:
    saved = str((hdr.get("qemu") or {}).get("version") or "")
    have = mon.version or ""
    if saved.split(".")[:2] != have.split(".")[:2]:
        raise QemuError(
            f"the save was made by QEMU {saved}; this is QEMU {have}",
            hint="restore with the QEMU that saved it: machine types change between versions",
        )


def _pin_macs(raw: dict[str, Any], old_name: str) -> dict[str, Any]:
    """NICs keep the MACs they had: by default a MAC derives from the VM's name, and a
    restore under another name must not change the guest's hardware."""
    from qlaunch.names import stable_mac

    raw = json.loads(json.dumps(raw))
    nets = raw.get("net")
    if isinstance(nets, dict):
        nets = raw["net"] = [nets]
    i = 0
    for n in nets or []:
        if n.get("mode", "user") == "none":
            continue
        n.setdefault("mac", stable_mac(old_name, i))
        i += 1
    return raw


def _settle_restored(vm: VM, hdr: dict[str, Any], sf: SaveFile) -> None:
    """The restored VM is an ordinary one from here on: a restart boots afresh (no
    -incoming), it starts unpaused, and it knows its hotplugged devices."""
    argv = json.loads((vm.dir / "argv.json").read_text())
    for i in range(len(argv) - 1):
        if tuple(argv[i : i + 2]) == INCOMING:
            del argv[i : i + 2]
            break
    state.write_json(vm.dir / "argv.json", argv)
    running = bool(hdr.get("running"))

    def ch(r: state.Record) -> None:
        r.start_paused = False
        r.hotplug = list(hdr.get("hotplug", []))
        r.restored_from = {"file": str(sf.path), "saved_at": hdr.get("saved_at")}
        if r.qemu is not None:
            r.state = state.RUNNING if running else state.PAUSED
            r.runstate = "running" if running else "paused"

    state.update(vm.dir, ch)
    state.log(vm.dir, f"restore: state loaded from {sf.path} (saved from VM {hdr.get('name')})")
