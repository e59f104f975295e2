"""Background VMs: start, list, status, stop, rm, kill, qmp, events, pause, resume, console, log.

Handlers import what they need when they run: `qlaunch list` must answer for 20 VMs in well
under 0.2 s, so nothing here pulls in qemu.qmp, psutil or pyroute2 at import time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from qlaunch.cli import output
from qlaunch.cli.argtypes import non_negative, positive
from qlaunch.cli.commands.core import add_set_arg
from qlaunch.errors import StateError, UsageError

EXAMPLES = """\
examples:
  qlaunch start default --name web                  boot in the background; prints the name
  qlaunch start default --name job -- sleep 60      run a command in the guest, then power off
  qlaunch start default --name db --netns lab0 --set net.0.mode=network --set net.0.network=lan
                                                    on network lan, inside namespace lab0
  qlaunch list                                      name, state, pid, uptime, CPU, RSS, restarts
  qlaunch status web --json                         plus query-status, QEMU version, last exits
  qlaunch console web                               the serial console (Ctrl-] detaches)
  qlaunch qmp web query-block                       any QMP command; the reply as JSON
  qlaunch qmp web device_del '{"id": "nic1"}'
  qlaunch events web --follow                       QMP events as they come
  qlaunch stop web                                  agent or ACPI, then quit, SIGTERM, SIGKILL
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "start",
        help="start a VM in the background",
        description="Start a VM in the background under a small supervisor of its own. Returns "
        "once QEMU runs and has answered QMP, and prints the VM's name.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("profile", help="profile name or path")
    p.add_argument("--name", help="VM name: 1-64 of A-Z a-z 0-9 - _ (default: PROFILE-xxxxxx)")
    add_set_arg(p)
    p.add_argument(
        "--restart",
        default="no",
        choices=["no", "on-failure", "always"],
        help="restart QEMU when it ends: on-failure (a signal, a non-zero exit, a guest reset "
        "or panic) or always (but not after `qlaunch stop`); 5 exits in 60 s: state failed",
    )
    p.add_argument(
        "--paused", action="store_true", help="leave the guest paused (resume starts it)"
    )
    p.add_argument(
        "--runas",
        metavar="USER",
        help="QEMU drops root for USER once its files, sockets and cgroups are set up",
    )
    p.add_argument(
        "--netns",
        metavar="NAME",
        help="run QEMU in network namespace NAME (ip netns add NAME), with its taps and "
        "networks (default: $QLAUNCH_NETNS); later commands find the VM without it",
    )
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("list", aliases=["ls"], help="list VMs (no QMP: fast)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("status", help="one VM in detail, with QMP query-status")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "stop",
        help="stop a VM: guest agent or ACPI powerdown, then quit, SIGTERM, SIGKILL",
        description="Stop a VM by the ladder: when a guest agent answers, guest-shutdown and "
        "wait up to --timeout; ACPI system_powerdown and wait up to --timeout; QMP quit and "
        "wait; SIGTERM and wait; SIGKILL. Each step is reported on stderr. Stopping a stopped "
        "VM is not an error.",
    )
    p.add_argument("name")
    p.add_argument(
        "--timeout",
        type=non_negative(float),
        default=60.0,
        help="seconds to wait for the guest agent's and for ACPI's shutdown (60 each)",
    )
    p.add_argument(
        "--mode",
        default="agent,acpi",
        metavar="agent,acpi",
        help="the graceful steps to try, comma-separated (default agent,acpi: the agent "
        "when one answers, then ACPI)",
    )
    p.add_argument("--force", action="store_true", help="skip the agent and ACPI: start with quit")
    p.add_argument("--json", action="store_true", help="the steps as JSON on stdout")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser(
        "rm",
        help="remove a stopped VM's state",
        description="Remove a stopped VM: its runtime state and logs, and its persistent data "
        "(UEFI variables, TPM state) unless --keep-data.",
    )
    p.add_argument("names", nargs="+", metavar="name")
    p.add_argument("--force", "-f", action="store_true", help="stop it first (no ACPI)")
    p.add_argument(
        "--keep-data",
        action="store_true",
        help="keep its UEFI variables and TPM state for a later start of that name",
    )
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser(
        "kill",
        help="send QEMU a signal (default SIGKILL); the restart policy applies",
        description="Send the VM's QEMU a signal after checking it is that QEMU (pid, start "
        "time, uuid). The restart policy then applies; `stop --force` ends a VM for good.",
    )
    p.add_argument("name")
    p.add_argument("--signal", "-s", default="KILL", help="name or number (default KILL)")
    p.set_defaults(func=cmd_kill)

    p = sub.add_parser(
        "qmp",
        help="run one QMP command; prints the reply as JSON",
        description="Run one QMP command. ARGS is a JSON object. Timeouts by command: 10 s "
        "for queries, 600 s for migration, block jobs, snapshots and device changes, 60 s for "
        "quit (EOF counts as success).",
    )
    p.add_argument("name")
    p.add_argument("command")
    p.add_argument("args", nargs="?", help="JSON object of arguments")
    p.add_argument("--timeout", type=positive(float), help="seconds to wait for the reply")
    p.set_defaults(func=cmd_qmp)

    p = sub.add_parser("events", help="QMP events the supervisor recorded (--follow: and new)")
    p.add_argument("name")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("pause", help="pause the guest's CPUs (QMP stop)")
    p.add_argument("name")
    p.set_defaults(func=cmd_pause)

    p = sub.add_parser("resume", help="resume the guest's CPUs (QMP cont)")
    p.add_argument("name")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser(
        "console",
        help="attach to the serial console (Ctrl-] detaches)",
        description="Attach to the VM's serial console. On a terminal it is raw; Ctrl-] "
        "detaches. Otherwise stdin is sent, and output is copied until --linger seconds pass "
        "without any after stdin ends.",
    )
    p.add_argument("name")
    p.add_argument(
        "--linger", type=non_negative(float), default=1.0, help="see above (default 1 s)"
    )
    p.set_defaults(func=cmd_console)

    p = sub.add_parser("log", help="the console log (or QEMU's or the lifecycle log)")
    p.add_argument("name")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until it ends")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--qemu", action="store_true", help="QEMU's stderr")
    which.add_argument("--lifecycle", action="store_true", help="starts, exits, stop steps")
    p.set_defaults(func=cmd_log)


def _vm(name: str) -> Any:
    from qlaunch.vm.api import VM

    return VM.get(name)


def _no_cmd(args: argparse.Namespace) -> None:
    if args.guest_cmd is not None:
        raise UsageError(f"`qlaunch {args.command}` takes no command after --")


# ---- start, list, status -------------------------------------------------------------------


def cmd_start(args: argparse.Namespace) -> int:
    from qlaunch.vm import state
    from qlaunch.vm.api import VM

    if args.name is not None:
        state.validate_name(args.name, new=True)

    vm = VM.start(
        args.profile,
        args.name,
        sets=args.sets,
        restart=args.restart,
        cmd=args.guest_cmd or None,
        paused=args.paused,
        note=output.note,
        runas=args.runas,
        netns=args.netns,
    )
    print(vm.name)
    return 0


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def cmd_list(args: argparse.Namespace) -> int:
    from qlaunch.vm import state
    from qlaunch.vm.api import list_vms

    _no_cmd(args)
    state.sweep()
    rows = list_vms()
    if args.json:
        output.emit_json([r.to_json() for r in rows])
        return 0
    table = [
        {
            "name": r.name,
            "state": r.state,
            "pid": r.pid or "-",
            "uptime": human_duration(r.uptime),
            "cpu%": "-" if r.cpu_percent is None else f"{r.cpu_percent:.1f}",
            "rss": human_bytes(r.rss),
            "restarts": r.restarts,
            "profile": r.profile,
        }
        for r in rows
    ]
    output.table(table, ["name", "state", "pid", "uptime", "cpu%", "rss", "restarts", "profile"])
    for r in rows:
        if r.note:
            print(f"qlaunch: {r.name}: {r.note}", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    _no_cmd(args)
    st = _vm(args.name).status()
    if args.json:
        output.emit_json(st)
        return 0
    out = [
        ("name", st["name"]),
        ("state", st["state"] + (f" ({st['note']})" if st["note"] else "")),
        ("profile", st["profile"]),
        ("pid", st["pid"] or "-"),
        ("uptime", human_duration(st["uptime"])),
        ("cpu", "-" if st["cpu_percent"] is None else f"{st['cpu_percent']:.1f}%"),
        ("rss", human_bytes(st["rss"])),
        ("restart", f"{st['restart_policy']}, {st['restarts']} restarts"),
        ("supervisor", _sup(st["supervisor"])),
        ("qmp status", _qmp_status(st)),
        ("qemu", st["qemu_version"] or "-"),
        ("uuid", st["uuid"]),
        ("qmp socket", st["sockets"]["qmp"]),
        ("console", st["sockets"]["console"]),
        ("logs", st["dir"]),
    ]
    if st["failed_reason"]:
        out.append(("failed", st["failed_reason"]))
    if st.get("netns"):
        out.append(("netns", st["netns"]))
    for i, nic in enumerate(st.get("nics") or []):
        out.append((f"nic {i}", _nic_line(nic)))
    if st.get("sockets", {}).get("agent") and st.get("pid"):
        out.append(("agent", _agent_line(st.get("agent"))))
    if st.get("addresses"):
        out.append(("addresses", ", ".join(_address(a) for a in st["addresses"])))
    for dev in st.get("hotplug") or []:
        what = dev.get("path") or f"{dev.get('mode')} NIC, MAC {dev.get('mac')}"
        out.append(("hotplugged", f"{dev['id']}: {dev['kind']} {what}"))
    width = max(len(k) for k, _ in out)
    for k, v in out:
        print(f"{k + ':':<{width + 1}} {v}")
    if st["exits"]:
        print("last exits:")
        for e in st["exits"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))
            print(f"  {when}  pid {e['pid']}: {e['describe']}")
    return 0


def _agent_line(answering: bool | None) -> str:
    if answering:
        return "answering"
    return "not answering (qemu-ga not installed, or the guest still booting)"


def _address(a: dict[str, Any]) -> str:
    addr = f"{a['address']}/{a['prefix']}" if a.get("prefix") is not None else a["address"]
    where = a.get("interface") or a.get("mac")
    return f"{addr} ({where}, {a['source']})" if where else f"{addr} ({a['source']})"


def _nic_line(nic: dict[str, Any]) -> str:
    if nic.get("network"):
        head = f"network {nic['network']}"
    elif nic.get("bridge"):
        head = f"host bridge {nic['bridge']}"
    else:
        head = str(nic.get("mode", "?"))
    parts = [head, nic.get("tap") and f"tap {nic['tap']}"]
    parts += [f"MAC {nic.get('mac')}", nic.get("lease") and f"leased {nic['lease']}"]
    return ", ".join(str(x) for x in parts if x)


def _sup(s: dict[str, Any]) -> str:
    if s["alive"]:
        return f"pid {s['pid']}"
    return "gone (QEMU runs on; exits are not recorded)" if s["pid"] else "-"


def _qmp_status(st: dict[str, Any]) -> str:
    if st["qmp"]:
        return str(st["qmp"].get("status"))
    return st["qmp_error"] or "-"


# ---- stop, rm, kill ------------------------------------------------------------------------


def cmd_stop(args: argparse.Namespace) -> int:
    from qlaunch.vm import stop

    _no_cmd(args)
    modes = stop.check_modes([m.strip() for m in args.mode.split(",")])
    vm = _vm(args.name)
    report = stop.stop(
        vm,
        timeout=args.timeout,
        force=args.force,
        on_step=lambda m: output.note(f"{vm.name}: {m}"),
        modes=modes,
    )
    if args.json:
        output.emit_json(report.to_json())
    elif report.note:
        output.note(f"{vm.name}: {report.note}")
    if not args.json and report.exit and report.steps:
        output.note(f"{vm.name}: {report.state}: {report.exit.describe()}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from qlaunch.vm.api import VM

    _no_cmd(args)
    for name in args.names:
        VM(name).remove(force=args.force, keep_data=args.keep_data)
    return 0


def parse_signal(text: str) -> int:
    import signal

    t = text.strip().upper()
    if t.isascii() and t.isdigit():
        if int(t) in signal.valid_signals():
            return int(t)
        raise UsageError(
            f"{text!r} is not a signal number here",
            hint=f"1 to {int(max(signal.valid_signals()))}, or a name: KILL, TERM",
        )
    if not t.startswith("SIG"):
        t = "SIG" + t
    try:
        return int(signal.Signals[t])
    except KeyError:
        raise UsageError(f"{text!r} is not a signal", hint="e.g. KILL, TERM, 9") from None


def cmd_kill(args: argparse.Namespace) -> int:
    _no_cmd(args)
    sig = parse_signal(args.signal)
    _vm(args.name).kill(sig)
    return 0


# ---- QMP -----------------------------------------------------------------------------------


def cmd_qmp(args: argparse.Namespace) -> int:
    _no_cmd(args)
    qargs: dict[str, Any] = {}
    if args.args:
        try:
            qargs = json.loads(args.args)
        except ValueError as e:
            raise UsageError(f"ARGS is not JSON: {e}") from None
        if not isinstance(qargs, dict):
            raise UsageError('ARGS must be a JSON object, e.g. \'{"id": "nic1"}\'')
    reply = _vm(args.name).qmp(args.command, qargs, timeout=args.timeout)
    output.emit_json(reply)
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    _no_cmd(args)
    vm = _vm(args.name)
    vm.pause()
    print(vm.name)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    _no_cmd(args)
    vm = _vm(args.name)
    vm.resume()
    print(vm.name)
    return 0


def _print_event(ev: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(ev, separators=(",", ":")), flush=True)
        return
    ts = ev.get("timestamp") or {}
    t = float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1e6):06d}"
    data = json.dumps(ev["data"], separators=(",", ":")) if ev.get("data") else ""
    print(f"{when}  {ev.get('event')}  {data}".rstrip(), flush=True)


def cmd_events(args: argparse.Namespace) -> int:
    _no_cmd(args)
    vm = _vm(args.name)
    for ev in vm.events():
        _print_event(ev, args.json)
    if not args.follow:
        return 0
    path = vm.dir / "events.jsonl"
    live = vm.live()
    if live.qemu is not None and live.supervisor is None:
        output.note(f"{vm.name}: its supervisor is gone, so events come straight from QMP")
        return _follow_qmp(vm, args.json)
    pos = path.stat().st_size if path.exists() else 0
    ino = path.stat().st_ino if path.exists() else None
    last_check = 0.0
    while True:
        try:
            st = path.stat()
        except FileNotFoundError:
            st = None
        if st is not None and (st.st_ino != ino or st.st_size < pos):
            ino, pos = st.st_ino, 0  # rotated: the new file starts over
        if st is not None and st.st_size > pos:
            with open(path, "rb") as f:
                f.seek(pos)
                data = f.read()
            end = data.rfind(b"\n") + 1
            pos += end
            for line in data[:end].splitlines():
                try:
                    _print_event(json.loads(line), args.json)
                except ValueError:
                    continue
        now = time.monotonic()
        if now - last_check > 1.0:
            last_check = now
            if not vm.live().alive:
                return 0
        time.sleep(0.2)


def _follow_qmp(vm: Any, as_json: bool) -> int:
    from qlaunch.vm.qmp import QMPUnavailable

    with vm.monitor(purpose="events --follow") as mon:
        while True:
            try:
                ev = mon.get_event(1.0)
            except QMPUnavailable:
                return 0
            if ev is not None:
                _print_event(ev, as_json)
            elif vm.live().qemu is None:
                return 0


# ---- console and logs ----------------------------------------------------------------------


def cmd_console(args: argparse.Namespace) -> int:
    import socket

    from qlaunch.vm import state

    _no_cmd(args)
    vm = _vm(args.name)
    live = vm.live()
    if live.qemu is None:
        raise StateError(f"VM {vm.name} is not running (state {live.state})")
    lock = state.FileLock(vm.dir / "console.lock", f"the console of VM {vm.name}", "console", 2.0)
    with lock:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(vm.dir / "console.sock"))
        except OSError as e:
            raise StateError(f"VM {vm.name}: cannot connect to its console: {e.strerror}") from None
        with s:
            if sys.stdin.isatty():
                return _interactive(vm.name, s)
            return _piped(s, args.linger)


DETACH = b"\x1d"  # Ctrl-]


def _interactive(name: str, s: Any) -> int:
    import select
    import termios
    import tty

    fd = sys.stdin.fileno()
    out = sys.stdout.fileno()
    output.note(f"connected to the console of {name}; Ctrl-] detaches")
    saved = termios.tcgetattr(fd)
    try:
        # TCSANOW, not the default TCSAFLUSH: what was typed ahead goes to the guest.
        tty.setraw(fd, termios.TCSANOW)
        while True:
            r, _, _ = select.select([fd, s], [], [])
            if s in r:
                data = s.recv(65536)
                if not data:
                    break
                os.write(out, data)
            if fd in r:
                data = os.read(fd, 1024)
                if not data:
                    break
                if DETACH in data:
                    before = data.split(DETACH, 1)[0]
                    if before:
                        s.sendall(before)
                    break
                s.sendall(data)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
    print(file=sys.stderr)
    output.note(f"detached from {name}")
    return 0


def _piped(s: Any, linger: float) -> int:
    import select

    fd = sys.stdin.fileno()
    out = sys.stdout.buffer
    stdin_open = True
    quiet_since = time.monotonic()
    while True:
        watch = [s] + ([fd] if stdin_open else [])
        r, _, _ = select.select(watch, [], [], 0.1)
        if s in r:
            data = s.recv(65536)
            if not data:
                return 0
            out.write(data)
            out.flush()
            quiet_since = time.monotonic()
        if stdin_open and fd in r:
            data = os.read(fd, 65536)
            if data:
                s.sendall(data)
            else:
                stdin_open = False
                quiet_since = time.monotonic()
        if not stdin_open and time.monotonic() - quiet_since >= linger:
            return 0


def cmd_log(args: argparse.Namespace) -> int:
    _no_cmd(args)
    vm = _vm(args.name)
    fname = "qemu.log" if args.qemu else "vm.log" if args.lifecycle else "console.log"
    path = vm.dir / fname
    out = sys.stdout.buffer
    pos = 0
    last_check = 0.0
    while True:
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                data = f.read()
        except FileNotFoundError:
            data = b""
        if data:
            out.write(data)
            out.flush()
            pos += len(data)
        if not args.follow:
            return 0
        now = time.monotonic()
        if now - last_check > 1.0:
            last_check = now
            if not data and not vm.live().alive:
                return 0
        time.sleep(0.2)
