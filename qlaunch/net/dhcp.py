"""DHCP and DNS for one network from its own dnsmasq.

Each network's dnsmasq reads no configuration file (`--conf-file=/dev/null`), binds only the
bridge (`--bind-interfaces`), and keeps its pid, lease, hosts and log files in the network's
runtime directory. Before any signal, the pid is checked to be a dnsmasq whose command line names
that directory's pid file: a stale pid file never leads to signalling a stranger.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import pwd
import signal
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from qlaunch import spawn
from qlaunch.errors import HostError
from qlaunch.net.definitions import Network

log = logging.getLogger(__name__)

DNSMASQ = "dnsmasq"
LEASE_TIME = "1h"


def pid_file(rundir: Path) -> Path:
    return rundir / "dnsmasq.pid"


def argv(net: Network, rundir: Path) -> list[str]:
    assert net.subnet is not None
    lo, hi = net.dhcp_range()
    # dnsmasq drops to "nobody" by default, which could not read our 0700 runtime directory
    # when it re-reads the hosts file on SIGHUP: it keeps our own user instead.
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    args = [
        DNSMASQ,
        "--conf-file=/dev/null",
        f"--pid-file={pid_file(rundir)}",
        f"--dhcp-leasefile={rundir / 'leases'}",
        f"--dhcp-hostsfile={rundir / 'hosts'}",
        f"--log-facility={rundir / 'dnsmasq.log'}",
        f"--user={user}",
        f"--group={group}",
        "--bind-interfaces",
        "--except-interface=lo",
        f"--interface={net.bridge}",
        f"--listen-address={net.gateway}",
        f"--dhcp-range={lo},{hi},{net.subnet.netmask},{LEASE_TIME}",
        f"--dhcp-lease-max={net.subnet.num_addresses}",
        "--dhcp-authoritative",
        "--dhcp-no-override",
        "--strict-order",
        # The ping check before each new dynamic lease costs 3 s (the guest's first DISCOVER
        # goes unanswered); the pool is qlaunch's own, static leases sit below it.
        "--no-ping",
    ]
    if net.mode == "isolated":
        # Nothing beyond the network, not even DNS forwarding; no default route offered.
        args += ["--no-resolv", "--dhcp-option=option:router"]
    return args


def running_pid(rundir: Path) -> int | None:
    """The pid of this network's dnsmasq if it runs, checked by its command line."""
    try:
        pid = int(pid_file(rundir).read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid > 0 and is_ours(pid, rundir) else None


def is_ours(pid: int, rundir: Path) -> bool:
    import psutil

    try:
        p = psutil.Process(pid)
        return (
            p.status() != psutil.STATUS_ZOMBIE
            and os.path.basename(p.exe() or p.name()) == DNSMASQ
            and f"--pid-file={pid_file(rundir)}" in p.cmdline()
        )
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def start(net: Network, rundir: Path) -> int:
    """Start a fresh dnsmasq (a running one of this network is ended first); returns its pid."""
    stop(rundir)
    rundir.mkdir(parents=True, exist_ok=True)
    hosts = rundir / "hosts"
    if not hosts.exists():
        hosts.write_text("")
    try:
        # dnsmasq forks and its first process exits only once the daemon is set up, with a
        # status and message that say what failed (address in use, bad option).
        r = spawn.run(argv(net, rundir), timeout=30)
    except FileNotFoundError:
        raise HostError("dnsmasq is not installed", hint="apt-get install dnsmasq-base") from None
    if r.returncode != 0:
        msg = (r.stderr.strip() or r.stdout.strip()).replace("\n", "; ")
        raise HostError(f"dnsmasq for network {net.name} did not start: {msg}")
    pid = running_pid(rundir)
    if pid is None:
        raise HostError(f"dnsmasq for network {net.name} exited right after starting")
    return pid


def stop(rundir: Path, timeout: float = 5.0) -> bool:
    """End this network's dnsmasq (SIGTERM, then SIGKILL); False if none was running."""
    pid = running_pid(rundir)
    if pid is None:
        pid_file(rundir).unlink(missing_ok=True)
        return False
    _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_ours(pid, rundir):
            break
        time.sleep(0.02)
    else:
        _signal(pid, signal.SIGKILL)
    pid_file(rundir).unlink(missing_ok=True)
    return True


def reload(rundir: Path) -> None:
    """SIGHUP: dnsmasq re-reads the hosts file (static leases, names)."""
    pid = running_pid(rundir)
    if pid is not None:
        _signal(pid, signal.SIGHUP)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


# --- static leases (the dhcp-hostsfile) ----------------------------------------------------


@dataclass(frozen=True)
class Host:
    mac: str
    name: str
    ip: str | None = None

    def line(self) -> str:
        return ",".join([self.mac, *([self.ip] if self.ip else []), self.name])


def read_hosts(rundir: Path) -> list[Host]:
    out = []
    try:
        text = (rundir / "hosts").read_text()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        f = line.strip().split(",")
        if len(f) == 3:
            out.append(Host(f[0], f[2], f[1]))
        elif len(f) == 2:
            out.append(Host(f[0], f[1]))
    return out


def write_hosts(rundir: Path, hosts: list[Host]) -> None:
    p = rundir / "hosts"
    tmp = p.with_name(f".hosts.{os.getpid()}")
    tmp.write_text("".join(h.line() + "\n" for h in hosts))
    tmp.replace(p)


# --- leases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    expiry: int
    mac: str
    ip: str
    hostname: str | None


def leases(rundir: Path) -> list[Lease]:
    out = []
    try:
        text = (rundir / "leases").read_text()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 4 and f[0].isdigit():
            out.append(Lease(int(f[0]), f[1].lower(), f[2], None if f[3] == "*" else f[3]))
    return out


def release(net: Network, ip: str, mac: str) -> None:
    """Ask dnsmasq to drop a lease, as dnsmasq's own dhcp_release tool does: a DHCPRELEASE
    sent out of the bridge to the server's address, with the client's address and MAC."""
    server = socket.inet_aton(str(net.gateway))
    chaddr = bytes.fromhex(mac.replace(":", "")).ljust(16, b"\0")
    header = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        1,  # BOOTREQUEST
        1,  # ethernet
        6,
        0,
        int.from_bytes(os.urandom(4), "big"),
        0,
        0,
        socket.inet_aton(ip),  # ciaddr: the address released
        b"\0" * 4,
        b"\0" * 4,
        b"\0" * 4,
        chaddr,
        b"",
        b"",
    )
    options = b"\x63\x82\x53\x63" + bytes([53, 1, 7, 54, 4]) + server + b"\xff"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, net.bridge.encode())
            s.sendto(header + options, (str(net.gateway), 67))
        except OSError as e:
            if e.errno not in (errno.ENODEV, errno.ENETUNREACH, errno.EADDRNOTAVAIL):
                raise HostError(f"cannot release lease {ip}: {e.strerror}") from None
