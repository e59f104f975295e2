"""A synchronous client for the QEMU guest agent (qemu-ga) over a VM's qga.sock.

    from qlaunch.vm import agent
    with agent.connect(vm) as ga:               # AgentUnavailable when no agent answers
        ga.execute("guest-ping")                # {}
        ga.execute("guest-network-get-interfaces")
        ga.shutdown()                           # powerdown; the agent sends no reply

The socket is QEMU's end of the virtio port `org.qemu.guest_agent.0` (qlaunch.launch.argv).
What makes this protocol awkward, and how it is handled:

- The channel outlives clients. A client that left mid-command (timed out, killed) leaves its
  reply, or half a request, in the pipe. Every session therefore starts with a raw 0xFF byte
  (the agent's parser drops what it was reading) and `guest-sync-delimited` with a random id:
  the agent answers it with 0xFF before the JSON, and everything before our id is stale.
- QEMU serves one connection at a time, and reads the socket only while the guest has the
  port open. So a VM without an agent swallows nothing: the bytes we sent stay in our socket's
  send queue (SIOCOUTQ). That tells "no agent" within PORT_CHECK instead of a full timeout.
  One client at a time per VM: qga.lock, held while connected (as qmp.lock is for QMP).
- `guest-shutdown` has no reply on success (the agent may be gone before it could write one);
  it counts as sent unless an error comes back within SHUTDOWN_ERROR_WAIT.

Timeouts are per command: SHORT for queries, LONG for file system freezes and trims, MEDIUM
for everything else. `seen`/`note_seen` record that the agent of the VM's current QEMU has
answered (agent.json in the state directory), so that `list` asks only agents that exist.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import socket
import struct
import termios
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlaunch.errors import QlaunchError, StateError
from qlaunch.vm import state

if TYPE_CHECKING:
    from qlaunch.vm.api import VM

SHORT = 5.0  # guest-ping, guest-info, guest-network-get-interfaces and other queries
MEDIUM = 30.0
LONG = 120.0  # fsfreeze waits for every file system to flush
CONNECT = 5.0  # the sync that starts a session
PORT_CHECK = 0.3  # QEMU takes our bytes at once when the guest has the port open
SHUTDOWN_ERROR_WAIT = 1.0
LOCK_TIMEOUT = 10.0
DELIM = b"\xff"

_SHORT = frozenset(
    {
        "guest-ping",
        "guest-info",
        "guest-sync",
        "guest-sync-delimited",
        "guest-network-get-interfaces",
        "guest-get-time",
        "guest-get-osinfo",
        "guest-get-host-name",
        "guest-get-timezone",
        "guest-get-users",
        "guest-get-vcpus",
        "guest-fsfreeze-status",
        "guest-exec-status",
    }
)
_LONG = frozenset({"guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list", "guest-fstrim"})
# fsfreeze-thaw gets LONG too: a thaw that times out leaves the guest's disks frozen.
_LONG_THAW = "guest-fsfreeze-thaw"


def timeout_for(command: str) -> float:
    if command in _LONG or command == _LONG_THAW:
        return LONG
    if command in _SHORT:
        return SHORT
    return MEDIUM


class AgentUnavailable(StateError):
    """No guest agent answers: no channel (a board without virtio), the guest has not opened
    the port (no qemu-ga running in it, or still booting), or it stopped answering. Not a
    QEMU failure: QEMU may be fine."""


class AgentTimeout(AgentUnavailable):
    """The agent answered the sync but not the command in time."""


class AgentError(QlaunchError):
    """The agent answered a command with an error; `desc` is the agent's words. Exit 2 for
    an unknown command or bad arguments, 1 for everything else it refused."""

    def __init__(self, what: str, command: str, error_class: str, desc: str) -> None:
        bad_input = error_class == "CommandNotFound" or "arameter" in desc
        super().__init__(
            f"{what}: guest agent: {command}: {desc}",
            hint="qlaunch agent NAME guest-info lists the commands the agent has"
            if bad_input
            else None,
            exit_code=2 if bad_input else 1,
        )
        self.command = command
        self.error_class = error_class
        self.desc = desc


NO_AGENT_HINT = "install qemu-guest-agent in the guest: apt-get install qemu-guest-agent"


class Agent:
    """One session with a guest agent on a unix socket.

    path: the socket. lock: a lock file held while connected (None: no lock). what: how
    messages name the VM ("VM web").
    """

    def __init__(
        self,
        path: str | Path,
        *,
        lock: str | Path | None = None,
        what: str = "the guest",
        purpose: str = "agent",
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> None:
        self.path = str(path)
        self.what = what
        self._lock = (
            state.FileLock(Path(lock), f"the guest agent of {what}", purpose, lock_timeout)
            if lock
            else None
        )
        self._sock: socket.socket | None = None
        self._buf = b""

    # -- connection

    def connect(self, timeout: float = CONNECT) -> Agent:
        """Connect and sync; AgentUnavailable if no agent answers within timeout."""
        if self._lock is not None:
            self._lock.acquire()
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self._sock = s
            try:
                s.connect(self.path)
            except OSError as e:
                why = (
                    "it has no guest agent channel"
                    if e.errno == errno.ENOENT
                    else f"cannot connect to {self.path}: {e.strerror}"
                )
                raise AgentUnavailable(f"{self.what}: {why}", hint=NO_AGENT_HINT) from None
            self.sync(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def sync(self, timeout: float = CONNECT) -> None:
        """Flush what an earlier client left in the channel: 0xFF (the agent's parser starts
        over), then guest-sync-delimited with a fresh id, and drop every reply before ours."""
        sid = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
        msg = json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": sid}})
        self._send(DELIM + msg.encode() + b"\n", "guest-sync-delimited")
        self._check_port_open()
        deadline = time.monotonic() + timeout
        self._buf = b""
        while True:
            # The reply to a delimited sync follows a 0xFF; what comes before it is stale.
            while DELIM not in self._buf:
                self._buf = b""
                self._fill(deadline, "guest-sync-delimited", timeout, in_sync=True)
            self._buf = self._buf[self._buf.index(DELIM) + 1 :]
            reply = self._read_reply(deadline, "guest-sync-delimited", timeout, in_sync=True)
            if reply.get("return") == sid:
                return
            # A stale sync's answer, or another stale reply: look for the next delimiter.

    def _check_port_open(self) -> None:
        """QEMU reads our socket only while the guest has the agent's port open: bytes still
        queued after PORT_CHECK mean nobody in the guest is listening."""
        s = self._need()
        deadline = time.monotonic() + PORT_CHECK
        while True:
            if _outq(s) == 0:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentUnavailable(
                    f"{self.what}: no guest agent: the guest has not opened its port "
                    "(qemu-ga not running, or the guest still booting)",
                    hint=NO_AGENT_HINT,
                )
            r, _, _ = select.select([s], [], [], min(left, 0.005))
            if r:
                return  # an answer (or EOF): somebody is there

    def close(self) -> None:
        try:
            if self._sock is not None:
                self._sock.close()
        finally:
            self._sock = None
            self._buf = b""
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> Agent:
        if self._sock is None:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands

    def execute(
        self,
        command: str,
        args: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run a command; its `return` value. AgentError if the agent says no, AgentTimeout
        if it says nothing within timeout (default: timeout_for(command))."""
        t = timeout_for(command) if timeout is None else timeout
        msg: dict[str, Any] = {"execute": command}
        if args:
            msg["arguments"] = dict(args)
        self._send(json.dumps(msg).encode() + b"\n", command)
        reply = self._read_reply(time.monotonic() + t, command, t)
        if "error" in reply:
            err = reply["error"] if isinstance(reply["error"], dict) else {}
            raise AgentError(
                self.what,
                command,
                str(err.get("class", "GenericError")),
                str(err.get("desc", reply["error"])),
            )
        return reply.get("return")

    def shutdown(self, mode: str = "powerdown") -> None:
        """guest-shutdown (powerdown, halt or reboot). The agent does not reply when it works:
        EOF or silence for SHUTDOWN_ERROR_WAIT counts as sent; an error reply raises."""
        msg = {"execute": "guest-shutdown", "arguments": {"mode": mode}}
        self._send(json.dumps(msg).encode() + b"\n", "guest-shutdown")
        try:
            reply = self._read_reply(
                time.monotonic() + SHUTDOWN_ERROR_WAIT, "guest-shutdown", SHUTDOWN_ERROR_WAIT
            )
        except AgentUnavailable:
            return
        if "error" in reply:
            err = reply["error"] if isinstance(reply["error"], dict) else {}
            raise AgentError(
                self.what, "guest-shutdown", str(err.get("class")), str(err.get("desc"))
            )

    # -- plumbing

    def _need(self) -> socket.socket:
        if self._sock is None:
            raise AgentUnavailable(f"{self.what}: not connected to the guest agent")
        return self._sock

    def _send(self, data: bytes, command: str) -> None:
        s = self._need()
        try:
            s.sendall(data)
        except OSError as e:
            raise AgentUnavailable(
                f"{self.what}: the guest agent's channel closed during {command}: {e.strerror}"
            ) from None

    def _fill(self, deadline: float, command: str, timeout: float, in_sync: bool = False) -> None:
        s = self._need()
        left = deadline - time.monotonic()
        r, _, _ = select.select([s], [], [], max(left, 0.0)) if left > 0 else ([], [], [])
        if not r:
            if in_sync:
                raise AgentUnavailable(
                    f"{self.what}: the guest agent did not answer within {timeout:g} s",
                    hint=NO_AGENT_HINT,
                )
            raise AgentTimeout(
                f"{self.what}: guest agent: {command} got no answer within {timeout:g} s",
                hint="the agent may be busy or hung; --timeout waits longer",
            )
        try:
            data = s.recv(65536)
        except OSError as e:
            data, why = b"", e.strerror
        else:
            why = "EOF"
        if not data:
            raise AgentUnavailable(
                f"{self.what}: the guest agent's channel closed during {command} ({why})"
            )
        self._buf += data

    def _read_reply(
        self, deadline: float, command: str, timeout: float, in_sync: bool = False
    ) -> dict[str, Any]:
        """The next reply from the agent. Replies carry no id to match them by: they come in
        order, one JSON object a line, and sync dropped what came before."""
        while True:
            while b"\n" not in self._buf:
                self._fill(deadline, command, timeout, in_sync)
            line, self._buf = self._buf.split(b"\n", 1)
            # A stale sync reply's delimiter starts a line; a broken line is not a reply.
            try:
                obj = json.loads(line.lstrip(DELIM))
            except ValueError:
                continue
            if isinstance(obj, dict) and ("return" in obj or "error" in obj):
                return obj


def _outq(s: socket.socket) -> int:
    """Bytes we sent that the other end has not read yet."""
    try:
        buf = fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0  # not knowable: let the timeout decide
    return int(struct.unpack("i", buf)[0])


# ---- a VM's agent ---------------------------------------------------------------------------

SEEN_FILE = "agent.json"
ADDRESS_MAX_AGE = 5.0  # list and status reuse addresses this fresh
FAILED_BACKOFF = 30.0  # after the agent stopped answering, list leaves it alone this long
PROBE_BACKOFF = 3.0  # status tries an agent never seen again after this long
LIST_TIMEOUT = 1.0  # what list and status wait for addresses


def connect(
    vm: VM,
    timeout: float = CONNECT,
    *,
    purpose: str = "agent",
    lock_timeout: float = LOCK_TIMEOUT,
) -> Agent:
    """A synced session with the VM's agent (use it in a with block: it holds qga.lock).
    StateError if the VM is not running; AgentUnavailable if no agent answers. A success is
    remembered for `seen`."""
    live = vm.live()
    if live.qemu is None:
        raise StateError(f"VM {vm.name} is not running (state {live.state})")
    if live.record.state == state.PAUSED or live.record.runstate not in (None, "running"):
        raise AgentUnavailable(f"VM {vm.name} is paused: its guest agent cannot answer")
    ga = Agent(
        vm.dir / "qga.sock",
        lock=vm.dir / "qga.lock",
        what=f"VM {vm.name}",
        purpose=purpose,
        lock_timeout=lock_timeout,
    )
    try:
        ga.connect(timeout)
    except AgentUnavailable:
        _remember(vm.dir, live.qemu.pid, live.qemu.start_ticks, ok=False)
        raise
    _remember(vm.dir, live.qemu.pid, live.qemu.start_ticks, ok=True)
    return ga


def _read_seen(d: Path) -> dict[str, Any]:
    try:
        data = json.loads((d / SEEN_FILE).read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember(d: Path, pid: int, ticks: int, *, ok: bool, **extra: Any) -> None:
    """agent.json: whether this QEMU's agent has answered (a new QEMU, after a restart, starts
    with a clean slate), when it last failed, and the last addresses it gave."""
    cur = _read_seen(d)
    if cur.get("qemu") != [pid, ticks]:
        cur = {"qemu": [pid, ticks]}
    now = time.time()
    if ok:
        cur.setdefault("seen", now)
        cur["answered_at"] = now
        cur.pop("failed_at", None)
    else:
        cur["failed_at"] = now
    cur.update(extra)
    with contextlib.suppress(OSError):
        state.write_json(d / SEEN_FILE, cur)


def seen(d: Path, q: state.Stat | None) -> bool:
    """The agent of this QEMU process has answered at least once (no socket touched)."""
    if q is None:
        return False
    cur = _read_seen(d)
    return cur.get("qemu") == [q.pid, q.start_ticks] and bool(cur.get("seen"))


def answering(d: Path, q: state.Stat | None) -> bool | None:
    """Whether this QEMU's agent answered the last time anyone asked (None: nobody has)."""
    if q is None:
        return None
    cur = _read_seen(d)
    if cur.get("qemu") != [q.pid, q.start_ticks]:
        return None
    return float(cur.get("answered_at", 0)) > float(cur.get("failed_at", 0))


def addresses(
    vm: VM,
    live: state.Live | None = None,
    *,
    probe: bool = False,
    max_age: float = ADDRESS_MAX_AGE,
    timeout: float = LIST_TIMEOUT,
) -> list[dict[str, Any]] | None:
    """The guest's addresses as its agent reports them (loopback left out), from a cache of
    up to max_age seconds. Only an agent seen answering is asked (and not within
    FAILED_BACKOFF of it failing), unless probe: then a VM never seen is tried as well.
    None when unknown. Never raises for a missing or busy agent."""
    live = live or vm.live()
    q = live.qemu
    if q is None or live.state != state.RUNNING:
        return None
    cur = _read_seen(vm.dir)
    mine = cur.get("qemu") == [q.pid, q.start_ticks]
    now = time.time()
    cached = cur.get("addresses") if mine else None
    if cached is not None and now - float(cur.get("addresses_at", 0)) <= max_age:
        return list(cached)
    since_failure = now - float(cur.get("failed_at", 0)) if mine else float("inf")
    if probe:
        if since_failure < PROBE_BACKOFF:
            return cached
    elif not (mine and cur.get("seen")) or since_failure < FAILED_BACKOFF:
        return cached
    try:
        # lock_timeout 0: a busy agent (a freeze, a shutdown) is not waited for.
        with connect(vm, timeout, purpose="addresses", lock_timeout=0.0) as ga:
            ifaces = ga.execute("guest-network-get-interfaces", timeout=timeout)
    except (AgentUnavailable, AgentError):
        return cached
    except StateError:  # the lock is held, or the VM just ended
        return cached
    found = parse_interfaces(ifaces)
    _remember(vm.dir, q.pid, q.start_ticks, ok=True, addresses=found, addresses_at=time.time())
    return found


def parse_interfaces(ifaces: Any) -> list[dict[str, Any]]:
    """guest-network-get-interfaces' answer as address rows, loopback left out."""
    out: list[dict[str, Any]] = []
    if not isinstance(ifaces, list):
        return out
    for i in ifaces:
        if not isinstance(i, dict):
            continue
        name = str(i.get("name", ""))
        if name == "lo":
            continue
        for a in i.get("ip-addresses") or []:
            ip = str(a.get("ip-address", ""))
            if not ip or ip.startswith("127.") or ip == "::1":
                continue
            out.append(
                {
                    "address": ip,
                    "prefix": a.get("prefix"),
                    "family": a.get("ip-address-type"),
                    "interface": name,
                    "mac": i.get("hardware-address"),
                    "source": "agent",
                }
            )
    return out
