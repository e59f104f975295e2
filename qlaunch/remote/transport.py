"""The system's OpenSSH client as qlaunch's transport to another host: nothing new listens.

    conn = Connection(uri.parse("ssh://root@web1"))
    conn.ensure()                              # the shared connection is up, or HostError (3)
    proc = conn.spawn(["list", "--json"])      # the remote qlaunch, stdio passed through
    conn.forward("/run/x/local.sock", "/run/qlaunch/web/migrate.sock")   # ssh -L, unix sockets

One master connection per target (OpenSSH ControlMaster) carries every session: its control
socket sits in a private directory (`<state>/.ssh`, 0700) and it lingers ControlPersist=60 s
after the last use, so a second command within a minute skips the key exchange. The first
call starts the master on its own, with its stderr read here: an unreachable host, a refused
key and an unknown host key become one line and exit 3, before any remote command runs, and
everything a remote command prints afterwards is passed through untouched.

Keys only (BatchMode): qlaunch never asks for a password, so a script never hangs on a prompt.

The remote side is the login shell of the remote user, which gets one command string. Every
word in it is quoted (shlex.quote); it checks that the remote qlaunch exists (else a one-line
error and exit 3) and then execs it, so the remote qlaunch's output and exit code are the
command's.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shlex
import socket
import stat
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from qlaunch import paths
from qlaunch.errors import HostError, StateError
from qlaunch.remote.uri import Target
from qlaunch.spawn import run, spawn

log = logging.getLogger(__name__)

SSH = "ssh"
CONNECT_TIMEOUT = 10  # seconds for TCP and the key exchange (ssh -o ConnectTimeout)
PERSIST = 60  # seconds the master outlives its last session
MASTER_TIMEOUT = 60.0
NO_QLAUNCH = 3  # what the remote shell exits with when there is no qlaunch to run


def control_dir(base: Path | None = None) -> Path:
    """The private directory of the control sockets (state root/.ssh, 0700, ours)."""
    d = (base or paths.state_dir()) / ".ssh"
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = d.lstat()
    except OSError as e:
        raise HostError(f"cannot make {d}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        # Whoever can reach a control socket can use the connection behind it.
        raise StateError(
            f"{d} must be a directory of this user's alone (mode 0700)",
            hint=f"remove it; qlaunch makes it again: rm -r {d}",
        )
    return d


def _opt(value: str) -> str:
    """A value for `ssh -o KEY=VALUE`, which ssh reads as a config line: quoted if needed."""
    if any(c.isspace() for c in value) or '"' in value:
        if '"' in value:
            raise HostError(f"ssh cannot take a path with a double quote: {value}")
        return f'"{value}"'
    return value


@dataclass(frozen=True)
class FileArg:
    """A command-line word that names a file sent along with the command (its text): the
    remote shell writes it into a temporary directory and the word becomes that path."""

    name: str
    text: str


Word = str | FileArg


class Connection:
    def __init__(self, target: Target, base: Path | None = None) -> None:
        self.target = target
        self.base = base
        self._control: Path | None = None

    def __repr__(self) -> str:
        return f"Connection({self.target.uri()!r})"

    @property
    def control(self) -> Path:
        if self._control is None:
            self._control = control_dir(self.base) / self.target.key()
        return self._control

    # -- the ssh argv

    def ssh_argv(
        self, *options: str, master: str = "auto", tty: bool = False, command: str | None = None
    ) -> list[str]:
        """`ssh` with this target's options; command: the remote command string."""
        t = self.target
        argv = [
            SSH,
            "-o",
            "BatchMode=yes",
            # Errors only: no "Shared connection to HOST closed." after a console session.
            "-o",
            "LogLevel=ERROR",
            "-o",
            f"ConnectTimeout={CONNECT_TIMEOUT}",
            "-o",
            f"ControlPath={_opt(str(self.control).replace('%', '%%'))}",
            "-o",
            f"ControlMaster={master}",
            "-o",
            f"ControlPersist={PERSIST}",
            # A dead peer (a host that went away) is noticed within a minute, not never.
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=4",
        ]
        if t.port:
            argv += ["-p", str(t.port)]
        if t.user:
            argv += ["-l", t.user]
        if t.keyfile:
            argv += ["-i", t.keyfile, "-o", "IdentitiesOnly=yes"]
        if t.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={_opt(t.known_hosts)}"]
        # The escape character would eat `~.` typed into a guest's console.
        argv += ["-t", "-e", "none"] if tty else ["-T"]
        argv += [*options, "--", t.host]
        if command is not None:
            argv.append(command)
        return argv

    # -- the master connection

    def alive(self) -> bool:
        """A master answers on the control socket (no process started to ask)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.control))
            return True
        except OSError:
            return False
        finally:
            s.close()

    def ensure(self) -> None:
        """Make sure the master connection is up; HostError (exit 3) saying why it cannot be."""
        if self.alive():
            return
        with _locked(self.control.with_name(self.control.name + ".lock")):
            if self.alive():
                return  # another qlaunch made it meanwhile
            with contextlib.suppress(FileNotFoundError):
                self.control.unlink()  # a stale socket: ssh would refuse to bind over it
            # -f: ssh goes to the background once logged in, with its stdio on /dev/null, so
            # what it said before that (why it could not) is all we read here.
            argv = self.ssh_argv("-f", "-N", master="yes")
            try:
                r = run(argv, timeout=MASTER_TIMEOUT)
            except FileNotFoundError:
                raise HostError(
                    "ssh is not installed here", hint="apt-get install openssh-client"
                ) from None
            except subprocess.TimeoutExpired:
                raise HostError(
                    f"ssh to {self.target.where} did not log in within {MASTER_TIMEOUT:.0f} s"
                ) from None
            if r.returncode != 0:
                raise ssh_failure(self.target, r.stderr, r.returncode)
            log.debug("ssh master for %s up (%s)", self.target.where, self.control)

    def close(self) -> None:
        """End the master connection now (it would end by itself after ControlPersist)."""
        if not self.alive():
            return
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            run(self.ssh_argv("-O", "exit"), timeout=10)

    # -- remote commands

    def command(self, words: Sequence[Word]) -> str:
        """The remote shell's command string that runs the remote qlaunch with words."""
        t = self.target
        q = shlex.quote(t.command)
        looked = (
            f"{t.command} is not an executable there"
            if "/" in t.command
            else f"{t.command} is not on its PATH"
        )
        missing = (
            f"qlaunch: error: {t.where} has no qlaunch: {looked} (hint: install qlaunch there, "
            f"or say where it is: ssh://{t.where}?command=/path/to/qlaunch)"
        )
        lines = [
            f"command -v {q} >/dev/null 2>&1 || {{ printf '%s\\n' {shlex.quote(missing)} >&2; "
            f"exit {NO_QLAUNCH}; }}"
        ]
        files = [w for w in words if isinstance(w, FileArg)]
        if not files:
            lines.append(f"exec {q} {' '.join(map(_word, words))}")
            return "\n".join(lines)
        lines += [
            'd=$(mktemp -d "${TMPDIR:-/tmp}/qlaunch-remote.XXXXXX") || exit 3',
            "trap 'rm -rf \"$d\"' EXIT",
            "trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM",
        ]
        seen: set[str] = set()
        for f in files:
            if f.name not in seen:
                seen.add(f.name)
                lines.append(f"printf '%s' {shlex.quote(f.text)} >\"$d\"/{_word(f.name)} || exit 3")
        lines.append(f"{q} {' '.join(map(_word, words))}")
        return "\n".join(lines)

    def spawn(
        self,
        words: Sequence[Word],
        *,
        tty: bool = False,
        stdin: int | IO[Any] | None = None,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
    ) -> subprocess.Popen[bytes]:
        """The remote qlaunch with words, as a child process (ssh); call ensure() first."""
        argv = self.ssh_argv(tty=tty, command=self.command(words))
        return spawn(argv, stdin=stdin, stdout=stdout, stderr=stderr)

    def call(self, words: Sequence[Word], *, tty: bool = False) -> int:
        """Run the remote qlaunch with our stdin, stdout and stderr; its exit code."""
        self.ensure()
        proc = self.spawn(words, tty=tty)
        try:
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return 128 - rc if rc < 0 else rc

    def capture(
        self, words: Sequence[Word], *, input: str | None = None, timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the remote qlaunch; its output as text."""
        self.ensure()
        argv = self.ssh_argv(command=self.command(words))
        return run(argv, input=input, timeout=timeout)

    # -- unix socket forwards over the master (ssh -L local:remote)

    def forward(self, local: str, remote: str) -> None:
        """Connections to the local unix socket go to the remote one, through the master."""
        self.ensure()
        r = run(
            self.ssh_argv(
                "-O", "forward", "-o", "StreamLocalBindUnlink=yes", "-L", f"{local}:{remote}"
            ),
            timeout=30,
        )
        if r.returncode != 0:
            raise HostError(
                f"ssh to {self.target.where} could not forward {local} to {remote}: "
                f"{_last_line(r.stderr)}",
                hint="the remote sshd must allow it (AllowStreamLocalForwarding yes, the default)",
            )

    def cancel(self, local: str, remote: str) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            run(self.ssh_argv("-O", "cancel", "-L", f"{local}:{remote}"), timeout=30)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(local)


def _word(w: Word) -> str:
    if isinstance(w, FileArg):
        return f'"$d"/{shlex.quote(w.name)}'
    return shlex.quote(w)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _last_line(text: str) -> str:
    lines = [
        ln.strip()
        for ln in text.splitlines()
        if ln.strip() and not ln.startswith("Warning: Permanently added")
    ]
    if not lines:
        return "no reason given"
    last = lines[-1]
    return last[5:] if last.startswith("ssh: ") else last


# What ssh says, and what it means for the user: (substring, message, hint).
_FAILURES = (
    (
        "Permission denied",
        "{where} refused the key",
        "ssh logs in with keys only (ssh-agent, ~/.ssh, or ?keyfile=PATH in the URI); "
        "the key must be in the remote user's authorized_keys",
    ),
    (
        "Host key verification failed",
        "the host key of {where} is not known here (or has changed)",
        "ssh to it once to check and accept its key, or name a known_hosts file: ?known_hosts=PATH",
    ),
    (
        "Could not resolve hostname",
        "cannot reach {where}",
        "check the host name",
    ),
)


def ssh_failure(target: Target, stderr: str, code: int) -> HostError:
    """ssh's own failure as one line, exit 3."""
    why = _last_line(stderr) if stderr.strip() else f"ssh exited with {code}"
    for needle, message, hint in _FAILURES:
        if needle in stderr:
            return HostError(f"{message.format(where=target.where)}: {why}", hint=hint)
    return HostError(
        f"cannot reach {target.where}: {why}",
        hint="is the host up, sshd running there, and the port right?",
    )
