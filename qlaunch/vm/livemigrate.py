"""Live migration of a running VM to another host, over ssh, with nothing listening anywhere.

    from qlaunch.vm import livemigrate
    report = livemigrate.migrate("web", "ssh://root@host2", copy_storage=True)

The two ends:

- here (`migrate`, the source): checks what can be checked, then runs `qlaunch
  migrate-incoming` on the destination through the ssh master connection. That session is
  the control channel: one JSON object per line each way.
- there (`receive`, the destination): starts the VM through the same plan as `restore` (entry
  "restore": `-incoming defer`), under the VM's own name and uuid, with restart policy "no"
  until it has arrived; tells QEMU to take the stream on a unix socket in the VM's state
  directory (and, with copy_storage, exports the new disks over NBD on another one).

The stream and the NBD traffic go through ssh forwards of unix sockets over the master (`ssh
-O forward -L local.sock:remote.sock`), so no TCP port opens on either host.

    source                                       destination
    prepare {profile, uuid, disks...}   --->     checks; disks made (copy); QEMU -incoming
                                        <---     ready {migrate socket, nbd socket}
    forwards; blockdev-mirror to NBD (copy); migrate unix:...
    (copy: pre-switchover: mirrors completed in sync, then migrate-continue)
    completed: the guest is paused here
    commit                              --->     incoming completed; NBD stopped; cont
                                        <---     running
    quit QEMU here; the VM's record and data are gone from here

Failure before `commit` (a refusal there, QEMU's migration failing, the destination's QEMU
killed, Ctrl-C): the migration is cancelled, mirrors dropped, the guest resumed here if it was
running, and the control channel closed: the destination then removes what it made (the VM,
its data, the disks it created) before its end of the channel exits, and `migrate` waits for
that. If the destination fails at `commit`, the guest resumes here. If the channel breaks after
`commit` without an answer, nobody here can know whether the destination runs: the guest stays
paused here (two running copies of one guest on shared disks would corrupt them) and the
error says so.

Disks: without copy_storage every disk must be at the same path on the destination (shared
storage). With it, every writable disk is made anew there (same format and size, never over an
existing file) and mirrored; read-only disks (an ISO) must be there already. A VM's UEFI
variable store lives in its persistent data directory, which is the host's own: it is copied
along and mirrored in either case. Disks with `snapshot = true` cannot move (their overlay is
QEMU's alone), nor can a VM that autostarts here (disable autostart first).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from qlaunch import paths
from qlaunch.errors import HostError, QemuError, QlaunchError, StateError, UsageError
from qlaunch.vm import state

if TYPE_CHECKING:
    from qlaunch.remote.transport import Connection
    from qlaunch.vm.api import VM
    from qlaunch.vm.qmp import Monitor

log = logging.getLogger(__name__)

PROTOCOL = 1
PREPARE_TIMEOUT = 180.0  # the destination builds its initramfs and starts QEMU (TCG: slow)
COMMIT_TIMEOUT = 120.0
MIGRATE_TIMEOUT = 3600.0
POLL = 0.02
MIGRATE_SOCK = "migrate.sock"
NBD_SOCK = "nbd.sock"
VARS_FILE = "efivars.fd"
INCOMING = ("-incoming", "defer")
JOB = "qlmig-"  # block job and NBD client node names on the source

Note = Callable[[str], None]
# Progress: (what is being done, bytes done, bytes in all, expected downtime in ms or None).
Progress = Callable[[str, int, int, int | None], None]


@dataclass
class MigrateReport:
    name: str
    destination: str
    copy_storage: bool
    seconds: float  # the whole migration: connect, start there, copy, switch over
    downtime_ms: float  # the guest stopped: QEMU's stop-and-copy plus the switch to there
    qemu_downtime_ms: int | None  # QEMU's own figure (its last pass, until the stream ends)
    ram_bytes: int  # RAM bytes sent (zero pages cost almost nothing)
    disk_bytes: int  # disk bytes mirrored
    disks: list[str]  # the disks that moved (copy_storage) or stayed shared

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Drive:
    """A block device of the VM as QEMU names it (disk0, pflash1) and the file behind it."""

    device: str
    path: str
    format: str
    size: int  # virtual size, bytes
    readonly: bool
    vars: bool = False  # the UEFI variable store (in the VM's persistent data directory)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- the source ----------------------------------------------------------------------------


def migrate(
    name: str,
    uri: str,
    *,
    copy_storage: bool = False,
    max_downtime_ms: int | None = None,
    bandwidth_mib: int | None = None,
    note: Note | None = None,
    progress: Progress | None = None,
    lock_timeout: float = 30.0,
    base: Path | None = None,
) -> MigrateReport:
    """Move the running (or paused) VM `name` to the host at uri (ssh://...). Returns once it
    runs there and is gone from here; on failure it runs on here as before (see the module).
    progress: called while disks are mirrored and RAM is sent."""
    from qlaunch.remote import transport
    from qlaunch.remote import uri as urimod
    from qlaunch.vm.api import VM

    if max_downtime_ms is not None and max_downtime_ms <= 0:
        raise UsageError("--max-downtime must be more than 0 ms")
    if bandwidth_mib is not None and bandwidth_mib <= 0:
        raise UsageError("--bandwidth must be more than 0 MiB/s")
    target = urimod.parse(uri, "migrate: URI")
    t0 = time.monotonic()
    vm = VM.get(name, base)
    conn = transport.Connection(target, base)
    with state.locked(vm.name, "migrate", lock_timeout, vm.base):
        live = state.inspect(vm.dir)
        if live.qemu is None:
            raise StateError(f"VM {vm.name} is not running (state {live.state})")
        if (paths.vm_data_dir(vm.name) / "definition.json").exists():
            raise StateError(
                f"VM {vm.name} starts at boot here (autostart)",
                hint=f"qlaunch autostart disable {vm.name} first; enable it there afterwards",
            )
        conn.ensure()
        src = _Source(vm, live.record, conn, copy_storage, note, progress)
        report = src.run(max_downtime_ms, bandwidth_mib, t0)
    # The VM lives there now: nothing of it stays here (its data moved with it).
    with contextlib.suppress(QlaunchError):
        vm.remove(force=True, lock_timeout=lock_timeout)
    return report


class _Source:
    def __init__(
        self,
        vm: VM,
        rec: state.Record,
        conn: Connection,
        copy_storage: bool,
        note: Note | None,
        progress: Progress | None,
    ) -> None:
        self.vm = vm
        self.rec = rec
        self.conn = conn
        self.copy = copy_storage
        self.note = note
        self.progress = progress
        self.where = conn.target.where
        self.forwards: list[tuple[str, str]] = []
        self.nodes: list[str] = []  # NBD client nodes added here
        self.jobs: list[str] = []
        self.was_running = False
        self.committed = False

    def run(
        self, max_downtime_ms: int | None, bandwidth_mib: int | None, t0: float
    ) -> MigrateReport:
        vm = self.vm
        profile_json = json.loads((vm.dir / "profile.json").read_text())
        argv = json.loads((vm.dir / "argv.json").read_text())
        chan: _Channel | None = None
        tmp = tempfile.mkdtemp(prefix="mig-", dir=self.conn.control.parent)
        try:
            with vm.monitor(purpose="migrate") as mon:
                status = mon.execute("query-status")
                if status.get("status") not in ("running", "paused"):
                    raise StateError(
                        f"VM {vm.name} is in run state {status.get('status')!r}; migrate needs "
                        "it running or paused"
                    )
                self.was_running = bool(status.get("running"))
                assert self.rec.qemu is not None
                drives = _drives(mon, vm, self.rec.qemu.pid, profile_json)
                moved = [d for d in drives if d.vars or (self.copy and not d.readonly)]
                machine = str(mon.execute("qom-get", {"path": "/machine", "property": "type"}))
                header = self._header(profile_json, argv, drives, moved, mon.version, machine)
                chan = _Channel(self.conn)
                chan.send(header)
                ready = chan.receive(PREPARE_TIMEOUT, "prepare")
                _raise_if_error(ready)
                log.debug("%s: started there, waiting (%.2f s)", vm.name, time.monotonic() - t0)
                local_mig = os.path.join(tmp, MIGRATE_SOCK)
                self._forward(local_mig, str(ready["migrate_socket"]))
                if moved:
                    local_nbd = os.path.join(tmp, NBD_SOCK)
                    self._forward(local_nbd, str(ready["nbd_socket"]))
                    self._mirror(mon, moved, local_nbd, bandwidth_mib)
                    if self.note:
                        size = sum(d.size for d in moved) / 2**20
                        self.note(
                            f"{vm.name}: disks copied to {self.where} ({size:.0f} MiB), kept in "
                            "step from now on"
                        )
                info = self._migrate(mon, local_mig, max_downtime_ms, bandwidth_mib, moved)
                t_done = time.monotonic()
                # The guest is paused here; it must run there before it may end here.
                self.committed = True
                chan.send({"op": "commit"})
            log.debug("%s: stream complete (%.2f s)", vm.name, t_done - t0)
            try:
                answer = chan.receive_or_eof(COMMIT_TIMEOUT, "commit")
            except HostError:
                answer = None  # no word in time is no word: it may run there
            if answer is None:
                raise StateError(
                    f"lost contact with {self.where} after the switch-over: VM {vm.name} "
                    "may run there; it stays paused here so that only one copy runs",
                    hint=f"qlaunch --connect ssh://{self.where} status {vm.name}; if it "
                    f"runs there, qlaunch rm --force {vm.name} here, else qlaunch resume "
                    f"{vm.name}",
                )
            if answer.get("op") == "error":
                self.committed = False  # it has taken itself down: the guest goes on here
                _raise_if_error(answer)
            switch_ms = (time.monotonic() - t_done) * 1000
            log.debug("%s: runs there (switch-over %.0f ms)", vm.name, switch_ms)
            report = self._report(info, switch_ms, drives, moved, t0)
            self._stop_here()
            log.debug("%s: stopped here (%.2f s)", vm.name, time.monotonic() - t0)
            return report
        except BaseException as e:
            if not self.committed:
                self._undo()
            if chan is not None:
                chan.close()
            if isinstance(e, QlaunchError) and not self.committed:
                here = "runs on here as before" if self.was_running else "stays here, paused"
                raise QlaunchError(
                    f"migration of {vm.name} to {self.where} failed: {e.message}; {vm.name} {here}",
                    hint=e.hint,
                    exit_code=e.exit_code,
                ) from None
            raise
        finally:
            for local, remote in self.forwards:
                self.conn.cancel(local, remote)
            shutil.rmtree(tmp, ignore_errors=True)
            if chan is not None:
                chan.close()

    def _header(
        self,
        profile_json: dict[str, Any],
        argv: list[str],
        drives: list[Drive],
        moved: list[Drive],
        version: str | None,
        machine: str,
    ) -> dict[str, Any]:
        rec = self.rec
        runas = argv[argv.index("-runas") + 1] if "-runas" in argv[:-1] else None
        vars_data = None
        for d in drives:
            if d.vars:
                vars_data = base64.b64encode(Path(d.path).read_bytes()).decode()
        return {
            "op": "prepare",
            "protocol": PROTOCOL,
            "name": self.vm.name,
            "uuid": rec.uuid,
            "restart_policy": rec.restart_policy,
            "running": self.was_running,
            "profile": _portable_profile(profile_json, drives),
            "hotplug": rec.hotplug,
            "runas": runas,
            "netns": rec.netns,
            "qemu": {"version": version, "machine": machine},
            "copy_storage": self.copy,
            "drives": [d.to_json() for d in drives],
            "moved": [d.device for d in moved],
            "vars": vars_data,
        }

    def _forward(self, local: str, remote: str) -> None:
        self.conn.forward(local, remote)
        self.forwards.append((local, remote))

    def _mirror(
        self, mon: Monitor, moved: list[Drive], nbd: str, bandwidth_mib: int | None
    ) -> None:
        """Every moved drive mirrored into its NBD export there, until all are in step
        (`ready`); from then on, writes go to both (copy-mode write-blocking)."""
        for d in moved:
            node = JOB + d.device
            mon.execute(
                "blockdev-add",
                {
                    "driver": "nbd",
                    "node-name": node,
                    "server": {"type": "unix", "path": nbd},
                    "export": d.device,
                },
            )
            self.nodes.append(node)
            args: dict[str, Any] = {
                "job-id": node,
                "device": d.device,
                "target": node,
                "sync": "full",
                "copy-mode": "write-blocking",
                "auto-dismiss": False,
            }
            if bandwidth_mib:
                args["speed"] = bandwidth_mib << 20
            mon.execute("blockdev-mirror", args)
            self.jobs.append(node)
        deadline = time.monotonic() + MIGRATE_TIMEOUT
        while True:
            jobs = {j["device"]: j for j in mon.execute("query-block-jobs")}
            ours = [jobs.get(j) for j in self.jobs]
            for j, name in zip(ours, self.jobs, strict=True):
                if j is None or j.get("status") in ("concluded", "aborting", "null"):
                    why = (j or {}).get("error") or "it ended"
                    raise QemuError(f"mirroring {name.removeprefix(JOB)} failed: {why}")
            done = sum(int(j["offset"]) for j in ours if j)
            total = sum(int(j["len"]) for j in ours if j)
            if self.progress:
                self.progress("disks", done, total, None)
            if all(j and j.get("ready") for j in ours):
                return
            if time.monotonic() > deadline:
                raise QemuError(f"the disks were not mirrored within {MIGRATE_TIMEOUT:.0f} s")
            time.sleep(0.1)

    def _migrate(
        self,
        mon: Monitor,
        sock: str,
        max_downtime_ms: int | None,
        bandwidth_mib: int | None,
        moved: list[Drive],
    ) -> dict[str, Any]:
        caps = [{"capability": "pause-before-switchover", "state": bool(moved)}]
        mon.execute("migrate-set-capabilities", {"capabilities": caps})
        params: dict[str, Any] = {
            "max-bandwidth": (bandwidth_mib << 20) if bandwidth_mib else 1 << 40
        }
        if max_downtime_ms is not None:
            params["downtime-limit"] = max_downtime_ms
        mon.execute("migrate-set-parameters", params)
        mon.execute("migrate", {"uri": f"unix:{sock}"})
        switched = False
        deadline = time.monotonic() + MIGRATE_TIMEOUT
        while True:
            info: dict[str, Any] = mon.execute("query-migrate")
            st = info.get("status")
            ram = info.get("ram") or {}
            if self.progress and st in ("active", "pre-switchover", "device"):
                total = int(ram.get("total") or 0)
                done = max(total - int(ram.get("remaining") or 0), 0)
                self.progress("RAM", done, total, info.get("expected-downtime"))
            if st == "pre-switchover" and not switched:
                switched = True
                # The guest is paused: the mirrors catch up and complete in step with the RAM.
                self._complete_mirrors(mon)
                mon.execute("migrate-continue", {"state": "pre-switchover"})
            elif st == "completed":
                return info
            elif st in ("failed", "cancelled"):
                why = info.get("error-desc") or st
                raise QemuError(f"QEMU's migration {st}: {why}")
            if time.monotonic() > deadline:
                raise QemuError(f"the migration did not finish in {MIGRATE_TIMEOUT:.0f} s")
            time.sleep(POLL)

    def _complete_mirrors(self, mon: Monitor) -> None:
        """Cancelling a ready mirror finishes it with the target in step with the source and
        the guest still on its own disks here (the destination's copies take over there)."""
        for j in self.jobs:
            mon.execute("block-job-cancel", {"device": j})
        deadline = time.monotonic() + 60
        while True:
            jobs = {j["device"]: j for j in mon.execute("query-block-jobs")}
            left = [j for j in self.jobs if jobs.get(j, {}).get("status") != "concluded"]
            if not left:
                break
            if time.monotonic() > deadline:
                raise QemuError(f"the disk mirrors did not complete: {', '.join(left)}")
            time.sleep(POLL)
        for j in self.jobs:
            job = jobs[j]
            if job.get("error"):
                raise QemuError(f"mirroring {j.removeprefix(JOB)} failed: {job['error']}")
            mon.execute("job-dismiss", {"id": j})
        self.jobs = []

    def _report(
        self,
        info: dict[str, Any],
        switch_ms: float,
        drives: list[Drive],
        moved: list[Drive],
        t0: float,
    ) -> MigrateReport:
        qd = info.get("downtime")
        ram = info.get("ram") or {}
        return MigrateReport(
            name=self.vm.name,
            destination=self.conn.target.uri(),
            copy_storage=self.copy,
            seconds=round(time.monotonic() - t0, 3),
            downtime_ms=round((qd or 0) + switch_ms, 1),
            qemu_downtime_ms=qd,
            ram_bytes=int(ram.get("transferred") or 0),
            disk_bytes=sum(d.size for d in moved),
            disks=[d.path for d in drives if not d.vars],
        )

    def _undo(self) -> None:
        """Back to where it was: no migration, no mirror, no NBD client, the guest going."""
        from qlaunch.vm.qmp import QMPError

        try:
            with self.vm.monitor(purpose="migrate (undo)") as mon:
                with contextlib.suppress(QMPError):
                    mon.execute("migrate_cancel")
                for j in self.jobs:
                    with contextlib.suppress(QMPError):
                        mon.execute("block-job-cancel", {"device": j, "force": True})
                deadline = time.monotonic() + 30
                while self.jobs and time.monotonic() < deadline:
                    jobs = {j["device"]: j for j in mon.execute("query-block-jobs")}
                    if all(jobs.get(j, {}).get("status") in (None, "concluded") for j in self.jobs):
                        break
                    time.sleep(POLL)
                for j in self.jobs:
                    with contextlib.suppress(QMPError):
                        mon.execute("job-dismiss", {"id": j})
                for node in self.nodes:
                    with contextlib.suppress(QMPError):
                        mon.execute("blockdev-del", {"node-name": node})
                _wait_not_migrating(mon)
                if self.was_running:
                    st = mon.execute("query-status")
                    if not st.get("running"):
                        mon.execute("cont")
        except QlaunchError as e:
            state.log(self.vm.dir, f"migrate: could not undo everything: {e.message}")

    def _stop_here(self) -> None:
        from qlaunch.vm import stop

        stop.stop_locked(self.vm, timeout=0.0, force=True, on_step=None)
        state.log(self.vm.dir, f"migrate: moved to {self.conn.target.uri()}")


def _wait_not_migrating(mon: Monitor) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = mon.execute("query-migrate").get("status")
        if st not in ("setup", "active", "pre-switchover", "device", "cancelling"):
            return
        time.sleep(POLL)


def _drives(mon: Monitor, vm: VM, pid: int, profile_json: dict[str, Any]) -> list[Drive]:
    """The VM's disks (not the cloud-init seed, which the destination makes anew) and its
    UEFI variable store, as QEMU has them open."""
    raw = profile_json.get("profile") or {}
    disks = raw.get("disk") or []
    if isinstance(disks, dict):
        disks = [disks]
    for i, d in enumerate(disks):
        if d.get("snapshot"):
            raise StateError(
                f"disk {i} ({d.get('path')}) is a throwaway (snapshot = true): its overlay is "
                "QEMU's alone and cannot move",
                hint="live migration needs persistent disks",
            )
    data = paths.vm_data_dir(vm.name)
    out = []
    for b in mon.execute("query-block"):
        ins = b.get("inserted")
        if not ins:
            continue
        # A hotplugged disk is a -blockdev node (no drive name): mirrored and exported by its
        # node name, which its hotplug record gives it there too.
        dev = str(b.get("device") or "") or str(ins.get("node-name") or "")
        img = ins.get("image") or {}
        path = str(img.get("filename") or ins.get("file") or "")
        if not path or path.startswith(str(vm.dir) + "/"):
            continue  # made by the start (the seed ISO): the destination makes its own
        if not path.startswith("/"):
            path = os.path.join(os.readlink(f"/proc/{pid}/cwd"), path)
        is_vars = dev.startswith("pflash") and path.startswith(str(data) + "/")
        if not is_vars and not re.fullmatch(r"(disk|sd|hpdisk)\d+", dev):
            continue  # firmware code: the destination's own, from its firmware descriptors
        out.append(
            Drive(
                device=dev,
                path=path,
                format=str(ins.get("drv") or img.get("format") or "raw"),
                size=int(img.get("virtual-size") or 0),
                readonly=bool(ins.get("ro")),
                vars=is_vars,
            )
        )
    return out


def _portable_profile(profile_json: dict[str, Any], drives: list[Drive]) -> dict[str, Any]:
    """The profile as the destination must start it: disks at their absolute paths (relative
    ones were the source's), and never created there by `size` (a missing shared disk is an
    error, not an empty new one)."""
    pj: dict[str, Any] = json.loads(json.dumps(profile_json))
    raw = pj.get("profile") or {}
    disks = raw.get("disk")
    if isinstance(disks, dict):
        disks = raw["disk"] = [disks]
    by_dev = {d.device: d.path for d in drives}
    for i, d in enumerate(disks or []):
        path = by_dev.get(f"disk{i}") or by_dev.get(f"sd{i}")
        if path:
            d["path"] = path
        d.pop("size", None)
    return pj


def _raise_if_error(msg: dict[str, Any]) -> None:
    if msg.get("op") == "error":
        raise QlaunchError(
            str(msg.get("message")),
            hint=msg.get("hint"),
            exit_code=int(msg.get("exit_code") or 1),
        )


class _Channel:
    """The destination's `qlaunch migrate-incoming`: JSON lines on its stdin and stdout; its
    stderr is ours."""

    def __init__(self, conn: Connection) -> None:
        import threading

        self.where = conn.target.where
        self.proc = conn.spawn(
            ["migrate-incoming"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._buf = b""
        self.error_line: str | None = None  # an error qlaunch there printed instead of a reply
        self._pump = threading.Thread(target=self._stderr, daemon=True)
        self._pump.start()

    def _stderr(self) -> None:
        """What it says on stderr is ours to show, but for an error line (the remote shell's
        `no qlaunch there`, an early failure): that becomes the error here, said once."""
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith("qlaunch: error: "):
                self.error_line = line
            else:
                with contextlib.suppress(OSError, ValueError):
                    print(line, file=sys.stderr, flush=True)

    def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            raise HostError(f"the connection to {self.where} broke") from None

    def receive(self, timeout: float, step: str) -> dict[str, Any]:
        msg = self.receive_or_eof(timeout, step)
        if msg is None:
            code = self.proc.wait()
            self._pump.join(5)
            if self.error_line is not None:
                from qlaunch.remote.host import error_from

                raise error_from(code, self.error_line)
            raise HostError(
                f"{self.where} ended the migration at {step} (its qlaunch exited {code})",
                hint="an older qlaunch there? `qlaunch --connect URI --version`",
            )
        return msg

    def receive_or_eof(self, timeout: float, step: str) -> dict[str, Any] | None:
        """The next message; None if the destination closed the channel."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HostError(f"{self.where} did not answer {step} within {timeout:.0f} s")
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            raise HostError(f"{self.where} answered {step} with {line[:80]!r}") from None
        if not isinstance(msg, dict):
            raise HostError(f"{self.where} answered {step} with {line[:80]!r}")
        return msg

    def close(self, timeout: float = 60.0) -> None:
        """Close our end and wait for theirs (the destination's undo runs before it exits)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._pump.join(5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


# ---- the destination -----------------------------------------------------------------------


def receive(inp: IO[bytes], out: IO[bytes], lock_timeout: float = 30.0) -> int:
    """`qlaunch migrate-incoming`: the destination's end (see the module). Exit code 0 once
    the VM runs here; else what failed, with nothing of the VM left here."""
    dest = _Destination(out)
    try:
        msg = _read(inp)
        if msg is None:
            return 0  # the source gave up before it began
        if msg.get("op") != "prepare" or msg.get("protocol") != PROTOCOL:
            raise UsageError(
                "the source's qlaunch speaks another migration protocol",
                hint="use the same qlaunch version on both hosts",
            )
        dest.prepare(msg, lock_timeout)
        msg = _read(inp)
        if msg is None or msg.get("op") != "commit":
            raise StateError("the source called the migration off")
        dest.commit()
        return 0
    except BaseException as e:
        if isinstance(e, QlaunchError):
            dest.send(
                {"op": "error", "message": e.message, "hint": e.hint, "exit_code": e.exit_code}
            )
        dest.undo()
        if isinstance(e, QlaunchError):
            return e.exit_code
        if isinstance(e, KeyboardInterrupt):
            return 130
        raise


def _read(inp: IO[bytes]) -> dict[str, Any] | None:
    line = inp.readline()
    if not line:
        return None
    msg = json.loads(line)
    if not isinstance(msg, dict):
        raise UsageError("the migration's control channel carried something else")
    return msg


class _Destination:
    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.vm: VM | None = None
        self.made: list[str] = []  # disks made here
        self.data_made = False
        self.started: str | None = None  # a start was tried under this name
        self.mon: Monitor | None = None
        self.hdr: dict[str, Any] = {}

    def send(self, msg: dict[str, Any]) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.out.write(json.dumps(msg).encode() + b"\n")
            self.out.flush()

    def prepare(self, hdr: dict[str, Any], lock_timeout: float) -> None:
        from qlaunch.config import profile as profmod
        from qlaunch.storage import image
        from qlaunch.vm.api import start_for_restore

        self.hdr = hdr
        name = state.validate_name(str(hdr["name"]), new=True)
        if (state.root() / name / "state.json").exists():
            live = state.inspect(state.root() / name)
            raise StateError(
                f"a VM named {name} exists there already (state {live.state})",
                hint=f"qlaunch --connect URI rm {name} there, if it is no longer needed",
            )
        data = paths.vm_data_dir(name)
        if data.exists():
            raise StateError(
                f"{data} exists there (the data of an earlier VM {name}, kept by rm --keep-data)",
                hint="remove it there if it is no longer needed",
            )
        moved = set(hdr.get("moved") or [])
        for d in hdr.get("drives") or []:
            if d["vars"]:
                continue
            exists = os.path.exists(d["path"])
            if d["device"] in moved and exists:
                raise StateError(
                    f"{d['path']} exists there already: --copy-storage makes a new copy and never "
                    "writes over a file",
                    hint="remove it there, or migrate without --copy-storage if the disk is shared",
                )
            if d["device"] not in moved and not exists:
                raise StateError(
                    f"disk {d['path']} is not there: without --copy-storage the disks must be "
                    "shared (the same path on both hosts)",
                    hint="--copy-storage copies them",
                )
        for d in hdr.get("drives") or []:
            if d["device"] in moved and not d["vars"]:
                image.create(d["path"], d["size"], fmt=d["format"])
                self.made.append(d["path"])
        if hdr.get("vars"):
            data.mkdir(mode=0o700, parents=True)
            self.data_made = True
            (data / VARS_FILE).write_bytes(base64.b64decode(hdr["vars"]))
        if hdr.get("netns"):
            # The same namespace name there (start_for_restore takes it from here).
            os.environ["QLAUNCH_NETNS"] = str(hdr["netns"])
        pj = hdr["profile"]
        prof = profmod.build(pj["profile"], name=pj["name"], source=f"{pj['source']} (migrated)")
        hot_args = [a for dev in hdr.get("hotplug") or [] for a in dev.get("args", [])]
        # From here whatever has the VM's name here is ours: none was here before.
        self.started = name
        self.data_made = True
        self.vm = start_for_restore(
            prof,
            name,
            hotplug=hot_args,
            restart="no",  # until it has arrived: a QEMU killed mid-way is not restarted
            cmd=pj.get("command") or None,
            paused=True,
            note=None,
            lock_timeout=lock_timeout,
            base=None,
            runas=hdr.get("runas"),
            uuid=str(hdr["uuid"]),
            shared_disks=not hdr.get("copy_storage"),
        )
        vm = self.vm
        # Held until the switch-over, so that the commit needs no new connection (the guest
        # is paused meanwhile); `qlaunch status` there says who holds it.
        self.mon = mon = vm.monitor(purpose="migrate-incoming")
        want = hdr.get("qemu") or {}
        machine = str(mon.execute("qom-get", {"path": "/machine", "property": "type"}))
        if mon.version != want.get("version") or machine != want.get("machine"):
            raise QemuError(
                f"QEMU {mon.version} ({machine}) there, {want.get('version')} "
                f"({want.get('machine')}) on the source: a live migration needs the same",
                hint="install the same QEMU version on both hosts",
            )
        for sock in (MIGRATE_SOCK, NBD_SOCK):
            state.check_socket_path(vm.dir / sock)
        mon.execute("migrate-incoming", {"uri": f"unix:{vm.dir / MIGRATE_SOCK}"})
        if moved:
            mon.execute(
                "nbd-server-start",
                {"addr": {"type": "unix", "data": {"path": str(vm.dir / NBD_SOCK)}}},
            )
            nodes = {
                b["device"]: b["inserted"]["node-name"]
                for b in mon.execute("query-block")
                if b.get("inserted")
            }
            for b in mon.execute("query-named-block-nodes"):
                if re.fullmatch(r"hpdisk\d+", str(b.get("node-name", ""))):
                    nodes.setdefault(b["node-name"], b["node-name"])
            for dev in sorted(moved):
                if dev not in nodes:
                    raise StateError(f"the VM there has no drive {dev}: not the same machine")
                mon.execute(
                    "block-export-add",
                    {
                        "type": "nbd",
                        "id": JOB + dev,
                        "node-name": nodes[dev],
                        "name": dev,
                        "writable": True,
                    },
                )
        state.log(vm.dir, "migrate: waiting for the VM's state from its source")
        self.send(
            {
                "op": "ready",
                "migrate_socket": str(vm.dir / MIGRATE_SOCK),
                "nbd_socket": str(vm.dir / NBD_SOCK),
            }
        )

    def commit(self) -> None:
        """The source has sent everything: the guest goes on here."""
        vm = self.vm
        assert vm is not None
        hdr = self.hdr
        mon = self.mon
        assert mon is not None
        with mon:
            deadline = time.monotonic() + COMMIT_TIMEOUT
            while True:
                info = mon.execute("query-migrate")
                st = info.get("status")
                if st == "completed":
                    break
                if st in ("failed", "cancelled"):
                    raise QemuError(
                        f"QEMU's incoming migration {st}: {info.get('error-desc') or st}"
                    )
                if time.monotonic() > deadline:
                    raise QemuError(f"the incoming migration did not complete ({st})")
                time.sleep(POLL)
            if hdr.get("moved"):
                mon.execute("nbd-server-stop")
            if hdr.get("running"):
                mon.execute("cont")
        self.mon = None
        _settle(vm, hdr)
        self.vm = self.started = None  # it is the VM's own now: undo no longer applies
        self.send({"op": "running"})

    def undo(self) -> None:
        """Nothing of the VM stays: its state, its data, the disks made for it."""
        from qlaunch.vm.api import VM

        if self.mon is not None:
            self.mon.close()  # the stop below needs the monitor
            self.mon = None

        if self.started is not None and self.vm is None:
            # A start that failed keeps QEMU's log for the user; there is no user here.
            with contextlib.suppress(QlaunchError):
                VM(self.started).remove(force=True)
        if self.vm is not None:
            with contextlib.suppress(QlaunchError):
                self.vm.remove(force=True)
        if self.data_made and self.hdr.get("name"):
            shutil.rmtree(paths.vm_data_dir(str(self.hdr["name"])), ignore_errors=True)
        for p in self.made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        self.made = []


def _settle(vm: VM, hdr: dict[str, Any]) -> None:
    """An ordinary VM from here on: a restart boots afresh (no -incoming), with the restart
    policy it had, knowing its hotplugged devices."""
    argv = json.loads((vm.dir / "argv.json").read_text())
    for i in range(len(argv) - 1):
        if tuple(argv[i : i + 2]) == INCOMING:
            del argv[i : i + 2]
            break
    state.write_json(vm.dir / "argv.json", argv)
    running = bool(hdr.get("running"))

    def ch(r: state.Record) -> None:
        r.start_paused = False
        r.restart_policy = str(hdr.get("restart_policy") or "no")
        r.hotplug = list(hdr.get("hotplug") or [])
        if r.qemu is not None:
            r.state = state.RUNNING if running else state.PAUSED
            r.runstate = "running" if running else "paused"

    state.update(vm.dir, ch)
    state.log(
        vm.dir,
        f"migrate: arrived (uuid {hdr.get('uuid')}, restart policy {hdr.get('restart_policy')})",
    )
