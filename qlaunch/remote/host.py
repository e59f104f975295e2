"""The Python API for another host: the same VM operations, run by qlaunch there over ssh.

    import qlaunch
    host = qlaunch.Host("ssh://root@web1")
    vm = host.start("default", name="web", sets=["machine.memory=512M"])
    vm.status()["state"]                    # 'running'
    vm.qmp("query-status")                  # {'status': 'running', 'running': True, ...}
    [r["name"] for r in host.list()]        # ['web']
    vm.migrate("ssh://root@web2")           # live, from web1 to web2
    vm.stop(); vm.remove()
    host.close()                            # or leave the connection to end by itself

Every call is one `qlaunch --json ...` there, through the shared ssh connection (see
qlaunch.remote.transport). A failure there raises the error qlaunch there reported, as the
class its exit code stands for (UsageError 2, HostError 3, QemuError 4, StateError 5), with
its message and hint.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qlaunch.errors import HostError, QemuError, QlaunchError, StateError, UsageError
from qlaunch.remote import transport
from qlaunch.remote import uri as urimod

_ERRORS: dict[int, type[QlaunchError]] = {
    2: UsageError,
    3: HostError,
    4: QemuError,
    5: StateError,
}
_LINE = re.compile(r"^qlaunch: error: (?P<msg>.*?)(?: \(hint: (?P<hint>.*)\))?$")


def error_from(code: int, stderr: str) -> QlaunchError:
    """The error a qlaunch command reported on stderr (its one error line), by exit code."""
    msg, hint = f"qlaunch exited with {code}", None
    for line in reversed(stderr.splitlines()):
        m = _LINE.match(line.strip())
        if m:
            msg, hint = m.group("msg"), m.group("hint")
            break
    cls = _ERRORS.get(code, QlaunchError)
    if cls is QlaunchError:
        return QlaunchError(msg, hint, exit_code=code)
    return cls(msg, hint)


class Host:
    """Another host, at an ssh:// URI (as `qlaunch --connect` takes)."""

    def __init__(self, uri: str, *, timeout: float | None = 600.0, base: Path | None = None):
        self.target = urimod.parse(uri)
        self.conn = transport.Connection(self.target, base)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Host({self.target.uri()!r})"

    def qlaunch(self, *args: str, input: str | None = None) -> str:
        """Run `qlaunch ARGS` there; its stdout. The error it reported, raised, if it failed."""
        r = self.conn.capture(list(args), input=input, timeout=self.timeout)
        if r.returncode != 0:
            raise error_from(r.returncode, r.stderr)
        return r.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.qlaunch(*args, "--json"))

    def list(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.json("list")
        return rows

    def vm(self, name: str) -> RemoteVM:
        """The VM named name there (not checked until used)."""
        return RemoteVM(self, name)

    def start(
        self,
        profile: str,
        name: str | None = None,
        *,
        sets: Sequence[str] = (),
        restart: str = "no",
        cmd: Sequence[str] | None = None,
        paused: bool = False,
    ) -> RemoteVM:
        """`qlaunch start` there; profile is that host's (a name or a path there)."""
        args = ["start", profile]
        if name is not None:
            args += ["--name", name]
        for s in sets:
            args += ["--set", s]
        args += ["--restart", restart]
        if paused:
            args.append("--paused")
        if cmd:
            args += ["--", *cmd]
        return RemoteVM(self, self.qlaunch(*args).strip())

    def close(self) -> None:
        """End the shared ssh connection now (else it ends a minute after its last use)."""
        self.conn.close()

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteVM:
    def __init__(self, host: Host, name: str) -> None:
        self.host = host
        self.name = name

    def __repr__(self) -> str:
        return f"RemoteVM({self.name!r} on {self.host.target.where})"

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = self.host.json("status", self.name)
        return st

    @property
    def state(self) -> str:
        return str(self.status()["state"])

    def qmp(
        self, command: str, args: Mapping[str, object] | None = None, /, **kwargs: object
    ) -> Any:
        merged = {**(args or {}), **kwargs}
        extra = [json.dumps(merged)] if merged else []
        return json.loads(self.host.qlaunch("qmp", self.name, command, *extra))

    def pause(self) -> None:
        self.host.qlaunch("pause", self.name)

    def resume(self) -> None:
        self.host.qlaunch("resume", self.name)

    def stop(self, timeout: float = 60.0, force: bool = False) -> dict[str, Any]:
        args = ["stop", self.name, "--timeout", str(timeout)]
        report: dict[str, Any] = self.host.json(*args, *(["--force"] if force else []))
        return report

    def kill(self, signal: str = "KILL") -> None:
        self.host.qlaunch("kill", self.name, "--signal", signal)

    def remove(self, force: bool = False) -> None:
        self.host.qlaunch("rm", self.name, *(["--force"] if force else []))

    def events(self) -> list[dict[str, Any]]:
        out = self.host.qlaunch("events", self.name, "--json")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def log(self, which: str = "console") -> str:
        """The console log, or QEMU's ("qemu") or the lifecycle log ("lifecycle")."""
        flags = {"console": [], "qemu": ["--qemu"], "lifecycle": ["--lifecycle"]}[which]
        return self.host.qlaunch("log", self.name, *flags)

    def migrate(
        self,
        uri: str,
        *,
        copy_storage: bool = False,
        max_downtime_ms: int | None = None,
        bandwidth_mib: int | None = None,
    ) -> dict[str, Any]:
        """Live migration from this host to the host at uri (as that host reaches it); the
        report. Afterwards the VM is on the other host: Host(uri).vm(name)."""
        args = ["migrate", self.name, uri]
        if copy_storage:
            args.append("--copy-storage")
        if max_downtime_ms is not None:
            args += ["--max-downtime", str(max_downtime_ms)]
        if bandwidth_mib is not None:
            args += ["--bandwidth", str(bandwidth_mib)]
        report: dict[str, Any] = self.host.json(*args)
        return report
