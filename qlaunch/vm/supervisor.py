"""The per-VM supervisor: QEMU's parent, its exits' recorder, its restart policy.

`vm.start` runs `python -S -m qlaunch.vm.supervisor VMDIR READY_FD GO_FD` in a new session
(early, so that the interpreter starts while `start` prepares the VM); the supervisor forks
once more so that nobody's child it is, waits for "go" on GO_FD (EOF: `start` failed, leave),
and from then on it

- starts QEMU from argv.json, paused (-S), in its own process group, with a private QMP
  monitor on fd `record.monitor_fd` (one end of a socketpair: no path, no other client),
  stdout and stderr to qemu.log; then reads the greeting, negotiates and `cont`s (unless
  the VM starts paused) and writes one JSON line to READY_FD: {"ok": true, "pid": N} or
  {"ok": false, "error": "..."};
- records every QMP event in events.jsonl and the run state (running, paused...) in the
  record, so `list` needs no QMP; pings the monitor every PING_INTERVAL seconds and marks the
  record unhealthy if QEMU does not answer (unless a client holds qmp.lock: then QEMU may be
  busy for that client);
- waits for QEMU's end (a pidfd), records it (time, exit code or signal, the SHUTDOWN reason),
  and applies the restart policy: `no`; `on-failure` (a signal, a non-zero code, or a guest
  reset/panic, see state.Exit.failed); `always` (unless `stop` asked). Restarts back off
  (BACKOFF_FIRST doubling up to BACKOFF_MAX) and CRASH_LOOP_EXITS exits within
  CRASH_LOOP_WINDOW seconds end in state `failed`;
- when the VM ends for good: removes the sockets, runs the cleanup hooks, writes the final
  state, exits.

If the supervisor dies, QEMU keeps running (its own process group; nothing ties it to us) and
the CLI still finds it by identity; `stop` then waits for it by polling and settles the record.

It must stay small (goal: 25 MB RSS or less): standard library only, no asyncio, no qemu.qmp,
no psutil, no subprocess; QEMU starts with os.posix_spawn because the monitor's fd has to land
on a fixed number in the child.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from qlaunch.vm import state

READY_TIMEOUT = 60.0  # QEMU's greeting and the answer to cont
PING_INTERVAL = 15.0
PING_TIMEOUT = 10.0
CRASH_LOOP_EXITS = 5
CRASH_LOOP_WINDOW = 60.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
EVENTS_MAX_BYTES = 4 << 20  # then events.jsonl becomes events.jsonl.1


def run_state_of(qemu_status: str) -> str:
    """QEMU's query-status `status` -> our state."""
    if qemu_status == "running":
        return state.RUNNING
    if qemu_status in ("internal-error", "io-error", "guest-panicked", "watchdog"):
        return state.ERROR
    return state.PAUSED


def _placed(spec: Any) -> Any:
    """QEMU inherits the VM's cgroups and CPU affinity (qlaunch.vm.resources); imported only
    for VMs that have [resources], to keep the supervisor small."""
    if not spec:
        return contextlib.nullcontext()
    from qlaunch.vm import resources

    return resources.placed(spec)


class Monitor:
    """Just enough QMP for the supervisor: newline-delimited JSON over a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.buf = b""
        self.n = 0
        self.eof = False
        self.queue: list[dict[str, Any]] = []  # read, not yet handled (nothing is dropped)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, command: str, tag: str) -> str:
        self.n += 1
        mid = f"{tag}-{self.n}"
        msg = json.dumps({"execute": command, "id": mid}).encode() + b"\n"
        try:
            self.sock.sendall(msg)
        except OSError:
            self.eof = True
        return mid

    def fill(self) -> None:
        """Queue whatever complete messages have arrived; sets eof when QEMU hung up."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    self.eof = True
                    break
                self.buf += chunk
        except BlockingIOError:
            pass
        except OSError:
            self.eof = True
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            line = line.strip()
            if line:
                try:
                    self.queue.append(json.loads(line))
                except ValueError:
                    continue

    def close(self) -> None:
        self.sock.close()


class Supervisor:
    def __init__(self, d: Path, ready_fd: int) -> None:
        self.d = d
        self.ready_fd = ready_fd
        self.rec = state.read_record(d)
        self.pid = 0
        self.pidfd = -1
        self.mon: Monitor | None = None
        self.shutdown_reason: str | None = None
        self.started = 0.0
        self.pending: dict[str, float] = {}  # query-status ids sent -> when
        self.next_ping = 0.0
        self.events_fd = -1
        self.log_offset = 0
        self.helpers: list[int] = []  # pids of the plan's helpers (swtpm), ours to reap

    # -- the record

    def change(self, fn: Any) -> None:
        self.rec = state.update(self.d, fn)

    def log(self, msg: str) -> None:
        state.log(self.d, msg, "supervisor")

    # -- launching

    def spawn(self) -> None:
        argv = json.loads((self.d / "argv.json").read_text())
        # A QEMU killed with SIGKILL leaves its socket files; the next one must bind afresh.
        state.remove_sockets(self.d)
        self.start_helpers()
        parent, child = socket.socketpair()
        os.set_inheritable(child.fileno(), True)
        for fd in self.rec.fds:
            os.set_inheritable(fd, True)
        logfd = os.open(
            self.d / "qemu.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            os.write(logfd, f"--- qlaunch: QEMU start at {stamp} ---\n".encode())
            self.log_offset = os.fstat(logfd).st_size
            actions = [
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, logfd, 1),
                (os.POSIX_SPAWN_DUP2, logfd, 2),
                (os.POSIX_SPAWN_DUP2, child.fileno(), self.rec.monitor_fd),
            ]
            # Its own process group: a signal aimed at ours (kill -- -PGID) must not end QEMU.
            with _placed(self.rec.resources):
                self.pid = os.posix_spawnp(
                    argv[0],
                    argv,
                    dict(os.environ),
                    file_actions=actions,
                    setpgroup=0,
                    setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGHUP, signal.SIGINT),
                )
        finally:
            os.close(logfd)
            child.close()
        self.pidfd = os.pidfd_open(self.pid)
        self.mon = Monitor(parent)
        self.started = time.time()
        self.shutdown_reason = None
        self.pending = {}
        proc = state.proc_of(self.pid)

        def ch(r: state.Record) -> None:
            r.qemu = proc
            r.started_at = self.started
            r.runstate = "prelaunch"
            r.health = state.Health()

        self.change(ch)
        self.log(f"QEMU started, pid {self.pid}")

    def start_helpers(self) -> None:
        """The plan's helper processes (swtpm), each ready (its socket there) before QEMU
        starts; they end when QEMU's connection to them closes (reaped in reap())."""
        try:
            helpers = json.loads((self.d / "plan.json").read_text()).get("helpers") or []
        except (OSError, ValueError):
            helpers = []
        for h in helpers:
            os.makedirs(h["state"], mode=0o700, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(h["ready"])
            logfd = os.open(
                self.d / "helpers.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
            try:
                actions = [
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, logfd, 1),
                    (os.POSIX_SPAWN_DUP2, logfd, 2),
                ]
                pid = os.posix_spawnp(
                    h["argv"][0], h["argv"], dict(os.environ), file_actions=actions, setpgroup=0
                )
            finally:
                os.close(logfd)
            self.helpers.append(pid)
            deadline = time.monotonic() + 10.0
            while not os.path.exists(h["ready"]):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done or time.monotonic() > deadline:
                    if done:
                        self.helpers.remove(pid)
                    self.stop_helpers()
                    raise OSError(f"{h['what']} did not start (see {self.d / 'helpers.log'})")
                time.sleep(0.01)
            self.log(f"{h['what']} started, pid {pid}")

    def stop_helpers(self) -> None:
        """Reap the helpers: gone with QEMU's connection as a rule; else asked, then made to."""
        for pid in self.helpers:
            for sig in (0, signal.SIGTERM, signal.SIGKILL):
                if sig:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                deadline = time.monotonic() + 2.0
                done = 0
                while time.monotonic() < deadline:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                    if done:
                        break
                    time.sleep(0.02)
                if done:
                    break
        self.helpers = []

    def launch(self) -> str | None:
        """Start QEMU and bring it to running (or paused); None, or why it failed (QEMU has
        been reaped and its exit recorded then)."""
        try:
            self.spawn()
        except OSError as e:
            self.stop_helpers()
            why = f"cannot start {self.argv0()}: {e.strerror or e}"
            ex = state.Exit(time=time.time(), pid=0, reason="not-started")

            def ch(r: state.Record) -> None:
                r.exits = (r.exits + [ex])[-state.KEEP_EXITS :]

            self.change(ch)
            self.log(why)
            return why
        assert self.mon is not None
        deadline = time.monotonic() + READY_TIMEOUT
        step = "greeting"
        waiting: str | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.log(f"QEMU gave no QMP {step} within {READY_TIMEOUT:.0f} s; killing it")
                os.kill(self.pid, signal.SIGKILL)
                self.reap()
                return f"QEMU did not answer QMP within {READY_TIMEOUT:.0f} s"
            fds = [self.pidfd] + ([] if self.mon.eof else [self.mon.fileno()])
            ready, _, _ = select.select(fds, [], [], left)
            if self.pidfd in ready:
                ex = self.reap()
                return self.qemu_error() or f"QEMU ended at start: {ex.describe()}"
            self.mon.fill()
            while self.mon.queue:
                m = self.mon.queue.pop(0)
                if "QMP" in m and step == "greeting":
                    step, waiting = "negotiation", self.mon.send("qmp_capabilities", "init")
                elif "event" in m:
                    self.on_event(m)
                elif m.get("id") in self.pending:
                    self.on_reply(m)
                elif m.get("id") == waiting and "error" in m:
                    os.kill(self.pid, signal.SIGKILL)
                    self.reap()
                    return f"QMP {step} failed: {m['error'].get('desc')}"
                elif m.get("id") == waiting and step == "negotiation":
                    if self.rec.start_paused:
                        self.running("paused")
                        return None
                    step, waiting = "cont", self.mon.send("cont", "init")
                elif m.get("id") == waiting and step == "cont":
                    self.running("running")
                    return None

    def running(self, qemu_status: str) -> None:
        """QEMU is up: record its run state."""

        def ch(r: state.Record) -> None:
            r.state = run_state_of(qemu_status)
            r.runstate = qemu_status

        self.change(ch)
        self.next_ping = time.monotonic() + PING_INTERVAL

    def argv0(self) -> str:
        try:
            return str(json.loads((self.d / "argv.json").read_text())[0])
        except (OSError, ValueError, IndexError):
            return "QEMU"

    def qemu_error(self) -> str | None:
        """QEMU's own last words from this launch, as one line."""
        try:
            with open(self.d / "qemu.log", "rb") as f:
                f.seek(self.log_offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return None
        lines = [x.strip() for x in text.splitlines() if x.strip()]
        return "; ".join(lines[-3:]) if lines else None

    # -- running

    def on_event(self, m: dict[str, Any]) -> None:
        self.record_event(m)
        ev = m.get("event")
        if ev == "SHUTDOWN":
            self.shutdown_reason = (m.get("data") or {}).get("reason")
        elif ev == "GUEST_PANICKED":
            self.shutdown_reason = "guest-panic"
        elif ev in ("STOP", "RESUME"):
            # Ask for the exact run state (paused, suspended, inmigrate...), not a guess.
            self.query_status("status")

    def query_status(self, tag: str) -> None:
        if self.mon is not None and not self.mon.eof and len(self.pending) < 8:
            self.pending[self.mon.send("query-status", tag)] = time.monotonic()

    def record_event(self, m: dict[str, Any]) -> None:
        path = self.d / "events.jsonl"
        if self.events_fd < 0:
            self.events_fd = os.open(
                path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        os.write(self.events_fd, json.dumps(m, separators=(",", ":")).encode() + b"\n")
        if os.fstat(self.events_fd).st_size > EVENTS_MAX_BYTES:
            os.close(self.events_fd)
            self.events_fd = -1
            os.replace(path, path.with_name("events.jsonl.1"))

    def on_reply(self, m: dict[str, Any]) -> None:
        if m.get("id") not in self.pending:
            return
        # QEMU answers a monitor in order: whatever was sent before has been answered too.
        self.pending.clear()
        ret = m.get("return")
        if not isinstance(ret, dict):
            return
        status = str(ret.get("status", ""))
        new_state = run_state_of(status)
        now = time.time()
        if (
            status != self.rec.runstate
            or new_state != self.rec.state
            or not self.rec.health.ok
            or now - (self.rec.health.checked_at or 0) > 10 * PING_INTERVAL
        ):

            def ch(r: state.Record) -> None:
                r.runstate, r.state = status, new_state
                r.health = state.Health(ok=True, checked_at=now)

            self.change(ch)

    def ping(self) -> None:
        assert self.mon is not None
        now = time.monotonic()
        overdue = bool(self.pending) and now - min(self.pending.values()) > PING_TIMEOUT
        # A client holding qmp.lock may be running something long; no verdict then.
        judge = overdue and not self.mon.eof and self.rec.health.ok
        if judge and not state.held_by_other(self.d / "qmp.lock"):
            msg = f"no answer to query-status within {PING_TIMEOUT:.0f} s"
            self.log(f"QMP does not answer: {msg}")

            def ch(r: state.Record) -> None:
                r.health = state.Health(ok=False, checked_at=time.time(), error=msg)

            self.change(ch)
        if now >= self.next_ping:
            self.query_status("ping")
            self.next_ping = now + PING_INTERVAL

    def watch(self) -> state.Exit:
        """Until QEMU ends: events, pings. Returns its recorded exit."""
        assert self.mon is not None
        while True:
            self.dispatch()
            fds = [self.pidfd] + ([] if self.mon.eof else [self.mon.fileno()])
            timeout = max(0.05, min(self.next_ping - time.monotonic(), 1.0))
            ready, _, _ = select.select(fds, [], [], timeout)
            if self.mon.fileno() in ready:
                self.mon.fill()
                self.dispatch()
            if self.pidfd in ready:
                return self.reap()
            self.ping()

    def dispatch(self) -> None:
        assert self.mon is not None
        while self.mon.queue:
            m = self.mon.queue.pop(0)
            if "event" in m:
                self.on_event(m)
            elif "id" in m:
                self.on_reply(m)

    def reap(self) -> state.Exit:
        _, status = os.waitpid(self.pid, 0)
        self.stop_helpers()
        os.close(self.pidfd)
        self.pidfd = -1
        if self.mon is not None:
            self.mon.fill()
            for m in self.mon.queue:
                if "event" in m:
                    self.on_event(m)
            self.mon.close()
            self.mon = None
        code, sig = state.decode_wait_status(status)
        now = time.time()
        ex = state.Exit(
            time=now,
            pid=self.pid,
            code=code,
            signal=sig,
            reason=self.shutdown_reason,
            runtime=round(now - self.started, 3),
        )

        def ch(r: state.Record) -> None:
            r.exits = (r.exits + [ex])[-state.KEEP_EXITS :]
            r.qemu = None
            r.runstate = None
            r.health = state.Health()

        self.change(ch)
        self.log(f"QEMU (pid {self.pid}) ended: {ex.describe()} after {ex.runtime:.1f} s")
        return ex

    # -- policy

    def decide(self, ex: state.Exit) -> tuple[str, float, str]:
        """-> ("restart", delay, why) or (final state, 0, why)."""
        r = self.rec
        if r.stop_requested:
            return state.STOPPED, 0.0, "stop was asked for"
        policy = r.restart_policy
        if policy == "no" or (policy == "on-failure" and not ex.failed):
            return state.STOPPED, 0.0, f"restart policy {policy}"
        recent = [e for e in r.exits if ex.time - e.time <= CRASH_LOOP_WINDOW]
        if len(recent) >= CRASH_LOOP_EXITS:
            why = f"{len(recent)} exits within {CRASH_LOOP_WINDOW:.0f} s: crash loop, giving up"
            return state.FAILED, 0.0, why
        delay = min(BACKOFF_FIRST * 2 ** (len(recent) - 1), BACKOFF_MAX)
        return "restart", delay, f"restart policy {policy}"

    def backoff(self, delay: float) -> bool:
        """Sleep before a restart; False if `stop` asked meanwhile."""
        end = time.monotonic() + delay
        while True:
            self.rec = state.read_record(self.d)
            if self.rec.stop_requested:
                return False
            left = end - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(0.2, left))

    def finish(self, final: str, why: str) -> None:
        if self.events_fd >= 0:
            os.close(self.events_fd)
            self.events_fd = -1
        state.remove_sockets(self.d)
        if self.rec.cleanup:
            _site_packages()
        errors = state.run_cleanup(self.d, self.rec, who="supervisor")

        def ch(r: state.Record) -> None:
            r.state = final
            r.qemu = None
            r.supervisor = None
            r.runstate = None
            r.failed_reason = why if final == state.FAILED else None
            if errors:
                r.cleanup_errors = errors

        self.change(ch)
        self.log(f"VM {final}: {why}")

    def tell(self, msg: dict[str, Any]) -> None:
        if self.ready_fd >= 0:
            # If `start` gave up waiting the write fails; the record says the rest.
            with contextlib.suppress(OSError):
                os.write(self.ready_fd, json.dumps(msg).encode() + b"\n")
            os.close(self.ready_fd)
            self.ready_fd = -1

    def run(self) -> int:
        me = state.proc_of(os.getpid())

        def ch(r: state.Record) -> None:
            r.supervisor = me

        self.change(ch)
        error = self.launch()
        if error is not None:
            self.finish(state.STOPPED, f"QEMU did not start: {error}")
            self.tell({"ok": False, "error": error})
            return 1
        self.tell({"ok": True, "pid": self.pid})
        while True:
            ex = self.watch()
            while True:
                verdict, delay, why = self.decide(ex)
                if verdict != "restart":
                    self.finish(verdict, f"{why} (last exit: {ex.describe()})")
                    return 0

                def ch2(r: state.Record) -> None:
                    r.state = state.RESTARTING

                self.change(ch2)
                self.log(f"restarting in {delay:.1f} s ({why}; {ex.describe()})")
                if not self.backoff(delay):
                    self.finish(state.STOPPED, "stop was asked for while restarting")
                    return 0

                def ch3(r: state.Record) -> None:
                    r.restart_count += 1

                self.change(ch3)
                error = self.launch()
                if error is None:
                    break
                self.log(f"restart failed: {error}")
                last = self.rec.last_exit
                if last is None:
                    self.finish(state.FAILED, f"restart failed: {error}")
                    return 0
                ex = last


def _site_packages() -> None:
    """Cleanup hooks may import third-party packages (qlaunch.net.attach:release_nics needs
    pyroute2 and psutil). `-S` keeps site-packages off sys.path while the supervisor runs, to
    keep it small; at its end it can afford them."""
    if sys.flags.no_site:
        import site

        site.main()


def wait_for_go(go_fd: int) -> bool:
    """True once `start` says go; False if it closed the pipe without a word (it failed)."""
    buf = b""
    while b"\n" not in buf:
        chunk = os.read(go_fd, 16)
        if not chunk:
            break
        buf += chunk
    os.close(go_fd)
    return buf.startswith(b"go")


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m qlaunch.vm.supervisor VMDIR READY_FD GO_FD", file=sys.stderr)
        return 2
    d, ready_fd, go_fd = Path(argv[0]), int(argv[1]), int(argv[2])
    os.umask(0o077)
    # QEMU must not inherit the ready pipe: start would then see no EOF if we die.
    os.set_inheritable(ready_fd, False)
    os.set_inheritable(go_fd, False)
    # Fork once more: the supervisor is then nobody's child (start's caller may be a
    # long-lived program that waits for its children or never does).
    if os.fork() > 0:
        os._exit(0)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not wait_for_go(go_fd):
        return 0
    # From here on our output belongs in the VM's directory, not on start's stderr (which
    # may be a pipe its caller reads to the end).
    log = os.open(
        d / "supervisor.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
    )
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    try:
        sup = Supervisor(d, ready_fd)
    except BaseException as e:
        os.write(ready_fd, json.dumps({"ok": False, "error": f"supervisor: {e!r}"}).encode())
        raise
    try:
        return sup.run()
    except BaseException as e:
        sup.tell({"ok": False, "error": f"supervisor failed: {e!r}"})
        raise


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
