"""A thin synchronous face over `qemu.qmp.QMPClient`: timeouts, events, the quit/EOF race.

QEMU serves one client at a time on a monitor socket (a second connection waits in the
listen queue and gets no greeting until the first leaves). So every client of a VM's qmp.sock
holds the VM's qmp.lock while connected, and a waiter that gives up names the holder instead
of mistaking a busy monitor for a dead one.

Timeouts are per command: short for queries, long for commands that move data (migration,
block jobs, snapshots, device changes) and for `quit`. `quit` answered by EOF instead of
`{"return": {}}` is success: QEMU may close the socket before the reply leaves.

Usage:

    with Monitor(vmdir / "qmp.sock", lock=vmdir / "qmp.lock", what="VM web") as mon:
        mon.execute("query-status")          # {'status': 'running', 'running': True, ...}
        mon.execute("stop")
        ev = mon.wait_event("STOP", timeout=5)
        mon.quit()
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient
from qemu.qmp import StateError as LibStateError

from qlaunch.errors import QemuError
from qlaunch.vm.state import FileLock

T = TypeVar("T")

CONNECT_TIMEOUT = 5.0
SHORT = 10.0  # queries and quick commands
LONG = 600.0  # migration, block jobs, snapshots, device add/del, HMP
QUIT = 60.0  # QEMU flushes disks before it answers and leaves
LOCK_TIMEOUT = 10.0

_LONG_PREFIXES = ("migrate", "block", "drive-", "snapshot-", "job-", "x-block", "x-colo")
_LONG = frozenset(
    {
        "device_add",
        "device_del",
        "human-monitor-command",
        "transaction",
        "dump-guest-memory",
        "memsave",
        "pmemsave",
        "screendump",
        "object-add",
        "object-del",
        "netdev_add",
        "netdev_del",
        "system_reset",
        "loadvm",
        "savevm",
    }
)


def timeout_for(command: str) -> float:
    """The default timeout for a command: LONG for those that may take a while, QUIT for
    quit, SHORT for everything else."""
    if command == "quit":
        return QUIT
    if command in _LONG or command.startswith(_LONG_PREFIXES):
        return LONG
    return SHORT


class QMPError(QemuError):
    """QEMU answered a command with an error. `error_class` is QMP's class (GenericError,
    CommandNotFound, DeviceNotFound...)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {desc} ({error_class})")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QMPTimeout(QemuError):
    """No answer in time: QEMU may be hung, or busy with something long."""


class QMPUnavailable(QemuError):
    """The monitor cannot be reached: no socket, nobody listening, or the connection ended."""


class Monitor:
    """One QMP session on a unix socket, synchronous, with its own event loop.

    path: the monitor socket. lock: a lock file held while connected (None: no lock).
    what: how messages name the VM ("VM web"). Events QEMU sends while connected are kept
    (in arrival order) until read with get_event/wait_event/drain_events.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        lock: str | Path | None = None,
        what: str = "QEMU",
        purpose: str = "qmp",
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> None:
        self.path = str(path)
        self.what = what
        self._lock = (
            FileLock(Path(lock), f"the QMP monitor of {what}", purpose, lock_timeout)
            if lock
            else None
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: QMPClient | None = None
        self.greeting: dict[str, Any] = {}

    # -- connection

    def connect(self, timeout: float = CONNECT_TIMEOUT) -> Monitor:
        """Connect and negotiate; QMPUnavailable or QMPTimeout if that fails."""
        if self._lock is not None:
            self._lock.acquire()
        try:
            self._loop = asyncio.new_event_loop()
            self._client = self._run(self._make_client(), None)
            try:
                self._run(self._client.connect(self.path), timeout)
            except TimeoutError:
                raise QMPTimeout(
                    f"{self.what}: QMP gave no greeting within {timeout:.0f} s",
                    hint="QEMU may be hung (state error) or stopped by a signal",
                ) from None
            except ConnectError as e:
                raise QMPUnavailable(
                    f"{self.what}: cannot connect to QMP at {self.path}: {e.exc or e}"
                ) from None
            greeting = self._client.greeting
            self.greeting = dict(greeting._asdict()) if greeting is not None else {}
        except BaseException:
            self.close()
            raise
        return self

    async def _make_client(self) -> QMPClient:
        return QMPClient(self.what)

    def close(self) -> None:
        """Disconnect (errors of a connection QEMU already closed are not errors here)."""
        try:
            if self._client is not None and self._loop is not None:
                try:
                    self._run(self._client.disconnect(), 5.0)
                except (EOFError, OSError, TimeoutError, ExecInterruptedError):
                    pass
                except ConnectError:
                    pass
            if self._loop is not None:
                self._loop.close()
        finally:
            self._client = None
            self._loop = None
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> Monitor:
        if self._client is None:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def version(self) -> str | None:
        """QEMU's version from the greeting, e.g. "7.2.22"."""
        try:
            q = self.greeting["QMP"]["version"]["qemu"]
            return f"{q['major']}.{q['minor']}.{q['micro']}"
        except (KeyError, TypeError):
            return None

    # -- commands

    def execute(
        self,
        command: str,
        args: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run a command; returns its `return` value. QMPError if QEMU says no, QMPTimeout if
        it says nothing within timeout (default: timeout_for(command))."""
        client = self._need()
        t = timeout_for(command) if timeout is None else timeout
        try:
            return self._run(client.execute(command, dict(args) if args else None), t)
        except ExecuteError as e:
            raise QMPError(command, e.error_class, str(e)) from None
        except TimeoutError:
            raise QMPTimeout(f"{self.what}: QMP {command} got no answer within {t:.0f} s") from None
        except (ExecInterruptedError, EOFError, ConnectionError, LibStateError) as e:
            raise QMPUnavailable(
                f"{self.what}: the QMP connection ended during {command}: {e}"
            ) from None

    def quit(self, timeout: float = QUIT) -> None:
        """`quit`; EOF before the answer counts as success (QEMU is on its way out)."""
        client = self._need()
        try:
            self._run(client.execute("quit"), timeout)
        except (ExecInterruptedError, EOFError, ConnectionError, LibStateError):
            pass
        except TimeoutError:
            raise QMPTimeout(
                f"{self.what}: QMP quit got no answer within {timeout:.0f} s"
            ) from None
        except ExecuteError as e:
            raise QMPError("quit", e.error_class, str(e)) from None

    def getfd(self, fd: int, name: str) -> None:
        """Hand QEMU an open file descriptor (SCM_RIGHTS over the monitor socket) under
        `name`, for commands that take fd:NAME (migrate, migrate-incoming, netdev_add). QEMU
        gets its own copy: the caller still closes fd."""
        client = self._need()
        try:
            client.send_fd_scm(fd)
        except (OSError, LibStateError) as e:
            raise QMPUnavailable(f"{self.what}: cannot pass a file descriptor: {e}") from None
        self.execute("getfd", {"fdname": name})

    # -- events

    def get_event(self, timeout: float | None = 0.0) -> dict[str, Any] | None:
        """The next event as a dict (event, data, timestamp); None if none came in time.
        timeout 0: only what has already arrived; None: wait as long as it takes."""
        client = self._need()
        # One turn of the loop lets the reader task take in what the socket holds.
        self._run(asyncio.sleep(0), None)
        if timeout == 0 and client.events.empty():
            return None
        try:
            msg = self._run(client.events.get(), timeout)
        except TimeoutError:
            return None
        return dict(msg)

    def wait_event(
        self,
        name: str | tuple[str, ...],
        timeout: float,
        match: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """Wait for an event named `name` (or one of several) for which match(event) is
        true; events passed over on the way are dropped. QMPTimeout if none comes."""
        names = (name,) if isinstance(name, str) else name
        loop = self._need_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            ev = self.get_event(max(left, 0.0)) if left > 0 else None
            if ev is None:
                raise QMPTimeout(f"{self.what}: no {'/'.join(names)} event within {timeout:.0f} s")
            if ev.get("event") in names and (match is None or match(ev)):
                return ev

    def drain_events(self) -> list[dict[str, Any]]:
        out = []
        while (ev := self.get_event(0)) is not None:
            out.append(ev)
        return out

    # -- plumbing

    def _need(self) -> QMPClient:
        if self._client is None:
            raise QMPUnavailable(f"{self.what}: not connected to QMP")
        return self._client

    def _need_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise QMPUnavailable(f"{self.what}: not connected to QMP")
        return self._loop

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        return self._need_loop().run_until_complete(asyncio.wait_for(coro, timeout))
