"""Bringing networks up and down in one namespace, and the records of what uses them.

Runtime state of network N in namespace S: `state_dir()/.networks/S/N/` with `network.json`
(the definition as it was brought up, so that it can be taken down after the definition
changed or went away), dnsmasq's files, and `vms/VM.json` per VM attached. One lock per
namespace serialises every change there, the nftables table included.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlaunch import paths
from qlaunch.errors import HostError, StateError
from qlaunch.net import definitions, dhcp, links, nat, netns
from qlaunch.net.definitions import Network

log = logging.getLogger(__name__)

LOCK_TIMEOUT = 30.0


def ns_dir(ns: str | None) -> Path:
    return paths.state_dir() / ".networks" / netns.key(ns)


def run_dir(ns: str | None, name: str) -> Path:
    return ns_dir(ns) / name


@contextmanager
def locked(ns: str | None, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    d = ns_dir(ns)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = d / ".lock"
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                        raise StateError(
                            f"networks of {netns.key(ns)} are locked by pid {holder or '?'}",
                            hint="another qlaunch is changing them; retry",
                        ) from None
                    time.sleep(0.05)
        except BaseException:
            os.close(fd)
            raise
        # The holder before us may have removed the directory with the lock (below): ours
        # is then a lock on nothing, and the one to take is at the path again.
        if _same_file(lock, fd):
            break
        os.close(fd)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            _remove_if_bare(d, lock, fd)
        finally:
            os.close(fd)


def _same_file(path: Path, fd: int) -> bool:
    try:
        a, b = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _remove_if_bare(d: Path, lock: Path, fd: int) -> None:
    """A namespace's directory that holds nothing but its lock (every network there is down)
    goes, lock and all, while we hold the lock; so does .networks when it is empty after."""
    try:
        if set(os.listdir(d)) != {".lock"} or not _same_file(lock, fd):
            return
        lock.unlink()
        d.rmdir()
        d.parent.rmdir()
    except OSError:
        return  # something new there, or .networks holds other namespaces: both stay


def _network_from(d: dict[str, Any]) -> Network:
    return definitions.make(
        d["name"],
        mode=d["mode"],
        subnet=d.get("subnet"),
        dhcp=bool(d.get("dhcp", False)),
        uplink=d.get("uplink"),
        bridge=d["bridge"],
    )


@dataclass
class Active:
    """A network that is up in a namespace, as it was brought up."""

    net: Network
    rundir: Path
    created_bridge: bool
    started_at: float

    @classmethod
    def read(cls, rundir: Path) -> Active | None:
        try:
            d = json.loads((rundir / "network.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return cls(_network_from(d["network"]), rundir, d["created_bridge"], d["started_at"])

    def write(self) -> None:
        d = {
            "network": self.net.to_dict(),
            "created_bridge": self.created_bridge,
            "started_at": self.started_at,
        }
        tmp = self.rundir / ".network.json.tmp"
        tmp.write_text(json.dumps(d, indent=2) + "\n")
        tmp.replace(self.rundir / "network.json")


def active(ns: str | None) -> dict[str, Active]:
    d = ns_dir(ns)
    out: dict[str, Active] = {}
    if not d.is_dir():
        return out
    for sub in sorted(d.iterdir()):
        if sub.is_dir() and definitions.NAME_RE.match(sub.name):
            a = Active.read(sub)
            if a is not None:
                out[sub.name] = a
    return out


# --- up and down (call inside netns.entered(ns) and locked(ns)) ------------------------------


class Undo:
    """What has been made so far, undone in reverse order when a later step fails: an
    ExitStack whose steps record their own failures, so that one failed step does not keep
    the others from running, and the error can say what could not be undone."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._failed: list[str] = []

    def add(self, what: str, fn: Callable[[], object]) -> None:
        def step() -> None:
            try:
                fn()
            except (OSError, HostError, StateError) as e:
                self._failed.append(f"{what}: {e}")

        self._stack.callback(step)

    def run(self) -> list[str]:
        """Undo every step; returns the ones that failed."""
        self._stack.close()
        failed, self._failed = self._failed, []
        return failed

    def keep(self) -> None:
        """Everything worked: nothing is to be undone."""
        self._stack.pop_all()


def is_up(ns: str | None, net: Network) -> bool:
    """Up means: recorded, its bridge exists here, and its dnsmasq runs if it has one."""
    a = Active.read(run_dir(ns, net.name))
    if a is None:
        return False
    with links.iproute() as ipr:
        if links.index(ipr, a.net.bridge) is None:
            return False
    return not a.net.serves_dhcp or dhcp.running_pid(a.rundir) is not None


def bring_up(ns: str | None, net: Network) -> Active:
    """Make the bridge, its address, the nftables chains and dnsmasq. A failure at any step
    undoes the steps before it and says which step failed. Already up: returns it as it is."""
    rundir = run_dir(ns, net.name)
    if is_up(ns, net):
        a = Active.read(rundir)
        assert a is not None
        return a
    # Half-up leftovers (bridge gone, dnsmasq dead) are cleared before starting over.
    old = Active.read(rundir)
    if old is not None:
        take_down(ns, old)
    undo = Undo()
    try:
        rundir.mkdir(parents=True, exist_ok=True, mode=0o700)
        undo.add("runtime directory", lambda: shutil.rmtree(rundir, ignore_errors=True))
        created = False
        with links.iproute() as ipr:
            # A fresh namespace has lo down, and then nothing local answers: not the gateway
            # to dnsmasq's own DHCPRELEASE, not DNS for the host.
            links.up(ipr, "lo")
            if net.managed:
                assert net.subnet is not None
                holder = links.address_in_use(ipr, str(net.gateway))
                if holder is not None:
                    raise StateError(
                        f"cannot start network {net.name}: address {net.gateway} is in use "
                        f"on {holder}",
                        hint="another network has this subnet here; pick another --subnet",
                    )
                links.make_bridge(
                    ipr,
                    net.bridge,
                    str(net.gateway),
                    net.subnet.prefixlen,
                    f"{links.ALIAS_PREFIX}network={net.name}",
                )
                created = True
                undo.add(f"bridge {net.bridge}", lambda: _delete_link(net.bridge))
            elif links.index(ipr, net.bridge) is None:
                raise StateError(
                    f"cannot start network {net.name}: host bridge {net.bridge} does not exist",
                    hint="a bridge network attaches VMs to an existing bridge: create it first",
                )
        a = Active(net, rundir, created, time.time())
        a.write()
        if net.managed:
            others = [x.net for x in active(ns).values()]
            undo.add("nftables chains", lambda: _rewrite_rules(ns, exclude=net.name))
            nat.apply(others)
        if net.serves_dhcp:
            dhcp.start(net, rundir)
            undo.add("dnsmasq", lambda: dhcp.stop(rundir))
    except (HostError, StateError) as e:
        failed = undo.run()
        extra = f" (and undoing failed: {'; '.join(failed)})" if failed else ""
        raise type(e)(
            f"{e.message}; nothing of network {net.name} was left behind{extra}", hint=e.hint
        ) from None
    undo.keep()
    return a


def _delete_link(name: str) -> None:
    with links.iproute() as ipr:
        links.delete(ipr, name)


def _rewrite_rules(ns: str | None, exclude: str | None = None) -> None:
    nat.apply([a.net for n, a in active(ns).items() if n != exclude])


def take_down(ns: str | None, a: Active) -> list[str]:
    """Undo everything bring_up made; keeps going past failures and returns them."""
    problems = []
    try:
        dhcp.stop(a.rundir)
    except HostError as e:
        problems.append(str(e))
    try:
        _rewrite_rules(ns, exclude=a.net.name)
    except HostError as e:
        problems.append(str(e))
    if a.created_bridge:
        try:
            _delete_link(a.net.bridge)
        except HostError as e:
            problems.append(str(e))
    shutil.rmtree(a.rundir, ignore_errors=True)
    return problems


# --- VMs on networks -----------------------------------------------------------------------


@dataclass(frozen=True)
class Attachment:
    vm: str
    nic: int
    network: str
    tap: str
    mac: str
    ip: str | None
    hostname: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "nic": self.nic,
            "network": self.network,
            "tap": self.tap,
            "mac": self.mac,
            "ip": self.ip,
            "hostname": self.hostname,
        }


def vm_record(rundir: Path, vm: str) -> Path:
    return rundir / "vms" / f"{vm}.json"


def attachments(rundir: Path) -> list[Attachment]:
    d = rundir / "vms"
    out: list[Attachment] = []
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.json")):
        try:
            for x in json.loads(p.read_text()):
                out.append(Attachment(**x))
        except (json.JSONDecodeError, TypeError):
            continue
    return out


def add_attachments(rundir: Path, vm: str, items: list[Attachment]) -> None:
    p = vm_record(rundir, vm)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps([x.to_dict() for x in items], indent=2) + "\n")
    tmp.replace(p)


def live_taps(ipr: Any) -> set[str]:
    """Names of taps that exist here: a non-persistent tap exists only while its fd is held."""
    return {link.name for link in links.links(ipr) if link.kind == "tun"}


def in_use(ns: str | None, name: str) -> list[str]:
    """VMs whose tap on network NAME still exists in this namespace."""
    rundir = run_dir(ns, name)
    with links.iproute() as ipr:
        taps = live_taps(ipr)
    return sorted({x.vm for x in attachments(rundir) if x.tap in taps})


def release_vm(ns: str | None, vm: str, only_dead: bool = False) -> list[Attachment]:
    """Forget VM on every network here: its static leases, its leases, its records.

    With only_dead, a VM whose tap still exists is left alone (gc). Returns what was released.
    """
    released: list[Attachment] = []
    with links.iproute() as ipr:
        taps = live_taps(ipr)
    for a in active(ns).values():
        p = vm_record(a.rundir, vm)
        if not p.exists():
            continue
        mine = [x for x in attachments(a.rundir) if x.vm == vm]
        if only_dead and any(x.tap in taps for x in mine):
            continue
        release_records(a, mine)
        p.unlink(missing_ok=True)
        released += mine
    return released


def release_records(a: Active, mine: list[Attachment]) -> None:
    if not a.net.serves_dhcp or not mine:
        return
    macs = {x.mac for x in mine}
    hosts = dhcp.read_hosts(a.rundir)
    kept = [h for h in hosts if h.mac not in macs]
    if len(kept) != len(hosts):
        dhcp.write_hosts(a.rundir, kept)
        dhcp.reload(a.rundir)
    if dhcp.running_pid(a.rundir) is not None:
        for lease in dhcp.leases(a.rundir):
            if lease.mac in macs:
                dhcp.release(a.net, lease.ip, lease.mac)


def wait_for_lease(rundir: Path, mac: str, timeout: float) -> dhcp.Lease | None:
    deadline = time.monotonic() + timeout
    while True:
        for lease in dhcp.leases(rundir):
            if lease.mac == mac.lower():
                return lease
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def stop_network(ns: str | None, name: str, force: bool = False) -> bool:
    """Take network NAME down here; refused while VMs use it unless force. False: not up."""
    a = Active.read(run_dir(ns, name))
    if a is None:
        return False
    users = in_use(ns, name)
    if users and not force:
        raise StateError(
            f"network {name} is in use by {', '.join(users)}",
            hint="stop those VMs first (or --force)",
        )
    problems = take_down(ns, a)
    if problems:
        raise HostError(f"network {name} stopped with problems: {'; '.join(problems)}")
    return True


def ensure_definition_up(ns: str | None, name: str) -> Active:
    return bring_up(ns, definitions.load(name))
