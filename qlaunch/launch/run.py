"""`qlaunch run`: QEMU in the foreground, its serial console on the terminal.

With a command, the guest init prints `QLAUNCH_EXIT=N` after it; we strip that line from what the
user sees and return N. Boards whose poweroff only halts (raspi) are ended here once the console
says so, since QEMU would otherwise wait forever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from qlaunch.boot import protocol
from qlaunch.config.profile import Profile
from qlaunch.errors import QemuError, QlaunchError
from qlaunch.launch import argv as argvmod
from qlaunch.launch import extras, plan, resolve
from qlaunch.launch.host import HostFacts
from qlaunch.spawn import spawn, stop_child

log = logging.getLogger(__name__)

EXIT_RE = re.compile(protocol.EXIT_RE.pattern.encode())
HALT_RE = re.compile(protocol.HALT_RE.pattern.encode())
MARKER = protocol.EXIT_MARKER.encode()
SCREEN_CONTROL = re.compile(rb"\x1b\[(?:2J|[0-9;]*H|=[0-9]+h)")
# \Z, not $: $ also matches before a last \n, which held back every write's closing \r\n
# until the next write, and the command's last line never got its newline.
PARTIAL_CONTROL = re.compile(rb"\x1b(?:\[[0-9;=]*)?\Z|\r\Z")

EXIT_NO_STATUS = protocol.EXIT_NO_STATUS


@dataclass
class ConsoleFilter:
    """Passes console bytes through, strips the exit marker line, and watches for the end."""

    write: Callable[[bytes], None]
    status: int | None = None
    halted: bool = False
    tail: deque[bytes] = field(default_factory=lambda: deque(maxlen=30))
    _held: bytes = b""
    _line: bytes = b""

    def feed(self, data: bytes) -> None:
        data = self._held + data
        self._held = b""
        out = []
        for piece in data.splitlines(keepends=True):
            if not piece.endswith(b"\n"):
                # A partial line that may yet become the marker waits for its end.
                if MARKER.startswith(piece.lstrip(b"\r")[: len(MARKER)]) or MARKER in piece:
                    self._held = piece
                    continue
                if self.status is None:
                    out.append(piece)
                self._track(piece, complete=False)
                continue
            m = EXIT_RE.search(piece)
            if m:
                self.status = int(m.group(1))
                before = piece[: m.start()]
                if before.strip():
                    out.append(before + b"\n")
                continue
            if self.status is None:
                out.append(piece)
            # After the command's status only shutdown chatter follows; keep it for the tail.
            self._track(piece, complete=True)
        if out:
            self.write(b"".join(out))

    def _track(self, piece: bytes, complete: bool) -> None:
        self._line += piece
        if complete:
            line = self._line.rstrip(b"\r\n")
            self._line = b""
            self.tail.append(line)
            if HALT_RE.search(line):
                self.halted = True

    def flush(self) -> None:
        if self._held:
            self.write(self._held)
            self._held = b""


@dataclass
class RunResult:
    status: int  # what `qlaunch run` exits with
    qemu_returncode: int
    command_status: int | None
    console_tail: list[str]


def run(
    profile: Profile,
    host: HostFacts,
    cmd: list[str] | None = None,
    *,
    out: BinaryIO | None = None,
    note: Callable[[str], None] | None = None,
) -> RunResult:
    out = out or sys.stdout.buffer
    # Refused before anything is made: an accelerator that cannot be had is the first news.
    _, accel_note = argvmod.choose_accel(profile, host)
    from qlaunch.net import attach, netns  # pyroute2 and friends: only when a run happens

    with (
        contextlib.ExitStack() as stack,
        tempfile.TemporaryDirectory(prefix="qlaunch-run-") as tmp,
        # Taps for [[net]] mode = network/bridge ($QLAUNCH_NETNS: all of it in that namespace).
        attach.nics_for(profile, profile.name, netns.from_env(None)) as nics,
    ):
        p = plan_run(profile, host, cmd, Path(tmp), taps=nics.taps, nic_append=nics.append)
        stack.enter_context(extras.running(p.helpers))
        log.debug("run: %s under %s, %d fds passed", profile.name, p.accel, len(nics.fds))
        if accel_note and note:
            note(accel_note)
        return _drive(profile, list(p.argv), out, bool(cmd), nics.fds)


def plan_run(
    profile: Profile,
    host: HostFacts,
    cmd: list[str] | None,
    workdir: Path,
    *,
    taps: tuple[str | None, ...] = (),
    nic_append: tuple[str, ...] = (),
    make: bool = True,
) -> plan.LaunchPlan:
    """The checks and files of a foreground run, and its plan. make=False (cmdline) checks
    the disks without creating any."""
    rt = _wire(
        "run", profile, cmd, workdir, make, taps=taps, nic_append=nic_append, command=bool(cmd)
    )
    launch = plan.build(profile, host, "run", rt)
    if make:
        extras.make_files(profile, host, rt)
    return launch


def plan_warm(
    profile: Profile,
    host: HostFacts,
    entry: str,
    cmd: list[str] | None,
    workdir: Path,
    *,
    incoming_fd: int | None = None,
    make: bool = True,
) -> plan.LaunchPlan:
    """The plan of a warm image's build (entry warm-build) or of a run restored from one
    (warm-run): the machine of a command run, with the base initramfs (the command is sent
    to the restored guest) and nothing of one run in the argv but the image's fd."""
    rt = _wire(entry, profile, cmd, workdir, make, incoming_fd=incoming_fd)
    return plan.build(profile, host, entry, rt)


def _wire(
    entry: str,
    profile: Profile,
    cmd: list[str] | None,
    workdir: Path,
    make: bool,
    **kw: Any,
) -> argvmod.Runtime:
    """A foreground entry's boot files (no power button: nothing presses it) and Runtime."""
    warm = entry in plan.WARM
    files = resolve.boot_files(profile, cmd, workdir, warm=warm, button=False)
    return plan.wire(
        entry,
        profile.name,
        workdir=str(workdir),
        kernel=files.kernel,
        initrd=files.initrd,
        dtb=files.dtb,
        disk_paths=_disk_paths(profile, workdir, make),
        **kw,
    )


def _disk_paths(profile: Profile, workdir: Path, make: bool) -> tuple[str, ...]:
    if not profile.disks:
        return ()
    from qlaunch.launch import disks  # image and seed handling: only for profiles with disks

    return disks.prepare_disks(profile, workdir, make=make)


def _drive(
    profile: Profile,
    argv: list[str],
    out: BinaryIO,
    has_cmd: bool,
    pass_fds: list[int],
    feed: bytes | None = None,
) -> RunResult:
    """QEMU's console to out until it ends. feed: bytes for the guest's console (a warm run's
    payload), written as the guest takes them and held open until QEMU ends."""
    held = b""

    def write(b: bytes) -> None:
        nonlocal held
        if has_cmd:
            # The guest tty writes CR LF; a command's output read from a pipe wants plain LF.
            # UEFI firmware clears the screen and homes the cursor: no use in a command's
            # output. A sequence cut between two reads waits for its end.
            b = held + b
            cut = PARTIAL_CONTROL.search(b)
            b, held = (b[: cut.start()], b[cut.start() :]) if cut else (b, b"")
            b = SCREEN_CONTROL.sub(b"", b.replace(b"\r\n", b"\n"))
        out.write(b)
        out.flush()

    filt = ConsoleFilter(write)
    try:
        proc = spawn(
            argv,
            # Without a command the console is the user's: their terminal or a pipe feeds it.
            stdin=subprocess.PIPE if feed is not None else subprocess.DEVNULL if has_cmd else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=pass_fds,
            die_with_parent=True,
        )
    except FileNotFoundError:
        raise QemuError(
            f"{argv[0]} is not installed",
            hint="apt-get install -y qemu-system-x86 qemu-system-arm",
        ) from None
    errbuf: list[bytes] = []
    err_thread = threading.Thread(target=_collect, args=(proc, errbuf), daemon=True)
    err_thread.start()
    if feed is not None:
        threading.Thread(target=_feed, args=(proc, feed), daemon=True).start()
    ended_by_us = False
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            filt.feed(chunk)
            # With the command's status in, the rest is the guest's power-off (its console
            # drain, poweroff, the kernel's shutdown: 50 to 100 ms under TCG): the guest init
            # synced any disk before it printed the status, and SIGTERM lets QEMU flush its
            # own caches, as exec does. A board that halts on poweroff would never end QEMU.
            if (has_cmd and filt.status is not None) or (
                filt.halted and profile.board.halts_on_poweroff
            ):
                ended_by_us = True
                stop_child(proc, grace=2.0)
                break
    except KeyboardInterrupt:
        stop_child(proc)
        raise
    finally:
        filt.flush()
    rc = proc.wait()
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    log.debug("run: QEMU (pid %d) exited %d; guest status %s", proc.pid, rc, filt.status)
    err_thread.join(timeout=2)
    stderr = b"".join(errbuf).decode(errors="replace").strip()
    tail = [line.decode(errors="replace") for line in filt.tail]
    if rc != 0 and not ended_by_us and filt.status is None:
        last = stderr.splitlines()[-1] if stderr else f"exit status {rc}"
        raise QemuError(f"QEMU failed: {last}")
    if has_cmd:
        if filt.status is None:
            raise QlaunchError(
                "the guest ended without reporting the command's exit status "
                f"(last console line: {tail[-1] if tail else 'none'!r})",
                hint="run again with --debug, or look for a kernel panic above",
                exit_code=EXIT_NO_STATUS,
            )
        return RunResult(filt.status, rc, filt.status, tail)
    return RunResult(0, rc, None, tail)


def _feed(proc: subprocess.Popen[bytes], data: bytes) -> None:
    assert proc.stdin is not None
    # QEMU reads its stdin only as the guest's UART takes bytes: a write may wait on it.
    with contextlib.suppress(OSError):
        proc.stdin.write(data)
        proc.stdin.flush()


def _collect(proc: subprocess.Popen[bytes], buf: list[bytes]) -> None:
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    while chunk := os.read(fd, 65536):
        buf.append(chunk)
