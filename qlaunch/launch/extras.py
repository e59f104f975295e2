"""What a launch makes beside QEMU: the VM's own copy of the UEFI variable store, and the
helper processes of its plan (swtpm) for `run` and `exec`. (A background VM's supervisor starts
the helpers itself, before each QEMU, from plan.json: qlaunch.vm.supervisor.)"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from qlaunch.boot import firmware
from qlaunch.config.profile import Profile
from qlaunch.errors import HostError
from qlaunch.launch.argv import Runtime, firmware_for
from qlaunch.launch.host import HostFacts
from qlaunch.launch.plan import Helper
from qlaunch.spawn import spawn, stop_child

log = logging.getLogger(__name__)
READY_TIMEOUT = 10.0


def make_files(profile: Profile, host: HostFacts, rt: Runtime) -> None:
    """The variable store (copied from the firmware's template once, then kept: a VM's UEFI
    variables live on across stops) and the TPM's state directory."""
    fw = firmware_for(profile, host)
    if fw is not None and fw.vars_template and rt.firmware_vars:
        Path(rt.firmware_vars).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if firmware.ensure_vars(fw, rt.firmware_vars):
            log.debug("%s: UEFI variable store made from %s", rt.name, fw.vars_template)


@contextlib.contextmanager
def running(helpers: Sequence[Helper]) -> Iterator[None]:
    """Each helper started and ready (its socket there) before the body; ended after it."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for h in helpers:
            procs.append(start(h))
        yield
    finally:
        for proc in reversed(procs):
            # Most have ended with QEMU's connection already (swtpm --terminate).
            stop_child(proc, grace=2.0)


PACKAGES = {"swtpm": "swtpm", "virtiofsd": "qemu-system-common"}


def start(h: Helper) -> subprocess.Popen[bytes]:
    os.makedirs(h.state, mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(h.ready)  # a socket left by an earlier one that was killed
    # Its stderr goes to its log, not to a pipe no one reads once it runs: a helper that
    # talks (virtiofsd warns per request) would fill the pipe and stall the guest's I/O.
    with open(h.log, "ab") as log_file:
        try:
            proc = spawn(
                h.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                # From the main thread only: preexec_fn is unsafe with threads (exec's matrix).
                die_with_parent=threading.current_thread() is threading.main_thread(),
            )
        except FileNotFoundError:
            package = PACKAGES.get(os.path.basename(h.argv[0]), os.path.basename(h.argv[0]))
            raise HostError(
                f"{h.argv[0]} is not installed", hint=f"apt-get install {package}"
            ) from None
    deadline = time.monotonic() + READY_TIMEOUT
    while not os.path.exists(h.ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_child(proc, grace=1.0)
            err = _tail(h.log)
            raise HostError(f"{h.what} did not start: {err or 'see ' + h.log}")
        time.sleep(0.005)
    log.debug("%s ready (pid %d)", h.what, proc.pid)
    return proc


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""
