"""Per-VM state: directories, the state record, process identity, locks, names.

The state root is `paths.state_dir()` (/run/qlaunch as root, $XDG_RUNTIME_DIR/qlaunch
otherwise, $QLAUNCH_STATE overrides), mode 0700. Inside it:

    .locks/NAME.lock   the VM's lock; kept outside the VM's directory so that `rm` of the
                       directory cannot pull the lock from under a waiter
    NAME/              one directory per VM, mode 0700, everything in it 0600
        state.json     the Record below, replaced atomically (write a temp file, rename)
        state.lock     serialises read-modify-write of state.json (supervisor and CLI)
        argv.json      QEMU's argv, launched as it is on every (re)start
        profile.json   the profile as resolved (merged TOML, --set, boot files, accel)
        qmp.sock       QMP for clients; QEMU serves one client at a time, so every client
                       holds qmp.lock while connected
        console.sock   the serial console (one client at a time: console.lock)
        console.log    everything the guest wrote to its console, across restarts
        qemu.log       QEMU's stdout and stderr
        vm.log         the lifecycle: starts, exits, restarts, each stop step
        events.jsonl   QMP events as QEMU sent them, recorded by the supervisor
        supervisor.log the supervisor's own stderr (a traceback, if it ever has one)

Identity: a pid alone lies after PID reuse. A process is "our QEMU" only if its pid, its
start time in clock ticks since boot (/proc/PID/stat field 22, exact, the input of psutil's
create_time) and the VM's uuid on its command line (`-uuid UUID`) all match. Nothing signals a
pid without `identify()` saying so first, and signals go through a pidfd where the kernel has
them, so the process checked is the process signalled.

This module is imported by the supervisor, which must stay small: standard library only at
the top, nothing heavy anywhere.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qlaunch import paths
from qlaunch.errors import QlaunchError, StateError, UsageError

_log = logging.getLogger(__name__)

FORMAT = 2  # 2: typed fields where 1 had `extra`; 1 is still read
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
RESERVED = ("exec-logs",)  # directories of the state root that are not VMs
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL
KEEP_EXITS = 20

# Recorded states. running/paused come from QEMU (via the supervisor's events and pings);
# starting/restarting are the supervisor's transitions; stopped/failed are final.
STARTING, RUNNING, PAUSED, RESTARTING = "starting", "running", "paused", "restarting"
STOPPED, FAILED, ERROR = "stopped", "failed", "error"
FINAL = (STOPPED, FAILED)
RESTART_POLICIES = ("no", "on-failure", "always")

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---- names and places ----------------------------------------------------------------------


def validate_name(name: str, new: bool = False) -> str:
    """VM names: ASCII letters, digits, '-' and '_', 1 to 64 characters. A new VM's name may
    not start with '-': every command would read it as an option (`qlaunch stop -- -x` works,
    but nobody should have to know that)."""
    if not NAME_RE.fullmatch(name) or (new and name.startswith("-")):
        raise UsageError(
            f"{name!r} is not a VM name",
            hint="use 1 to 64 ASCII letters, digits, '-' or '_', not starting with '-'",
        )
    if name in RESERVED:
        raise UsageError(f"{name!r} is not a VM name: qlaunch keeps its {name} there")
    return name


def root(create: bool = False) -> Path:
    """The state root; with create, made (0700) if missing. UsageError when it cannot be one
    (a file, or under one), so that no command meets it as a traceback."""
    r = Path(os.path.abspath(paths.state_dir()))
    check_root(r)
    if create:
        try:
            r.mkdir(parents=True, exist_ok=True, mode=0o700)
            (r / ".locks").mkdir(exist_ok=True, mode=0o700)
        except OSError as e:
            raise _root_error(r, e.strerror or str(e)) from None
    return r


def check_root(r: Path) -> None:
    for p in (r, *r.parents):
        try:
            st = os.stat(p)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise _root_error(r, e.strerror or str(e)) from None
        if not stat.S_ISDIR(st.st_mode):
            raise _root_error(r, f"{p} is not a directory")
        return


def _root_error(r: Path, why: str) -> UsageError:
    return UsageError(
        f"the state directory {r} cannot be used: {why}",
        hint="point QLAUNCH_STATE at a directory (or leave it unset)",
    )


def vm_dir(name: str, base: Path | None = None) -> Path:
    return (base or root()) / validate_name(name)


def check_socket_path(path: Path) -> None:
    if len(os.fsencode(str(path))) > SOCKET_PATH_MAX:
        raise UsageError(
            f"socket path {path} is longer than {SOCKET_PATH_MAX} bytes",
            hint="set QLAUNCH_STATE to a shorter directory, or use a shorter VM name",
        )


def names(base: Path | None = None) -> list[str]:
    """Names of the VMs that have a state directory, sorted."""
    r = base or root()
    try:
        entries = os.listdir(r)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise _root_error(r, e.strerror or str(e)) from None
    return sorted(e for e in entries if NAME_RE.fullmatch(e) and (r / e / "state.json").exists())


# ---- files VMs hold ------------------------------------------------------------------------

# QEMU options whose value is a file, and what the file is to the VM.
_FILE_OPTS = {"-kernel": "kernel", "-initrd": "initrd", "-dtb": "device tree"}
_FILE_KEYS = ("file", "file.filename", "filename")


def _opt_files(value: str) -> list[str]:
    """File names in a QEMU option value (`a=b,file.filename=/x,,y` or -blockdev JSON)."""
    if value.startswith("{"):
        try:
            doc = json.loads(value)
        except ValueError:
            return []
        out: list[str] = []
        stack: list[Any] = [doc]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                out += [str(v) for k, v in node.items() if k == "filename" and isinstance(v, str)]
                stack += list(node.values())
        return out
    parts = re.split(r"(?<!,),(?!,)", value)
    out = []
    for part in parts:
        key, sep, v = part.partition("=")
        if sep and key in _FILE_KEYS and v:
            out.append(v.replace(",,", ","))
    return out


def argv_files(argv: list[str]) -> list[tuple[str, str]]:
    """(path, role) of every file a QEMU argv opens: kernel, initrd, device tree, disks,
    firmware."""
    out: list[tuple[str, str]] = []
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag in _FILE_OPTS:
            out.append((value, _FILE_OPTS[flag]))
        elif flag in ("-drive", "-blockdev"):
            role = "firmware" if "if=pflash" in value else "disk"
            out += [(f, role) for f in _opt_files(value)]
    return out


def held_files(base: Path | None = None) -> dict[str, str]:
    """Files that VMs hold, by real path, each with who holds it ("disk of VM web"): every
    file of a VM that runs (or is between restarts), and the disks and save file of a VM saved
    and not yet removed (restore needs them as they are)."""
    r = base or root()
    out: dict[str, str] = {}
    for name in names(r):
        d = r / name
        try:
            live = inspect(d)
        except QlaunchError:
            continue
        saved = live.record.saved if not live.alive else None
        if not live.alive and not isinstance(saved, dict):
            continue
        who = f"VM {name}" if live.alive else f"VM {name}, saved to {saved and saved.get('file')}"
        try:
            argv = json.loads((d / "argv.json").read_bytes())
        except (OSError, ValueError):
            argv = []
        files = argv_files([str(a) for a in argv]) if isinstance(argv, list) else []
        for dev in live.record.hotplug:
            if isinstance(dev, dict) and dev.get("path"):
                files.append((str(dev["path"]), "disk"))
        for path, role in files:
            if live.alive or role == "disk":
                out.setdefault(os.path.realpath(path), f"the {role} of {who}")
        if saved and saved.get("file"):
            out[os.path.realpath(str(saved["file"]))] = (
                f"the save file of VM {name} (qlaunch restore reads it; qlaunch rm {name} "
                "lets it go)"
            )
    return out


def holder_of(path: str | os.PathLike[str], base: Path | None = None) -> str | None:
    """Who holds path, in words, if a VM or network of qlaunch does (its state included);
    else None."""
    r = base or root()
    real = os.path.realpath(path)
    top = os.path.realpath(r)
    if real.startswith(top + os.sep):
        first = Path(real).relative_to(top).parts[0]
        if first in (".networks", ".locks") or (Path(top) / first / "state.json").exists():
            return f"qlaunch's own state ({first} in {top})"
    return held_files(r).get(real)


# ---- the record ----------------------------------------------------------------------------


@dataclass
class Proc:
    """A process we started, as identity: pid, start time in ticks since boot, and (for
    display and for psutil users) create_time in seconds since the epoch, computed as psutil
    computes it."""

    pid: int
    start_ticks: int
    create_time: float


@dataclass
class Exit:
    """One end of a QEMU process: when, how (exit code or signal), and why if QEMU said
    (the `reason` of its SHUTDOWN event: guest-shutdown, host-qmp-quit, guest-reset, ...)."""

    time: float
    pid: int
    code: int | None = None
    signal: int | None = None
    reason: str | None = None
    runtime: float | None = None  # seconds the process lived, when known

    @property
    def failed(self) -> bool:
        """What on-failure restarts: a signal, a non-zero code, or a guest reset/panic
        (with -no-reboot a guest reboot or panic=-1 ends QEMU with code 0)."""
        return (
            self.signal is not None
            or (self.code is not None and self.code != 0)
            or self.reason in ("guest-reset", "guest-panic", "not-started")
        )

    def describe(self) -> str:
        if self.signal is not None:
            how = f"killed by {signal_name(self.signal)}"
        elif self.code is not None:
            how = f"exit code {self.code}"
        else:
            how = "exit status unknown"
        return f"{how} ({self.reason})" if self.reason else how


@dataclass
class Health:
    """The supervisor's last ping of QEMU's monitor."""

    ok: bool = True
    checked_at: float | None = None
    error: str | None = None


@dataclass
class Record:
    """state.json. Written by `start`, then by the supervisor; by the CLI for the few things
    it decides (stop_requested, and settling a VM whose supervisor is gone). Always through
    `update()` (locked read-modify-write) or `write_record()` before anyone else can see it.

    Versioned (`format`); records of an older format are read and written back in this one.
    """

    name: str
    uuid: str
    profile: str
    state: str = STARTING
    created_at: float = 0.0
    restart_policy: str = "no"
    restart_count: int = 0
    start_paused: bool = False
    started_at: float | None = None  # the current QEMU process's start
    qemu: Proc | None = None
    supervisor: Proc | None = None
    runstate: str | None = None  # QEMU's own run state (query-status), as last seen
    health: Health = field(default_factory=Health)
    exits: list[Exit] = field(default_factory=list)
    stop_requested: bool = False
    failed_reason: str | None = None
    fds: list[int] = field(default_factory=list)  # passed through to QEMU at these numbers
    monitor_fd: int = 3  # where QEMU finds the supervisor's private monitor (argv: fd=N)
    cleanup: list[dict[str, Any]] = field(default_factory=list)  # see run_cleanup()
    cleanup_errors: list[str] = field(default_factory=list)
    netns: str | None = None  # the network namespace QEMU and its supervisor run in
    nics: list[dict[str, Any]] = field(default_factory=list)  # net.attach's record of each NIC
    resources: dict[str, Any] | None = None  # vm.resources: cgroups, affinity it applied
    hotplug: list[dict[str, Any]] = field(default_factory=list)  # devices plugged since start
    saved: dict[str, Any] | None = None  # {"file", "at"}: ended by `qlaunch save`
    restored_from: dict[str, Any] | None = None  # {"file", "saved_at"}
    format: int = FORMAT

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Record:
        d = dict(d)
        for key in ("qemu", "supervisor"):
            if d.get(key) is not None:
                d[key] = Proc(**d[key])
        d["health"] = Health(**d.get("health") or {})
        d["exits"] = [Exit(**e) for e in d.get("exits") or []]
        # Format 1 kept what later features added in a free-form `extra` dict.
        for key, value in (d.pop("extra", None) or {}).items():
            d.setdefault(key, value)
        d["format"] = FORMAT
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def last_exit(self) -> Exit | None:
        return self.exits[-1] if self.exits else None


def write_json(path: Path, obj: Any) -> None:
    """Atomically: a temp file beside it, then rename. Readers see the old record or the new
    one, whoever dies when. No fsync: this is runtime state (tmpfs under /run), meaningless
    after a reboot, and an fsync per event would be the slowest thing the supervisor does."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps(obj, indent=1, sort_keys=False).encode() + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_record(d: Path) -> Record:
    """The record of the VM in directory d; StateError when there is none or it is unreadable."""
    path = d / "state.json"
    try:
        data = json.loads(path.read_bytes())
        return Record.from_json(data)
    except FileNotFoundError:
        raise StateError(f"no VM named {d.name}", hint="qlaunch list shows the VMs") from None
    except (ValueError, TypeError) as e:
        raise StateError(
            f"the state record of VM {d.name} is unreadable: {e}",
            hint=f"qlaunch rm --force {d.name} removes it",
        ) from None


def write_record(d: Path, rec: Record) -> None:
    write_json(d / "state.json", rec.to_json())


def update(d: Path, change: Callable[[Record], None], timeout: float = 10.0) -> Record:
    """Locked read-modify-write of state.json; returns the record as written."""
    with FileLock(d / "state.lock", f"the state record of VM {d.name}", "update", timeout):
        rec = read_record(d)
        change(rec)
        write_record(d, rec)
        return rec


def log(d: Path, message: str, who: str = "qlaunch") -> None:
    """One line in vm.log, the VM's lifecycle log (O_APPEND: lines from several writers do
    not tear)."""
    _log.debug("%s: %s", d.name, message)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
    line = f"{stamp} {who}[{os.getpid()}]: {message}\n".encode(errors="replace")
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(d / "vm.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


# ---- processes: identity and signals -------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """What /proc/PID/stat says about a process, read once."""

    pid: int
    state: str  # R S D T t Z X I ...
    start_ticks: int
    utime: int  # ticks
    stime: int
    rss_pages: int
    exit_code: int | None  # waitpid-style status; meaningful for a zombie (field 52)

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")

    @property
    def stopped(self) -> bool:
        """Stopped by a signal (SIGSTOP and friends) or by a tracer: it cannot answer."""
        return self.state in ("T", "t")

    @property
    def create_time(self) -> float:
        return self.start_ticks / CLOCK_TICKS + boot_time()


_boot_time: float | None = None


def boot_time() -> float:
    global _boot_time
    if _boot_time is None:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime"):
                    _boot_time = float(line.split()[1])
                    break
            else:
                _boot_time = 0.0
    return _boot_time


def read_stat(pid: int) -> Stat | None:
    """None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    rest = raw[raw.rfind(b")") + 2 :].split()
    # rest[0] is field 3 (state); field N is rest[N - 3].
    exit_code = int(rest[49]) if len(rest) > 49 else None
    return Stat(
        pid=pid,
        state=rest[0].decode(),
        start_ticks=int(rest[19]),
        utime=int(rest[11]),
        stime=int(rest[12]),
        rss_pages=int(rest[21]),
        exit_code=exit_code,
    )


def read_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def proc_of(pid: int) -> Proc | None:
    """The identity of a live process, to be recorded right after starting it."""
    st = read_stat(pid)
    if st is None:
        return None
    return Proc(pid=pid, start_ticks=st.start_ticks, create_time=st.create_time)


def identify(p: Proc | None, marker: Callable[[list[str]], bool]) -> Stat | None:
    """The process's stat if p is still the very process we recorded, alive (not a zombie)
    and its command line passes `marker`; else None. Never signal what this does not return."""
    if p is None:
        return None
    st = read_stat(p.pid)
    if st is None or st.zombie or st.start_ticks != p.start_ticks:
        return None
    if not marker(read_cmdline(p.pid)):
        return None
    return st


def qemu_marker(uuid: str) -> Callable[[list[str]], bool]:
    def match(argv: list[str]) -> bool:
        return any(a == "-uuid" and b == uuid for a, b in zip(argv, argv[1:], strict=False))

    return match


def supervisor_marker(d: Path) -> Callable[[list[str]], bool]:
    def match(argv: list[str]) -> bool:
        return "qlaunch.vm.supervisor" in argv and str(d) in argv

    return match


def qemu_stat(d: Path, rec: Record) -> Stat | None:
    return identify(rec.qemu, qemu_marker(rec.uuid))


def supervisor_stat(d: Path, rec: Record) -> Stat | None:
    return identify(rec.supervisor, supervisor_marker(d))


def signal_identified(
    p: Proc, marker: Callable[[list[str]], bool], sig: int, what: str = "process"
) -> bool:
    """Send sig to p only if it is still the recorded process. False if it is not (gone,
    a zombie, or the pid now belongs to someone else): nothing is sent then."""
    try:
        pidfd = os.pidfd_open(p.pid)
    except ProcessLookupError:
        return False
    except OSError:
        pidfd = -1  # no pidfds here: check then kill, with the usual tiny window
    try:
        # With a pidfd held, the pid cannot be reused: the check below is about this process.
        if identify(p, marker) is None:
            return False
        try:
            if pidfd >= 0:
                signal.pidfd_send_signal(pidfd, sig)
            else:
                os.kill(p.pid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:
            raise StateError(
                f"not allowed to signal {what} (pid {p.pid})", hint="run as its owner"
            ) from None
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            raise UsageError(f"signal {sig} cannot be sent here: {e.strerror}") from None
        return True
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def wait_gone(pid: int, start_ticks: int, timeout: float) -> bool:
    """Wait until that process has ended (gone, or a zombie nobody reaps). True if it has."""
    deadline = time.monotonic() + timeout
    while True:
        st = read_stat(pid)
        if st is None or st.zombie or st.start_ticks != start_ticks:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(0.05, left))


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def decode_wait_status(status: int) -> tuple[int | None, int | None]:
    """A waitpid status -> (exit code, signal)."""
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None
    return None, None


# ---- the live view -------------------------------------------------------------------------


@dataclass(frozen=True)
class Live:
    """A VM as it is now: the record checked against the processes (psutil-free, no QMP).

    `state` is running, paused, starting, restarting, stopped, failed or error. `note` says
    why, when the record alone would mislead (supervisor gone, QEMU stopped by a signal...).
    """

    dir: Path
    record: Record
    qemu: Stat | None  # our QEMU, alive (not a zombie), or None
    supervisor: Stat | None
    state: str
    note: str | None = None

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def alive(self) -> bool:
        """QEMU runs, or its supervisor does (it may be between restarts)."""
        return self.qemu is not None or self.supervisor is not None


def inspect(d: Path) -> Live:
    rec = read_record(d)
    q = qemu_stat(d, rec)
    s = supervisor_stat(d, rec)
    note = None
    if q is not None:
        state = rec.state if rec.state in (RUNNING, PAUSED, STARTING, RESTARTING) else RUNNING
        if q.stopped:
            state, note = ERROR, f"QEMU (pid {q.pid}) is stopped by a signal and cannot answer"
        elif not rec.health.ok:
            state, note = ERROR, f"QMP does not answer: {rec.health.error}"
        elif s is None:
            note = "its supervisor is gone: no restarts, exits not recorded"
    elif s is not None:
        state = rec.state if rec.state not in (RUNNING, PAUSED) else RESTARTING
    elif rec.state in FINAL:
        state = rec.state
    else:
        state = STOPPED
        note = "QEMU is gone and its supervisor too; the exit was not recorded"
    return Live(d, rec, q, s, state, note)


def settle(d: Path, log_who: str = "qlaunch") -> Live:
    """For a VM nobody supervises any more: if its QEMU has ended, record that (with the
    exit status a zombie still carries), mark it stopped and run its cleanup. Call it under
    the VM's lock. Returns the live view after."""
    live = inspect(d)
    if live.alive or live.record.state in FINAL:
        return live
    rec = live.record
    ex = Exit(time=time.time(), pid=rec.qemu.pid if rec.qemu else 0, reason="unsupervised")
    if rec.qemu is not None:
        st = read_stat(rec.qemu.pid)
        same = st is not None and st.zombie and st.start_ticks == rec.qemu.start_ticks
        if same and st is not None and st.exit_code is not None:
            ex.code, ex.signal = decode_wait_status(st.exit_code)
    log(d, f"QEMU is gone and no supervisor recorded it: {ex.describe()}", log_who)
    remove_sockets(d)
    errors = run_cleanup(d, rec, who=log_who)

    def change(r: Record) -> None:
        if rec.qemu is not None:
            r.exits = (r.exits + [ex])[-KEEP_EXITS:]
        r.qemu = None
        r.supervisor = None
        r.state = STOPPED
        r.runstate = None
        r.health = Health()
        if errors:
            r.cleanup_errors = errors

    update(d, change)
    return inspect(d)


def remove_sockets(d: Path) -> None:
    for s in ("qmp.sock", "console.sock"):
        with contextlib.suppress(FileNotFoundError):
            (d / s).unlink()


def run_cleanup(d: Path, rec: Record, who: str = "qlaunch") -> list[str]:
    """Run the VM's cleanup hooks: each {"call": "package.module:function", "args": [...],
    "what": "a few words"} is imported and called with args. Returns the failures (each is
    also logged); one failing hook does not stop the others. Hooks must be idempotent: the
    supervisor runs them when the VM ends for good, or `stop`/`rm` when the supervisor is gone.
    """
    import importlib

    failures: list[str] = []
    for hook in rec.cleanup:
        what = hook.get("what") or hook.get("call", "?")
        try:
            mod_name, _, fn_name = str(hook["call"]).partition(":")
            fn = getattr(importlib.import_module(mod_name), fn_name)
            fn(*hook.get("args", []))
            log(d, f"cleanup: {what}: done", who)
        except (QlaunchError, OSError, ImportError, AttributeError, KeyError, TypeError) as e:
            msg = f"cleanup: {what}: {getattr(e, 'message', None) or e}"
            log(d, msg, who)
            failures.append(msg)
    return failures


# ---- locks ---------------------------------------------------------------------------------


class FileLock:
    """An exclusive flock on a file, waited for up to `timeout` seconds. The holder writes
    who it is into the file, so that a waiter that gives up can name it:
    "VM web is busy: pid 1234 (qlaunch stop web) has held its lock for 12 s"."""

    def __init__(self, path: Path, what: str, purpose: str, timeout: float = 30.0) -> None:
        self.path = path
        self.what = what
        self.purpose = purpose
        self.timeout = timeout
        self.fd = -1

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise self._busy(fd) from None
                        time.sleep(0.02)
            except BaseException:
                os.close(fd)
                raise
            # The holder before us may have removed the lock file (unlink_locked) while we
            # waited on it: then ours is a lock on nothing, and the file at the path is the one
            # to take.
            if _same_file(self.path, fd):
                break
            os.close(fd)
        holder = {
            "pid": os.getpid(),
            "purpose": self.purpose,
            "command": " ".join(sys.argv)[:200],
            "since": time.time(),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd = fd

    def unlink_locked(self) -> None:
        """Remove the lock file while holding it (waiters notice and start over), so that
        locks of things that are gone do not pile up."""
        if self.fd >= 0 and _same_file(self.path, self.fd):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock
            self.fd = -1

    def _busy(self, fd: int) -> StateError:
        try:
            h = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            h = {}
        if h.get("pid"):
            age = time.time() - float(h.get("since") or time.time())
            who = f"pid {h['pid']} ({h.get('purpose', '?')}: {h.get('command', '?')})"
            return StateError(
                f"{self.what} is busy: {who} has held its lock for {age:.0f} s",
                hint="wait for it to finish and retry; if that process hangs, end it",
            )
        return StateError(f"{self.what} is busy: another process holds its lock")

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def held_by_other(path: Path) -> bool:
    """Whether someone holds the flock on path (we take it for an instant to find out)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(
    name: str, purpose: str, timeout: float = 30.0, base: Path | None = None
) -> Iterator[Path]:
    """Hold the VM's lock (state changes: start, stop, rm...). Yields the VM's directory,
    which may not exist yet."""
    r = base or root(create=True)
    if base is not None:
        (r / ".locks").mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = FileLock(r / ".locks" / f"{validate_name(name)}.lock", f"VM {name}", purpose, timeout)
    with lock:
        d = r / name
        _clear_leftover(d)
        try:
            yield d
        finally:
            # Lock files do not outlive their holder, so none piles up (for VMs removed, starts
            # that failed, names that never were); waiters notice and take the next one.
            lock.unlink_locked()


def _same_file(path: Path, fd: int) -> bool:
    try:
        a, b = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _clear_leftover(d: Path) -> None:
    """A VM directory without a record, found under the VM's lock, is what a start killed
    before it wrote one left (every start writes the record before it lets the lock go)."""
    if d.is_dir() and not (d / "state.json").exists():
        shutil.rmtree(d, ignore_errors=True)


def sweep(base: Path | None = None) -> None:
    """Clear what killed commands left under the state root: VM directories without a record
    and lock files without a VM, each only when nobody holds its lock."""
    r = base or root()
    try:
        entries = os.listdir(r)
        lock_names = os.listdir(r / ".locks")
    except FileNotFoundError:
        return
    except OSError as e:
        raise _root_error(r, e.strerror or str(e)) from None
    leftovers = {e for e in entries if not (r / e / "state.json").exists()}
    stale = {n.removesuffix(".lock") for n in lock_names if n.endswith(".lock")}
    for name in sorted(leftovers | stale):
        if not NAME_RE.fullmatch(name) or name in RESERVED or (r / name / "state.json").exists():
            continue
        with contextlib.suppress(StateError, OSError), locked(name, "sweep", 0.0, r):
            pass
