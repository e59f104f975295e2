"""The Python API over background VMs; the CLI's start, list, status, stop... are built on it.

    from qlaunch.vm.api import VM, list_vms

    with VM.start("default", name="web") as vm:        # returns once QEMU runs and answered QMP
        vm.console.expect(r"shell on the console")      # reads console.log from where it was
        vm.console.sendline("uname -r")
        vm.console.expect(r"\\d+\\.\\d+\\.\\d+")
        vm.qmp("query-status")                          # {'status': 'running', ...}
        vm.pause(); vm.resume()
    # leaving the block stops the VM (quit, then signals) and removes its state

    vm = VM.get("web")            # a VM an earlier process started
    vm.info()                     # name, state, pid, uptime, cpu, rss, restarts (no QMP)
    vm.status()                   # the same plus query-status, QEMU version, sockets, exits
    vm.stop(timeout=60)           # the ladder: ACPI, quit, SIGTERM, SIGKILL (see qlaunch.vm.stop)
    list_vms()

For work that needs several commands and events (migration, block jobs), hold one session:

    with vm.monitor() as mon:
        mon.execute("migrate", {"uri": "exec:cat > /tmp/x"})
        mon.wait_event("MIGRATION", 600, match=lambda e: e["data"]["status"] == "completed")

Every state change runs under the VM's lock (state.locked); QMP sessions hold qmp.lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlaunch import paths
from qlaunch.errors import QemuError, QlaunchError, StateError, UsageError
from qlaunch.vm import state
from qlaunch.vm.state import Live, Record

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from qlaunch.config.profile import Profile
    from qlaunch.vm.qmp import Monitor
    from qlaunch.vm.stop import StopReport

READY_TIMEOUT = 90.0  # the supervisor's own limit (60 s) plus room
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
Note = Callable[[str], None]


# ---- list rows -----------------------------------------------------------------------------


@dataclass(frozen=True)
class VMInfo:
    """One row of `list`: what the record and /proc say, without asking QEMU anything."""

    name: str
    state: str
    pid: int | None
    uptime: float | None  # seconds since the current QEMU process started
    cpu_percent: float | None  # average over the process's life
    rss: int | None  # bytes
    restarts: int
    profile: str
    restart_policy: str
    supervisor_pid: int | None
    note: str | None
    # The guest's addresses: from its agent (when one has answered) and from DHCP leases on
    # qlaunch networks; None when neither knows.
    addresses: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def info_of(live: state.Live) -> VMInfo:
    rec = live.record
    q = live.qemu
    pid = uptime = cpu = rss = None
    if q is not None:
        now = time.time()
        pid = q.pid
        life = max(now - q.create_time, 1e-3)
        uptime = round(now - (rec.started_at or q.create_time), 1)
        cpu = round(100.0 * (q.utime + q.stime) / state.CLOCK_TICKS / life, 1)
        rss = q.rss_pages * PAGE_SIZE
    return VMInfo(
        name=rec.name,
        state=live.state,
        pid=pid,
        uptime=uptime,
        cpu_percent=cpu,
        rss=rss,
        restarts=rec.restart_count,
        profile=rec.profile,
        restart_policy=rec.restart_policy,
        supervisor_pid=live.supervisor.pid if live.supervisor else None,
        note=live.note,
    )


def list_vms(base: Path | None = None, addresses: bool = True) -> list[VMInfo]:
    """Every VM with a state directory, from records and /proc only (fast: no QMP). With
    addresses, the guest's addresses too: cached, and asked of a guest agent only where one
    has answered before (qlaunch.vm.agent.addresses), so VMs without one cost nothing."""
    r = base or state.root()
    out: list[VMInfo] = []
    asks: list[tuple[int, VM, Live]] = []
    for name in state.names(r):
        try:
            live = state.inspect(r / name)
            info = info_of(live)
            vm = VM(name, r)
            if addresses and live.qemu is not None:
                if (vm.dir / "agent.json").exists():
                    asks.append((len(out), vm, live))  # may ask its agent: in parallel below
                else:
                    info = replace(info, addresses=guest_addresses(vm, live))
            out.append(info)
        except StateError as e:
            out.append(
                VMInfo(name, state.ERROR, None, None, None, None, 0, "?", "?", None, e.message)
            )
    # Each agent that must be asked costs a round trip into its guest: all at once, so that
    # 20 VMs with agents take about as long as one.
    found: dict[int, list[dict[str, Any]] | None] = {}

    def ask(i: int, vm: VM, live: Live) -> None:
        with contextlib.suppress(QlaunchError, OSError):
            found[i] = guest_addresses(vm, live)

    threads = [threading.Thread(target=ask, args=a, daemon=True) for a in asks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5.0)
    for i, _, _ in asks:
        out[i] = replace(out[i], addresses=found.get(i))
    return out


# ---- the console ---------------------------------------------------------------------------


class ConsoleTimeout(QemuError):
    """A console pattern did not appear in time; the message carries the last lines."""


def _compile(pattern: str | bytes | re.Pattern[bytes]) -> re.Pattern[bytes]:
    if isinstance(pattern, re.Pattern):
        return pattern
    return re.compile(pattern.encode() if isinstance(pattern, str) else pattern)


def _tail(data: bytes, n: int = 10) -> str:
    lines = data.decode(errors="replace").replace("\r", "").splitlines()
    return "\n".join(lines[-n:])


class Console:
    """The VM's serial console: output read from console.log (everything since the VM's
    start, also what came before anyone looked), input written to console.sock.

    expect() is a cursor over the log, like pexpect: each match moves the cursor past it.
    Patterns are regular expressions over bytes (a str is encoded as UTF-8).
    Writing connects to console.sock on first use and keeps the connection (holding
    console.lock, so `qlaunch console` says who has it) until close().
    """

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.log_path = vm.dir / "console.log"
        self.pos = 0  # file offset of the cursor
        self._buf = b""  # the log from pos to what was read so far
        self._sock: socket.socket | None = None
        self._lock: state.FileLock | None = None
        self._reader: threading.Thread | None = None

    def _read_more(self) -> None:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.pos + len(self._buf))
                self._buf += f.read()
        except FileNotFoundError:
            pass

    def text(self) -> str:
        """All of the console log so far."""
        try:
            return self.log_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def expect(
        self, pattern: str | bytes | re.Pattern[bytes], timeout: float = 60.0
    ) -> re.Match[bytes]:
        """Wait for pattern after the cursor; returns the match and moves the cursor past it.
        ConsoleTimeout after timeout seconds; StateError if the VM ends first."""
        rx = _compile(pattern)
        deadline = time.monotonic() + timeout
        next_check = time.monotonic() + 0.5
        while True:
            self._read_more()
            m = rx.search(self._buf)
            if m:
                self.pos += m.end()
                self._buf = self._buf[m.end() :]
                return m
            now = time.monotonic()
            if now >= deadline:
                raise ConsoleTimeout(
                    f"VM {self.vm.name}: {rx.pattern!r} not seen on the console within "
                    f"{timeout:g} s; last lines:\n{_tail(self._buf)}"
                )
            if now >= next_check:
                next_check = now + 0.5
                if not self.vm.live().alive:
                    self._read_more()
                    if rx.search(self._buf):
                        continue
                    raise StateError(
                        f"VM {self.vm.name} ended before {rx.pattern!r} appeared on its "
                        f"console; last lines:\n{_tail(self._buf)}"
                    )
            time.sleep(0.05)

    def send(self, data: str | bytes) -> None:
        """Type into the console."""
        if self._sock is None:
            self._connect()
        assert self._sock is not None
        self._sock.sendall(data.encode() if isinstance(data, str) else data)

    def sendline(self, line: str = "") -> None:
        self.send(line + "\n")

    def _connect(self, timeout: float = 5.0) -> None:
        lock = state.FileLock(
            self.vm.dir / "console.lock", f"the console of VM {self.vm.name}", "console", timeout
        )
        lock.acquire()
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.vm.dir / "console.sock"))
            except OSError as e:
                s.close()
                raise StateError(
                    f"VM {self.vm.name}: cannot connect to its console: {e.strerror}"
                ) from None
        except BaseException:
            lock.release()
            raise
        self._sock, self._lock = s, lock
        # What QEMU sends us is in console.log too; it is read only so QEMU never blocks.
        self._reader = threading.Thread(target=self._drain, args=(s,), daemon=True)
        self._reader.start()

    @staticmethod
    def _drain(s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while s.recv(65536):
                pass

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        if self._reader is not None:
            self._reader.join(timeout=2)
            self._reader = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


# ---- the VM --------------------------------------------------------------------------------


class VM:
    """A VM qlaunch started, by name. Cheap to make: nothing is read until asked."""

    def __init__(self, name: str, base: Path | None = None) -> None:
        self.name = state.validate_name(name)
        self.base = base or state.root()
        self.dir = self.base / name
        self._console: Console | None = None

    def __repr__(self) -> str:
        return f"VM({self.name!r})"

    # -- finding and starting

    @classmethod
    def get(cls, name: str, base: Path | None = None) -> VM:
        """The VM named name; StateError if there is none."""
        vm = cls(name, base)
        state.read_record(vm.dir)
        return vm

    @classmethod
    def start(
        cls,
        profile: str | Profile,
        name: str | None = None,
        *,
        sets: Sequence[str] = (),
        restart: str = "no",
        cmd: Sequence[str] | None = None,
        paused: bool = False,
        fds: Sequence[int] = (),
        cleanup: Sequence[Mapping[str, Any]] = (),
        note: Note | None = None,
        lock_timeout: float = 30.0,
        base: Path | None = None,
        runas: str | None = None,
        netns: str | None = None,
    ) -> VM:
        """Start a VM in the background; returns once QEMU runs and has answered QMP.

        profile: a profile name or path (with sets as --set), or a loaded Profile.
        name: 1 to 64 of [A-Za-z0-9_-]; default: the profile's name and a random suffix.
        restart: "no", "on-failure" or "always" (see qlaunch.vm.supervisor).
        cmd: a command for the qlaunch guest init to run (then it powers off).
        paused: leave the guest paused (QMP `cont` or vm.resume() starts it).
        fds: open file descriptors (3 or more) QEMU gets at the same numbers, e.g. taps its
          argv names as fd=N; the supervisor keeps them for restarts (the private monitor
          takes the lowest number from 3 up that is not among them).
        cleanup: hooks run once when the VM ends for good: {"call": "pkg.mod:function",
          "args": [...], "what": "..."} (see state.run_cleanup).
        note: called with one-line remarks (why TCG was picked...).
        runas: QEMU drops root for this user once its files are open (-runas; needs root).
        netns: a network namespace (/run/netns/NAME) that the supervisor and QEMU run in, with
          the taps and networks of the profile's NICs; default $QLAUNCH_NETNS. Recorded, so
          later calls (and the cleanup when the VM ends) need not name it.
        A VM of the same name that has stopped is replaced; a live one is an error.
        """
        return _launch(
            profile,
            name,
            sets=sets,
            restart=restart,
            cmd=cmd,
            paused=paused,
            fds=fds,
            cleanup=cleanup,
            note=note,
            lock_timeout=lock_timeout,
            base=base,
            runas=runas,
            netns=netns,
        )

    # -- looking

    def record(self) -> Record:
        return state.read_record(self.dir)

    def live(self) -> Live:
        return state.inspect(self.dir)

    def info(self) -> VMInfo:
        return info_of(self.live())

    @property
    def state(self) -> str:
        return self.live().state

    @property
    def pid(self) -> int | None:
        q = self.live().qemu
        return q.pid if q else None

    def status(self, query: bool = True) -> dict[str, Any]:
        """info() plus the record's details; with query, QMP query-status and QEMU's version.
        A live QEMU whose QMP does not answer makes the state `error`."""
        from qlaunch.vm.qmp import QMPTimeout, QMPUnavailable

        live = self.live()
        rec = live.record
        out: dict[str, Any] = info_of(live).to_json()
        nics = _nics_status(rec)
        out.update(
            uuid=rec.uuid,
            dir=str(self.dir),
            runstate=rec.runstate,
            started_at=rec.started_at if live.qemu else None,
            supervisor={
                "pid": rec.supervisor.pid if rec.supervisor else None,
                "alive": live.supervisor is not None,
            },
            sockets={
                "qmp": str(self.dir / "qmp.sock"),
                "console": str(self.dir / "console.sock"),
                "agent": str(self.dir / "qga.sock") if (self.dir / "qga.sock").exists() else None,
            },
            logs={
                "console": str(self.dir / "console.log"),
                "qemu": str(self.dir / "qemu.log"),
                "lifecycle": str(self.dir / "vm.log"),
                "events": str(self.dir / "events.jsonl"),
            },
            exits=[dict(asdict(e), describe=e.describe()) for e in rec.exits[-5:]],
            failed_reason=rec.failed_reason,
            hotplug=rec.hotplug,
            netns=rec.netns,
            nics=nics,
            command_status=self.command_status(),
            qmp=None,
            qmp_error=None,
            qemu_version=None,
            agent=None,
        )
        if query and live.qemu is not None:
            try:
                with self.monitor(3.0, purpose="status", lock_timeout=3.0) as mon:
                    out["qmp"] = mon.execute("query-status", timeout=5.0)
                    out["qemu_version"] = mon.version
            except (QMPTimeout, QMPUnavailable) as e:
                out["state"], out["note"] = state.ERROR, f"QMP does not answer: {e.message}"
                out["qmp_error"] = e.message
            except StateError as e:  # qmp.lock held: busy, not dead
                out["qmp_error"] = e.message
        if query:
            from qlaunch.vm import agent

            out["addresses"] = guest_addresses(self, live, probe=True, nics=nics)
            out["agent"] = agent.answering(self.dir, live.qemu)
        return out

    def command_status(self) -> int | None:
        """For a VM started with a command: its exit status, once the guest has reported it
        (the last QLAUNCH_EXIT=N on the console); else None."""
        try:
            if not json.loads((self.dir / "profile.json").read_bytes()).get("command"):
                return None
            data = (self.dir / "console.log").read_bytes()
        except (OSError, ValueError):
            return None
        found = re.findall(rb"QLAUNCH_EXIT=(\d+)", data)
        return int(found[-1]) if found else None

    def events(self) -> list[dict[str, Any]]:
        """The QMP events the supervisor recorded, oldest first."""
        out: list[dict[str, Any]] = []
        for p in (self.dir / "events.jsonl.1", self.dir / "events.jsonl"):
            with contextlib.suppress(FileNotFoundError):
                for line in p.read_bytes().splitlines():
                    with contextlib.suppress(ValueError):
                        out.append(json.loads(line))
        return out

    # -- QMP

    def monitor(
        self, connect_timeout: float = 5.0, purpose: str = "qmp", lock_timeout: float = 10.0
    ) -> Monitor:
        """A connected QMP session (use it in a with block: it holds qmp.lock, waited for up
        to lock_timeout seconds; StateError naming the holder after that)."""
        from qlaunch.vm.qmp import Monitor

        live = self.live()
        if live.qemu is None:
            raise StateError(f"VM {self.name} is not running (state {live.state})")
        return Monitor(
            self.dir / "qmp.sock",
            lock=self.dir / "qmp.lock",
            what=f"VM {self.name}",
            purpose=purpose,
            lock_timeout=lock_timeout,
        ).connect(connect_timeout)

    def qmp(
        self,
        command: str,
        args: Mapping[str, object] | None = None,
        /,
        *,
        timeout: float | None = None,
        **kwargs: object,
    ) -> Any:
        """One QMP command in a session of its own; returns its `return` value.
        Arguments as a dict (names with '-') or as keywords."""
        merged = {**(args or {}), **kwargs}
        with self.monitor() as mon:
            if command == "quit":
                mon.quit() if timeout is None else mon.quit(timeout)
                return {}
            return mon.execute(command, merged or None, timeout=timeout)

    def pause(self) -> None:
        self.qmp("stop")
        self._mark(state.PAUSED, "paused")

    def resume(self) -> None:
        self.qmp("cont")
        self._mark(state.RUNNING, "running")

    def _mark(self, st: str, runstate: str) -> None:
        # The supervisor learns it from the STOP/RESUME event too; this spares `list` the wait.
        def ch(r: state.Record) -> None:
            if r.qemu is not None:
                r.state, r.runstate = st, runstate

        state.update(self.dir, ch)

    # -- ending

    def stop(
        self,
        timeout: float = 60.0,
        force: bool = False,
        on_step: Note | None = None,
        lock_timeout: float = 30.0,
    ) -> StopReport:
        """The stop ladder (qlaunch.vm.stop). Stopping a stopped VM is not an error."""
        from qlaunch.vm import stop

        return stop.stop(
            self, timeout=timeout, force=force, on_step=on_step, lock_timeout=lock_timeout
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send QEMU a signal, after checking it is still our QEMU. The restart policy applies
        to what follows (use stop(force=True) to end the VM for good)."""
        live = self.live()
        rec = live.record
        if live.qemu is None or rec.qemu is None:
            raise StateError(f"VM {self.name} is not running (state {live.state})")
        if not state.signal_identified(rec.qemu, state.qemu_marker(rec.uuid), sig, "QEMU"):
            raise StateError(f"VM {self.name}: QEMU (pid {rec.qemu.pid}) is no longer running")
        state.log(self.dir, f"kill: sent {state.signal_name(sig)} to QEMU (pid {rec.qemu.pid})")

    def wait(self, timeout: float | None = None, poll: float = 0.1) -> Live:
        """Wait until the VM has ended (stopped or failed, supervisor done); returns the view.
        StateError on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            live = self.live()
            if not live.alive:
                return live
            if deadline is not None and time.monotonic() >= deadline:
                raise StateError(f"VM {self.name} is still {live.state} after {timeout:g} s")
            time.sleep(poll)

    def remove(
        self, force: bool = False, lock_timeout: float = 30.0, keep_data: bool = False
    ) -> None:
        """Remove a stopped VM's state directory and, unless keep_data, its persistent data
        (UEFI variables, TPM state); with force, stop it first (no ACPI)."""
        from qlaunch.vm import stop

        self.close()
        with state.locked(self.name, "rm", lock_timeout, self.base):
            try:
                live = state.inspect(self.dir)
            except StateError:
                if not self.dir.exists():
                    raise
                if not force:
                    raise
                shutil.rmtree(self.dir)  # no readable record: no process of ours to find
                return
            if not keep_data and (paths.vm_data_dir(self.name) / "definition.json").exists():
                # Its autostart unit would fail at the next boot without the definition.
                raise StateError(
                    f"VM {self.name} starts at boot (autostart), from its saved definition",
                    hint=f"qlaunch autostart disable {self.name} first, or rm --keep-data",
                )
            if live.alive:
                if not force:
                    raise StateError(
                        f"VM {self.name} is {live.state}",
                        hint=f"qlaunch stop {self.name} first, or qlaunch rm --force {self.name}",
                    )
                stop.stop_locked(self, timeout=0.0, force=True, on_step=None)
            state.settle(self.dir)
            shutil.rmtree(self.dir)
            data = paths.vm_data_dir(self.name)
            if not keep_data and data.is_dir():
                shutil.rmtree(data)
            state.log(self.base, f"removed VM {self.name}")

    # -- console

    @property
    def console(self) -> Console:
        if self._console is None:
            self._console = Console(self)
        return self._console

    def wait_console(
        self, pattern: str | bytes | re.Pattern[bytes], timeout: float = 60.0
    ) -> re.Match[bytes]:
        """Wait until pattern is anywhere in the console log (from the very start; the
        console cursor does not move)."""
        c = Console(self)
        return c.expect(pattern, timeout)

    def close(self) -> None:
        """Let go of the console connection, if any."""
        if self._console is not None:
            self._console.close()

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop (quit, then signals; no ACPI wait) and remove the VM's state."""
        self.close()
        try:
            self.remove(force=True)
        except QlaunchError:
            if exc[0] is None:
                raise


def guest_addresses(
    vm: VM, live: Live, *, probe: bool = False, nics: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]] | None:
    """The guest's addresses: its agent's (see qlaunch.vm.agent.addresses; probe: also try
    an agent never seen), then the DHCP leases of its NICs on qlaunch networks that the agent
    did not report. None when neither knows any."""
    found = None
    # No agent.json: no agent has answered this VM, and `list` need not even import the client.
    if probe or (vm.dir / "agent.json").exists():
        from qlaunch.vm import agent

        found = agent.addresses(vm, live, probe=probe)
    rows = list(found or [])
    have = {a["address"] for a in rows}
    if live.qemu is not None and any(n.get("network") for n in live.record.nics):
        for n in nics if nics is not None else _nics_status(live.record):
            lease = n.get("lease")
            if lease and lease not in have:
                have.add(lease)
                rows.append(
                    {
                        "address": lease,
                        "prefix": None,
                        "family": "ipv6" if ":" in lease else "ipv4",
                        "interface": None,
                        "mac": n.get("mac"),
                        "source": "lease",
                    }
                )
    return rows if found is not None or rows else None


def _nics_status(rec: Record) -> list[dict[str, Any]]:
    """The NICs as started (mode, network, tap, MAC), each with the address dnsmasq leased
    it, if any."""
    nics = [dict(n) for n in rec.nics]
    if any(n.get("network") for n in nics):
        from qlaunch.net import attach

        leased = attach.leases_of(nics, rec.netns)
        for n in nics:
            n["lease"] = leased.get(n.get("mac", ""))
    return nics


def default_name(profile_name: str) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]", "-", profile_name)[:50] or "vm"
    return f"{base}-{os.urandom(3).hex()}"


def new_uuid() -> str:
    """A random (version 4) UUID; formatted here because importing uuid costs 10 ms."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def read_ready(fd: int, timeout: float) -> dict[str, Any] | None:
    """The supervisor's one JSON line; None on EOF without one (it died)."""
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise QemuError(f"the VM did not come up within {timeout:.0f} s")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
    line = buf.split(b"\n", 1)[0]
    if not line:
        return None
    try:
        msg = json.loads(line)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


def _check_restart(restart: str) -> None:
    if restart not in state.RESTART_POLICIES:
        raise UsageError(
            f"restart policy {restart!r} is not one of {', '.join(state.RESTART_POLICIES)}"
        )


# ---- starting ------------------------------------------------------------------------------


def _launch(
    profile: str | Profile,
    name: str | None,
    *,
    sets: Sequence[str],
    restart: str,
    cmd: Sequence[str] | None,
    paused: bool,
    fds: Sequence[int],
    cleanup: Sequence[Mapping[str, Any]],
    note: Note | None,
    lock_timeout: float,
    base: Path | None,
    runas: str | None = None,
    netns: str | None = None,
    entry: str = "start",
    hotplug: Sequence[str] = (),
    uuid: str | None = None,
    shared_disks: bool = False,
) -> VM:
    from qlaunch.config import profile as profmod
    from qlaunch.launch import argv as argvmod
    from qlaunch.launch import host

    _check_restart(restart)
    if runas is not None:
        from qlaunch.vm import resources

        resources.check_runas(runas)
    for fd in fds:
        if fd < 3:
            raise UsageError(f"fd {fd} cannot be passed to QEMU: 0, 1 and 2 are its own")
        try:
            os.fstat(fd)
        except OSError:
            raise UsageError(f"fd {fd} is not open") from None
    # Everything that can be refused is refused before anything is made.
    prof = profmod.load(profile, list(sets)) if isinstance(profile, str) else profile
    name = default_name(prof.name) if name is None else state.validate_name(name)
    facts = host.probe()
    _, accel_note = argvmod.choose_accel(prof, facts)
    r = base or state.root(create=True)
    d = r / name
    for sock in ("qmp.sock", "console.sock"):
        state.check_socket_path(d / sock)
    ns = _netns(netns)
    if accel_note and note:
        note(accel_note)
    # The supervisor's interpreter starts while we get the VM ready; it waits for our word.
    # Not when it must inherit fds (taps) that do not exist yet.
    early = None
    if not fds and not _needs_taps(prof):
        with _in_netns(ns):
            early = SupervisorHandle(d, ())
    try:
        with state.locked(name, "start", lock_timeout, r):
            _clear_previous(d)
            # 0700, and every file in it is written 0600: the VM's state is its owner's alone.
            d.mkdir(mode=0o700)
            try:
                _build_and_run(
                    d,
                    prof,
                    facts,
                    _StartArgs(
                        entry,
                        restart,
                        cmd,
                        paused,
                        fds,
                        cleanup,
                        runas,
                        hotplug,
                        uuid,
                        shared_disks,
                    ),
                    note,
                    early,
                    ns,
                )
            except QemuError:
                # QEMU's own words stay where the error says they are, until `qlaunch rm`.
                _undo_start(d, keep_logs=True)
                raise
            except BaseException:
                _undo_start(d)
                raise
    finally:
        if early is not None:
            early.abort()
    return VM(name, r)


def plan_start(
    prof: Profile,
    facts: Any,
    name: str | None,
    cmd: Sequence[str] | None = None,
    *,
    runas: str | None = None,
    entry: str = "start",
) -> Any:
    """What `start` would run (qlaunch.launch.plan.LaunchPlan), refused as `start` refuses it,
    with placeholders for what only a start makes (`qlaunch cmdline --for start`)."""
    import tempfile

    from qlaunch.launch import disks, resolve
    from qlaunch.launch import plan as planmod
    from qlaunch.vm import resources

    if runas is not None:
        resources.check_runas(runas)
    name = default_name(prof.name) if name is None else state.validate_name(name)
    for sock in ("qmp.sock", "console.sock"):
        state.check_socket_path(state.root() / name / sock)
    with tempfile.TemporaryDirectory(prefix="qlaunch-cmdline-") as tmp:
        files = resolve.boot_files(prof, list(cmd) if cmd else None, Path(tmp))
        disk_paths = disks.prepare_disks(prof, Path(tmp), make=False) if prof.disks else ()
        rt = planmod.wire(
            entry,
            name,
            kernel=_abs(files.kernel),
            initrd=_abs(files.initrd),
            dtb=_abs(files.dtb),
            statedir=tmp,
            disk_paths=disk_paths,
            runas=runas,
        )
        launch = planmod.build(prof, facts, entry, rt)
    return planmod.relocate(launch, tmp, f"{planmod.STATE}/{name}")


def start_for_restore(
    profile: Profile,
    name: str,
    *,
    hotplug: Sequence[str],
    restart: str,
    cmd: Sequence[str] | None,
    paused: bool,
    note: Note | None,
    lock_timeout: float,
    base: Path | None,
    runas: str | None,
    uuid: str | None = None,
    shared_disks: bool = False,
) -> VM:
    """A start whose QEMU waits for an incoming migration (qlaunch.vm.migrate.restore).
    uuid: the VM's own, when it moves here from another host (qlaunch.vm.livemigrate);
    shared_disks: its disks are in use by the QEMU it moves from (no lock check)."""
    return _launch(
        profile,
        name,
        sets=(),
        restart=restart,
        cmd=cmd,
        paused=paused,
        fds=(),
        cleanup=(),
        note=note,
        lock_timeout=lock_timeout,
        base=base,
        runas=runas,
        entry="restore",
        hotplug=hotplug,
        uuid=uuid,
        shared_disks=shared_disks,
    )


def _needs_taps(prof: Profile) -> bool:
    return any(n.mode in ("network", "bridge") for n in prof.nets)


def _netns(name: str | None) -> str | None:
    """The namespace to start in: name, else $QLAUNCH_NETNS; checked to exist. The netns
    module (ctypes) is imported only when a namespace is asked for."""
    if name is None and not os.environ.get("QLAUNCH_NETNS"):
        return None
    from qlaunch.net import netns

    return netns.require(netns.from_env(name))


def _in_netns(ns: str | None) -> contextlib.AbstractContextManager[None]:
    """Processes spawned in the body live in namespace ns (None: ours)."""
    if ns is None:
        return contextlib.nullcontext()
    from qlaunch.net import netns

    return netns.entered(ns)


def _clear_previous(d: Path) -> None:
    """Make room for a start: nothing there, leftovers without a record, or a VM that has
    ended (settled and removed). A live VM of that name is an error."""
    if not d.exists():
        return
    if not (d / "state.json").exists():
        shutil.rmtree(d)  # no record: nothing of ours can be running from here
        return
    live = state.inspect(d)
    if live.alive:
        pid = f" (pid {live.qemu.pid})" if live.qemu else ""
        raise StateError(
            f"VM {d.name} is already {live.state}{pid}",
            hint=f"qlaunch stop {d.name} first, or choose another --name",
        )
    state.settle(d)
    shutil.rmtree(d)


@dataclass(frozen=True)
class _StartArgs:
    entry: str  # start or restore
    restart: str
    cmd: Sequence[str] | None
    paused: bool
    fds: Sequence[int]
    cleanup: Sequence[Mapping[str, Any]]
    runas: str | None
    hotplug: Sequence[str]
    uuid: str | None = None  # kept by a VM that moves between hosts; else a new one
    shared_disks: bool = False  # its disks are held by the QEMU it migrates from


def _build_and_run(
    d: Path,
    prof: Profile,
    facts: Any,
    a: _StartArgs,
    note: Note | None,
    early: SupervisorHandle | None = None,
    ns: str | None = None,
) -> None:
    """Make what the plan needs, write the plan and the record, and let the supervisor start
    QEMU. Whatever was made (taps, leases, cgroups) is undone if a later step fails."""
    from qlaunch.launch import disks, extras, resolve
    from qlaunch.vm import resources

    name = d.name
    files = resolve.boot_files(prof, list(a.cmd) if a.cmd else None, d)
    disk_paths = (
        disks.prepare_disks(prof, d, note=note, check_locks=not a.shared_disks)
        if prof.disks
        else ()
    )
    hooks = [dict(h) for h in a.cleanup]
    with contextlib.ExitStack() as fds_open, contextlib.ExitStack() as undo:
        nics = _prepare_nics(prof, name, ns, hooks, undo, fds_open)
        res = resources.prepare(name, prof)
        if res is not None:
            undo.callback(res.rollback)
            hooks.append(res.hook)
        all_fds = [*a.fds, *(nics.fds if nics else [])]
        mon_fd = next(n for n in range(3, 1 << 16) if n not in all_fds)
        uuid = a.uuid or new_uuid()
        rt = _wire(d, a, files, disk_paths, nics, res, uuid=uuid, monitor_fd=mon_fd)
        _write_plan(d, prof, facts, a, rt)
        extras.make_files(prof, facts, rt)
        rec = state.Record(
            name=name,
            uuid=uuid,
            profile=prof.name,
            state=state.STARTING,
            created_at=time.time(),
            restart_policy=a.restart,
            start_paused=a.paused,
            fds=all_fds,
            monitor_fd=mon_fd,
            cleanup=hooks,
            netns=ns,
            nics=nics.record if nics else [],
            resources=res.record if res is not None else None,
        )
        state.write_record(d, rec)
        state.log(d, f"{a.entry}: profile {prof.name}, restart policy {a.restart}")
        if early is not None and not all_fds:
            sup = early
        else:
            # QEMU must run where its taps are: the supervisor (its parent) starts there.
            with _in_netns(ns):
                sup = SupervisorHandle(d, all_fds)
        log.debug("%s: supervisor pid %d told to go", name, sup.proc.pid)
        sup.go_and_wait()
        log.debug("%s: QEMU runs and answered QMP", name)
        undo.pop_all()


def _prepare_nics(
    prof: Profile,
    name: str,
    ns: str | None,
    hooks: list[dict[str, Any]],
    undo: contextlib.ExitStack,
    fds_open: contextlib.ExitStack,
) -> Any:
    """Taps (and leases) for the profile's NICs, or None without NICs."""
    if not prof.nets:
        return None
    from qlaunch.net import attach

    nics = attach.prepare_nics(prof, name, ns)
    fds_open.callback(nics.close_fds)  # once the supervisor runs, it holds its own copies
    undo.callback(nics.rollback)
    if any(n.get("network") for n in nics.record):
        hooks.append(
            {
                "call": "qlaunch.net.attach:release_nics",
                "args": [name, ns],
                "what": "release the VM's NICs",
            }
        )
    return nics


def _wire(
    d: Path,
    a: _StartArgs,
    files: Any,
    disk_paths: tuple[str, ...],
    nics: Any,
    res: Any,
    *,
    uuid: str,
    monitor_fd: int,
) -> Any:
    from qlaunch.launch import plan as planmod

    return planmod.wire(
        a.entry,
        d.name,
        kernel=_abs(files.kernel),
        initrd=_abs(files.initrd),
        dtb=_abs(files.dtb),
        statedir=str(d),
        data=str(paths.vm_data_dir(d.name)),
        uuid=uuid,
        disk_paths=disk_paths,
        taps=nics.taps if nics else (),
        nic_append=nics.append if nics else (),
        mem_path=res.mem_path if res else None,
        runas=a.runas,
        monitor_fd=monitor_fd,
        hotplug=tuple(a.hotplug),
    )


def _write_plan(d: Path, prof: Profile, facts: Any, a: _StartArgs, rt: Any) -> None:
    """argv.json is what the supervisor runs; plan.json and profile.json say where it came
    from (save files carry them, `status` shows them)."""
    from qlaunch.launch import plan as planmod

    launch = planmod.build(prof, facts, a.entry, rt)
    log.debug("%s: %s plan under %s, fds %s", d.name, a.entry, launch.accel, launch.fds)
    state.write_json(d / "argv.json", list(launch.argv))
    state.write_json(d / "plan.json", launch.to_json())
    state.write_json(
        d / "profile.json",
        {
            "name": prof.name,
            "source": prof.source,
            "boot_files": {"kernel": rt.kernel, "initrd": rt.initrd, "dtb": rt.dtb},
            "accel": launch.accel,
            "command": list(a.cmd) if a.cmd else None,
            "profile": prof.raw,
            # Relative paths in the profile were taken from here (autostart starts there).
            "cwd": os.getcwd(),
        },
    )


def _abs(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


class SupervisorHandle:
    """A supervisor process, spawned and waiting for the word to go (`python -S -m
    qlaunch.vm.supervisor VMDIR READY_FD GO_FD`, see qlaunch.vm.supervisor.main). Spawning it
    early lets its interpreter start while `start` prepares the VM; closing the go pipe
    without a word (abort) makes it leave without touching anything."""

    def __init__(self, d: Path, fds: Sequence[int]) -> None:
        import subprocess

        from qlaunch.spawn import spawn

        self.d = d
        self.ready_r, ready_w = os.pipe()
        go_r, self.go_w = os.pipe()
        env = dict(os.environ)
        # -S (no site) keeps the supervisor small; it needs only the standard library and us.
        pkg_root = str(Path(state.__file__).resolve().parents[2])  # qlaunch/vm/state.py
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
        argv = [sys.executable, "-S", "-m", "qlaunch.vm.supervisor"]
        argv += [str(d), str(ready_w), str(go_r)]
        try:
            # stderr is ours until it has the word (an import error shows where start runs);
            # then it moves to supervisor.log, before it answers.
            self.proc = spawn(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=[ready_w, go_r, *fds],
                new_session=True,
                env=env,
            )
        except BaseException:
            os.close(self.ready_r)
            os.close(self.go_w)
            raise
        finally:
            os.close(ready_w)
            os.close(go_r)

    def go_and_wait(self) -> None:
        """Let it start QEMU; returns once QEMU runs and answered QMP, else QemuError."""
        os.write(self.go_w, b"go\n")
        self._close_go()
        self.proc.wait()  # the first process forks the real supervisor and leaves at once
        try:
            msg = read_ready(self.ready_r, READY_TIMEOUT)
        except QemuError as e:
            raise QemuError(e.message, hint=f"QEMU's log is {self.d / 'qemu.log'}") from None
        finally:
            self._close_ready()
        if msg is None:
            tail = _file_tail(self.d / "supervisor.log")
            raise QemuError(f"the supervisor of VM {self.d.name} died before QEMU was up: {tail}")
        if not msg.get("ok"):
            raise QemuError(
                f"VM {self.d.name}: {msg.get('error')}",
                hint=f"QEMU's log and argv are in {self.d} (qlaunch rm {self.d.name} removes "
                "them); `qlaunch cmdline PROFILE --for start` shows the argv",
            )

    def abort(self) -> None:
        """No go: it leaves (a no-op once it has gone ahead)."""
        self._close_go()
        self._close_ready()
        self.proc.wait()

    def _close_go(self) -> None:
        if self.go_w >= 0:
            os.close(self.go_w)
            self.go_w = -1

    def _close_ready(self) -> None:
        if self.ready_r >= 0:
            os.close(self.ready_r)
            self.ready_r = -1


def _file_tail(path: Path, n: int = 3) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " / ".join(lines[-n:]) or "(empty log)"


KEPT_AFTER_FAILURE = ("argv.json", "plan.json", "qemu.log", "supervisor.log", "console.log")


def _undo_start(d: Path, keep_logs: bool = False) -> None:
    """A start failed: nothing of it may stay (processes, hooks' resources, the directory).
    keep_logs: QEMU failed, and its log and argv stay for the user to read, beside a record
    that says `failed`, until `qlaunch rm` or the next start of that name."""
    try:
        rec = state.read_record(d)
    except StateError:
        rec = None
    if rec is not None:
        # A supervisor that reported failure is on its way out; one that did not (we were
        # interrupted, or gave up waiting) must not go on writing into a removed directory.
        sup = rec.supervisor
        if sup is not None and not state.wait_gone(sup.pid, sup.start_ticks, 2.0):
            state.signal_identified(sup, state.supervisor_marker(d), signal.SIGKILL)
            state.wait_gone(sup.pid, sup.start_ticks, 5.0)
        rec = state.read_record(d)
        if rec.qemu is not None and state.signal_identified(
            rec.qemu, state.qemu_marker(rec.uuid), signal.SIGKILL, "QEMU"
        ):
            state.wait_gone(rec.qemu.pid, rec.qemu.start_ticks, 5.0)
        state.run_cleanup(d, rec)
    if not (keep_logs and rec is not None and (d / "qemu.log").exists()):
        shutil.rmtree(d, ignore_errors=True)
        return
    for p in d.iterdir():
        if p.name not in (*KEPT_AFTER_FAILURE, "state.json", "vm.log"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def failed(r: Record) -> None:
        r.state = state.FAILED
        r.failed_reason = r.failed_reason or "QEMU did not start"
        r.cleanup = []  # run above, once

    state.update(d, failed)
