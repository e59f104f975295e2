"""The one way a child process starts, is logged, and is reaped. Never through a shell."""

from __future__ import annotations

import ctypes
import logging
import shlex
import signal
import subprocess
from collections.abc import Sequence
from typing import IO, Any

log = logging.getLogger("qlaunch.spawn")


def spawn(
    argv: Sequence[str],
    *,
    stdin: int | IO[Any] | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    pass_fds: Sequence[int] = (),
    new_session: bool = False,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """Start argv. die_with_parent: the kernel sends the child SIGTERM if we die first, so a
    foreground QEMU never outlives a killed `qlaunch run`."""
    log.debug("spawn: %s", shlex.join(argv))
    return subprocess.Popen(
        list(argv),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        pass_fds=tuple(pass_fds),
        start_new_session=new_session,
        env=env,
        cwd=cwd,
        close_fds=True,
        preexec_fn=_set_pdeathsig if die_with_parent else None,
    )


PR_SET_PDEATHSIG = 1


def _set_pdeathsig() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def stop_child(proc: subprocess.Popen[bytes], grace: float = 5.0) -> int:
    """Graceful before forceful: SIGTERM, wait, SIGKILL. Returns the reaped exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(grace)
        except subprocess.TimeoutExpired:
            log.debug("pid %d ignored SIGTERM for %.0fs; SIGKILL", proc.pid, grace)
            proc.kill()
    return proc.wait()


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,  # noqa: A002 - as subprocess.run names it
    timeout: float | None = 60.0,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """A short tool (nft, dnsmasq's start, apt-get, qemu-img...): its output as text, reaped
    whatever happens. Past the timeout it is killed and subprocess.TimeoutExpired raised."""
    log.debug("run: %s", shlex.join(argv))
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        close_fds=True,
    )
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    log.debug("run: %s exited %d", argv[0], proc.returncode)
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
