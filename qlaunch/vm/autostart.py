"""Autostart: VMs that start again when the host boots and stop gracefully when it shuts down.

    from qlaunch.vm import autostart
    autostart.enable("web")        # the VM exists (qlaunch start ... --name web)
    autostart.list_enabled()       # [Enabled(name="web", unit="qlaunch@web.service", ...)]
    autostart.disable("web")

Through systemd, as libvirt's `autostart` and Proxmox's `onboot` are: qlaunch writes one
template unit, `qlaunch@.service`, into the unit directory (/etc/systemd/system; tests and
unusual set-ups set $QLAUNCH_SYSTEMD_DIR), and per VM the symlink that `systemctl enable`
would make, `multi-user.target.wants/qlaunch@NAME.service`. NAME is escaped as systemd-escape
does it (`-` is `\\x2d`), so that the unit's `%I` gives the VM's name back. The unit runs
`qlaunch autostart start NAME` (Type=oneshot, RemainAfterExit: the supervisor and QEMU stay in
the unit's cgroup) and, at shutdown, `qlaunch stop NAME`, the ladder.

What the unit starts is the VM's definition, written by `enable` under
paths.vm_data_dir(NAME)/definition.json, beside its UEFI variables and TPM state, never in
/run: the profile as it was resolved for the running VM (extends and --set merged), its
command, restart policy, network namespace, --runas user, and the directory its relative paths
were taken from. QLAUNCH_* directories that differ from the defaults go into a drop-in of that
one instance (`qlaunch@NAME.service.d/qlaunch.conf`), so the VM comes back where `qlaunch list`
looks.

No systemctl is needed to write any of it (the files are what `systemctl enable` makes); when
systemd is the init, a daemon-reload follows each change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlaunch import paths, spawn
from qlaunch.errors import HostError, QlaunchError, StateError, UsageError
from qlaunch.vm import state

if TYPE_CHECKING:
    from qlaunch.vm.api import VM

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
TEMPLATE = "qlaunch@.service"
WANTS = "multi-user.target.wants"
DROPIN = "qlaunch.conf"
MARK = "# Written by qlaunch"
DEFINITION = "definition.json"
FORMAT = 1
# Handed on to the unit when set: the VM must come back where `qlaunch list` looks for it.
ENV_KEYS = ("QLAUNCH_STATE", "QLAUNCH_DATA", "QLAUNCH_CONFIG", "QLAUNCH_CACHE")
UNIT_NAME_MAX = 255  # systemd's UNIT_NAME_MAX (256) less the terminating NUL
STOP_ACPI = 60  # `qlaunch stop --timeout` in the unit: what a guest gets to shut down
START_TIMEOUT = 300  # a start waits at most 90 s for QEMU; the rest is slack for a slow boot
Note = Callable[[str], None]


def unit_dir() -> Path:
    """Where the units go: $QLAUNCH_SYSTEMD_DIR, else /etc/systemd/system."""
    env = os.environ.get("QLAUNCH_SYSTEMD_DIR")
    return Path(env) if env else SYSTEM_UNIT_DIR


# ---- names ---------------------------------------------------------------------------------

_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")


def escape(name: str) -> str:
    """systemd-escape NAME (not --path): `/` becomes `-`, a leading `.` and everything outside
    [A-Za-z0-9:_.] becomes \\xNN. So a VM named my-vm is the instance my\\x2dvm, whose %I is
    my-vm again (an instance "my-vm" would unescape to "my/vm")."""
    out = []
    for i, ch in enumerate(name):
        if ch == "/":
            out.append("-")
        elif ch in _PLAIN and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def unescape(instance: str) -> str:
    """What systemd's %I makes of an instance string: \\xNN decoded, `-` read as `/`."""
    out = bytearray()
    i = 0
    while i < len(instance):
        if instance.startswith("\\x", i) and len(instance) >= i + 4:
            try:
                out.append(int(instance[i + 2 : i + 4], 16))
                i += 4
                continue
            except ValueError:
                pass
        out += b"/" if instance[i] == "-" else instance[i].encode()
        i += 1
    return out.decode(errors="replace")


def unit_name(name: str) -> str:
    """qlaunch@ESCAPED.service for VM name; UsageError for a name systemd cannot take."""
    state.validate_name(name)
    unit = f"qlaunch@{escape(name)}.service"
    if len(unit) > UNIT_NAME_MAX:
        raise UsageError(
            f"VM name {name!r} is too long for a systemd unit: escaped (each '-' is \\x2d) "
            f"it makes {unit[:40]}... of {len(unit)} characters, systemd takes {UNIT_NAME_MAX}",
            hint="use a shorter name, or fewer '-'",
        )
    return unit


# ---- the files -----------------------------------------------------------------------------


def qlaunch_command() -> list[str]:
    """The absolute command the unit runs: this qlaunch's console script, else `python -m
    qlaunch` with this interpreter (which has this qlaunch on its path)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "qlaunch" and os.access(argv0, os.X_OK):
        return [os.path.abspath(argv0)]
    beside = Path(sys.executable).parent / "qlaunch"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [os.path.abspath(beside)]
    found = shutil.which("qlaunch")
    if found:
        return [os.path.abspath(found)]
    return [os.path.abspath(sys.executable), "-m", "qlaunch"]


def _word(s: str) -> str:
    """One word of a unit's command line: specifiers (%) and variables ($) kept literal, and
    quoted (C escapes) when it holds what would split or end it."""
    s = s.replace("%", "%%").replace("$", "$$")
    if s and not any(c in s for c in " \t\"'\\;"):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_text(value: str, what: str) -> None:
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise UsageError(f"{what} {value!r} holds a control character; a unit file cannot")


def stop_timeout() -> int:
    """TimeoutStopSec: the whole stop ladder, with room for qlaunch's own start and the
    guest agent's turn before ACPI."""
    from qlaunch.vm import stop

    ladder = STOP_ACPI + stop.QUIT_WAIT + stop.TERM_WAIT + stop.KILL_WAIT + stop.RECORD_WAIT
    return int(ladder) + 60


def template_text(cmd: list[str] | None = None) -> str:
    for c in cmd or []:
        _check_text(c, "the qlaunch command")
    exe = " ".join(_word(c) for c in (cmd or qlaunch_command()))
    return f"""{MARK} (qlaunch autostart enable); it rewrites it, and removes it with the last VM.
[Unit]
Description=qlaunch VM %I
# A VM's user networking, bridges and DHCP want the network up; its disks may be on NFS.
# After nftables.service: a firewall that loads with `flush ruleset` would drop qlaunch's NAT.
Wants=network-online.target
After=network-online.target local-fs.target remote-fs.target
After=systemd-modules-load.service nftables.service

[Service]
# `qlaunch autostart start` returns once QEMU runs; its supervisor and QEMU stay in this
# unit's cgroup until ExecStop has stopped the VM by the ladder (agent, ACPI, quit, signals).
Type=oneshot
RemainAfterExit=yes
ExecStart={exe} autostart start -- %I
ExecStop={exe} stop --timeout {STOP_ACPI} -- %I
TimeoutStartSec={START_TIMEOUT}
TimeoutStopSec={stop_timeout()}

[Install]
WantedBy=multi-user.target
"""


def _env_quote(key: str, value: str) -> str:
    _check_text(value, key)
    v = f"{key}={value}".replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
    return f'Environment="{v}"'


def dropin_text(env: dict[str, str]) -> str | None:
    """The instance's drop-in: the QLAUNCH_* directories set where `enable` ran, or None."""
    lines = [_env_quote(k, os.path.abspath(env[k])) for k in ENV_KEYS if env.get(k)]
    if not lines:
        return None
    return f"{MARK} (qlaunch autostart enable) for this VM.\n[Service]\n" + "\n".join(lines) + "\n"


def _write_durable(path: Path, data: bytes, mode: int = 0o644) -> None:
    """path's new content through a hidden temporary file, fsync and rename: a crash or a power
    cut leaves the old file or the new one (these outlive reboots: that is their point)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise HostError(f"cannot write {path}: {e.strerror}") from None


def _symlink(target: Path, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, link)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise HostError(f"cannot make the link {link}: {e.strerror}") from None


def _ours(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MARK)) == MARK.encode()
    except OSError:
        return False


# ---- what is enabled -----------------------------------------------------------------------


@dataclass
class Enabled:
    """One VM enabled for autostart, as the unit directory and its definition say."""

    name: str
    unit: str
    unit_files: list[str]  # the template, the enablement link, the drop-in if any
    definition: str | None  # its definition.json, None when it is missing
    profile: str | None
    state: str  # the VM's state now: running, stopped..., or "none" (no state directory)
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def definition_path(name: str) -> Path:
    return paths.vm_data_dir(name) / DEFINITION


def _links(d: Path) -> Iterator[tuple[Path, str]]:
    """The enablement links of qlaunch@.service in d's .wants directories, with instances."""
    for wants in sorted(d.glob("*.wants")):
        for link in sorted(wants.glob("qlaunch@*.service")):
            instance = link.name[len("qlaunch@") : -len(".service")]
            if instance:
                yield link, instance


def _state_of(name: str, base: Path | None) -> str:
    try:
        return state.inspect((base or state.root()) / name).state
    except QlaunchError:
        return "none"


def list_enabled(base: Path | None = None) -> list[Enabled]:
    d = unit_dir()
    out = []
    for link, instance in _links(d):
        name = unescape(instance)
        files = [str(d / TEMPLATE), str(link)]
        dropin = d / f"{link.name}.d" / DROPIN
        if dropin.exists():
            files.append(str(dropin))
        note = None
        try:
            if unit_name(name) != link.name:
                note = f"not made by qlaunch: the instance of {name!r} is {escape(name)}"
            defn: Path | None = definition_path(name)
        except UsageError:
            defn = None
            note = f"instance {instance!r} is not a qlaunch VM name (%I is {name!r})"
        prof = None
        if defn is not None:
            try:
                prof = json.loads(defn.read_bytes())["profile"]["name"]
            except (OSError, ValueError, KeyError, TypeError):
                note = note or f"its definition {defn} is missing or unreadable"
                defn = None
        out.append(
            Enabled(
                name=name,
                unit=link.name,
                unit_files=files,
                definition=str(defn) if defn else None,
                profile=prof,
                state=_state_of(name, base) if defn else "none",
                note=note,
            )
        )
    return out


# ---- enable, disable -----------------------------------------------------------------------


def _check_writable(d: Path, verb: str) -> None:
    """Refused before anything is written: the system unit directory needs root; any other
    must exist and be writable."""
    if d == SYSTEM_UNIT_DIR and os.geteuid() != 0:
        raise HostError(
            f"autostart {verb} writes systemd units in {d}, which needs root",
            hint="run it as root (sudo qlaunch autostart ...): VMs that start at boot are "
            "root's; a VM of your own can be started by your own systemd --user unit",
        )
    if not d.is_dir():
        raise HostError(
            f"the systemd unit directory {d} does not exist",
            hint="is this a systemd host? $QLAUNCH_SYSTEMD_DIR picks another directory",
        )
    if not os.access(d, os.W_OK | os.X_OK):
        raise HostError(f"cannot write systemd units in {d}: permission denied")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One enable or disable at a time: the template's last user is decided under it."""
    lock = paths.data_dir() / "autostart.lock"
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise HostError(f"cannot open {lock}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _start_cwd(vm: VM, profile_json: dict[str, Any]) -> str:
    """The directory the VM's relative paths were taken from when it started: recorded in
    profile.json when the start did so, else where its supervisor or QEMU runs (they keep
    start's working directory), else here."""
    cwd = profile_json.get("cwd")
    if isinstance(cwd, str) and cwd:
        return cwd
    live = vm.live()
    for proc in (live.supervisor, live.qemu):
        if proc is not None:
            with contextlib.suppress(OSError):
                return os.readlink(f"/proc/{proc.pid}/cwd")
    return os.getcwd()


def _runas(argv: list[str]) -> str | None:
    if "-runas" in argv[:-1]:
        return argv[argv.index("-runas") + 1]
    return None


def definition_of(vm: VM) -> dict[str, Any]:
    """What `autostart start` needs to make the VM again, from its state directory."""
    try:
        profile_json = json.loads((vm.dir / "profile.json").read_bytes())
        argv = json.loads((vm.dir / "argv.json").read_bytes())
    except (OSError, ValueError):
        raise StateError(
            f"VM {vm.name} has no complete record of how it was started",
            hint=f"start it again (qlaunch start PROFILE --name {vm.name}), then enable it",
        ) from None
    rec = vm.record()
    return {
        "format": FORMAT,
        "name": vm.name,
        "profile": profile_json,
        "restart_policy": rec.restart_policy,
        "netns": rec.netns,
        "runas": _runas(argv),
        "cwd": _start_cwd(vm, profile_json),
        "enabled_at": time.time(),
    }


def enable(name: str, *, base: Path | None = None, note: Note | None = None) -> Enabled:
    """Write (or refresh) the VM's definition, the template unit and the enablement link.
    The VM must exist (started before: its state directory says how). Nothing is left behind
    when a step fails."""
    from qlaunch.vm.api import VM

    unit = unit_name(name)
    d = unit_dir()
    _check_writable(d, "enable")
    vm = VM.get(name, base)
    defn = definition_of(vm)
    template = d / TEMPLATE
    text = template_text()
    dropin = dropin_text(dict(os.environ))
    with _locked():
        if template.exists() and not _ours(template):
            raise StateError(
                f"{template} exists and qlaunch did not write it; refusing to replace it",
                hint="move it away, then enable again",
            )
        undo: list[Callable[[], None]] = []
        try:
            dpath = definition_path(name)
            old_defn = dpath.read_bytes() if dpath.exists() else None
            try:
                dpath.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as e:
                raise HostError(f"cannot make {dpath.parent}: {e.strerror}") from None
            undo.append(lambda: _restore(dpath, old_defn))
            _write_durable(dpath, json.dumps(defn, indent=1).encode() + b"\n", 0o600)

            old_template = template.read_bytes() if template.exists() else None
            if old_template != text.encode():
                undo.append(lambda: _restore(template, old_template))
                _write_durable(template, text.encode())

            ddir = d / f"{unit}.d"
            if dropin is not None:
                old_dropin = (ddir / DROPIN).read_bytes() if (ddir / DROPIN).exists() else None
                made_dir = not ddir.exists()
                ddir.mkdir(exist_ok=True)
                undo.append(lambda: _restore(ddir / DROPIN, old_dropin, rmdir=made_dir))
                _write_durable(ddir / DROPIN, dropin.encode())
            elif (ddir / DROPIN).exists() and _ours(ddir / DROPIN):
                (ddir / DROPIN).unlink()
                with contextlib.suppress(OSError):
                    ddir.rmdir()

            wants = d / WANTS
            made_wants = not wants.exists()
            wants.mkdir(exist_ok=True)
            link = wants / unit
            if not link.is_symlink():
                undo.append(lambda: _unlink(link, rmdir=made_wants))
            # As systemctl enable makes it: an absolute link to the template.
            _symlink(template, link)
        except BaseException:
            for step in reversed(undo):
                with contextlib.suppress(OSError):
                    step()
            raise
    _reload(note)
    if note:
        note(f"{name}: starts at boot through {unit} (definition {definition_path(name)})")
    found = [e for e in list_enabled(base) if e.unit == unit]
    return found[0]


def _restore(path: Path, old: bytes | None, rmdir: bool = False) -> None:
    if old is None:
        _unlink(path, rmdir=rmdir)
    else:
        _write_durable(path, old)


def _unlink(path: Path, rmdir: bool = False) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    if rmdir:
        with contextlib.suppress(OSError):
            path.parent.rmdir()


def disable(name: str, *, note: Note | None = None) -> list[str]:
    """Remove the VM's enablement link, drop-in and definition, and the template once no VM
    uses it; returns what was removed. The VM itself is left as it is (running or not), and so
    is the rest of its persistent data (UEFI variables, TPM state)."""
    unit = unit_name(name)
    d = unit_dir()
    _check_writable(d, "disable")
    removed: list[str] = []
    with _locked():
        links = [link for link, _ in _links(d) if link.name == unit]
        dpath = definition_path(name)
        ddir = d / f"{unit}.d"
        if not links and not dpath.exists():
            raise StateError(
                f"VM {name} is not enabled for autostart",
                hint="qlaunch autostart list shows the VMs that are",
            )
        for link in links:
            _unlink(link)
            removed.append(str(link))
            with contextlib.suppress(OSError):
                link.parent.rmdir()  # only when empty
        if (ddir / DROPIN).exists() and _ours(ddir / DROPIN):
            _unlink(ddir / DROPIN, rmdir=True)
            removed.append(str(ddir / DROPIN))
        if dpath.exists():
            _unlink(dpath, rmdir=True)  # the VM's directory stays if it holds more
            removed.append(str(dpath))
        template = d / TEMPLATE
        if not any(True for _ in _links(d)) and template.exists() and _ours(template):
            _unlink(template)
            removed.append(str(template))
    _reload(note)
    if note:
        note(f"{name}: no longer starts at boot ({unit} disabled)")
    return removed


def _reload(note: Note | None) -> None:
    """systemctl daemon-reload when systemd is the init (sd_booted: /run/systemd/system)."""
    systemctl = shutil.which("systemctl")
    if not systemctl or not os.path.isdir("/run/systemd/system"):
        return
    try:
        proc = spawn.run([systemctl, "daemon-reload"], timeout=60)
    except subprocess.TimeoutExpired:
        proc = None
    if (proc is None or proc.returncode != 0) and note:
        why = "timed out" if proc is None else (proc.stderr.strip() or f"exit {proc.returncode}")
        note(f"systemctl daemon-reload failed ({why}); run it before the next boot")


# ---- starting at boot ----------------------------------------------------------------------


def read_definition(name: str) -> dict[str, Any]:
    state.validate_name(name)
    path = definition_path(name)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise StateError(
            f"VM {name} is not enabled for autostart: no {path}",
            hint=f"qlaunch autostart enable {name}",
        ) from None
    except (OSError, ValueError) as e:
        raise StateError(f"cannot read {path}: {e}") from None
    pj = data.get("profile") if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or data.get("format") != FORMAT
        or not isinstance(pj, dict)
        or not isinstance(pj.get("profile"), dict)
    ):
        raise StateError(
            f"{path} is not an autostart definition this qlaunch reads",
            hint=f"enable it again: qlaunch autostart enable {name} (with the VM started)",
        )
    out: dict[str, Any] = data
    return out


def start(name: str, *, base: Path | None = None, note: Note | None = None) -> VM:
    """Start the VM from its definition, as the unit does at boot. A VM of that name that
    already runs is left alone (the unit is then active without owning it)."""
    from qlaunch.config import profile as profmod
    from qlaunch.vm.api import VM

    data = read_definition(name)
    path = definition_path(name)
    with contextlib.suppress(QlaunchError):
        live = VM(name, base).live()
        if live.alive:
            if note:
                note(f"{name}: already {live.state}; left as it is")
            return VM(name, base)
    pj = data["profile"]
    prof = profmod.build(pj["profile"], name=pj["name"], source=f"{pj['source']} (via {path})")
    cwd = str(data.get("cwd") or "/")
    try:
        os.chdir(cwd)
    except OSError as e:
        raise StateError(
            f"VM {name}: cannot enter {cwd}, where its relative paths are taken from: {e.strerror}",
            hint="restore that directory, or start the VM by hand and enable it again",
        ) from None
    netns = data.get("netns")
    if netns:
        _ensure_netns(str(netns), note)
    return VM.start(
        prof,
        name,
        restart=str(data.get("restart_policy") or "no"),
        cmd=pj.get("command") or None,
        note=note,
        base=base,
        runas=data.get("runas"),
        netns=netns,
    )


def _ensure_netns(name: str, note: Note | None) -> None:
    """A named network namespace is gone after a reboot (it lives in /run/netns): made
    again, empty, as `ip netns add` makes it; qlaunch brings up its networks inside."""
    from qlaunch.net import netns

    if netns.exists(netns.validate(name)):
        return
    ip = shutil.which("ip") or "/sbin/ip"
    try:
        proc = spawn.run([ip, "netns", "add", name], timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HostError(f"cannot make network namespace {name}: {e}") from None
    if proc.returncode != 0:
        raise HostError(f"ip netns add {name} failed: {proc.stderr.strip()}")
    if note:
        note(f"made network namespace {name}")
