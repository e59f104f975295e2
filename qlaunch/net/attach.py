"""Wiring a VM's NICs to qlaunch networks and host bridges: the one function a VM start calls.

    nics = prepare_nics(profile, vm_name, netns)
    try:
        argv = build_argv(profile, host, Runtime(..., taps=nics.taps,
                                                  append_extra=(..., *nics.append)))
        proc = spawn(argv, pass_fds=nics.fds)         # in the same namespace
    except BaseException:
        nics.rollback()
        raise
    nics.close_fds()            # QEMU holds the taps now (a supervisor may keep them instead)
    state["nics"] = nics.record

and when the VM has ended for good: `release_nics(vm_name, netns)`.

Each tap is opened here without IFF_PERSIST and handed to QEMU as `fd=N`: the kernel removes it
when the last holder of the fd exits, so a SIGKILLed QEMU leaves no tap behind. A supervisor
that keeps its copy of the fds keeps the taps (and their names) across QEMU restarts.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from qlaunch.config.profile import Profile
from qlaunch.errors import HostError, StateError, UsageError
from qlaunch.net import definitions, dhcp, links, netns, runtime

log = logging.getLogger(__name__)


def stable_mac(vm_name: str, index: int) -> str:
    from qlaunch.names import stable_mac as mac

    return mac(vm_name, index)


def hostname_of(vm_name: str, nic: int) -> str:
    """A DNS label for dnsmasq: VM names may hold '_', host names may not."""
    base = re.sub(r"[^A-Za-z0-9-]", "-", vm_name).strip("-")[:63] or "vm"
    return base if nic == 0 else f"{base[:58]}-nic{nic}"


@dataclass
class PreparedNics:
    """What prepare_nics made for one launch."""

    taps: tuple[str | None, ...]  # Runtime.taps: "fd=N" per tap NIC, None for others
    fds: list[int]  # pass these to QEMU (spawn(pass_fds=...)); same numbers in the child
    record: list[dict[str, Any]]  # per NIC: mode, network, bridge, tap, mac, ip; for VM state
    append: tuple[str, ...]  # kernel command line additions (qlaunch.dhcp for the guest init)
    netns: str | None
    _undo: runtime.Undo = field(default_factory=runtime.Undo, repr=False)

    def close_fds(self) -> None:
        """Drop our copies of the tap fds once QEMU (or a supervisor) holds them."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []

    def rollback(self) -> None:
        """Undo everything prepare_nics made (taps, leases, networks it brought up)."""
        self.close_fds()
        with netns.entered(self.netns):
            self._undo.run()

    @property
    def cleanup(self) -> Callable[[], None]:
        return self.rollback


def _check_static_ip(net: definitions.Network, ip: str, nic: int) -> str:
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        raise UsageError(f"[[net]] #{nic} ip: {ip!r} is not an IPv4 address") from None
    assert net.subnet is not None
    if addr not in net.subnet or addr in (net.gateway, net.subnet.broadcast_address):
        raise UsageError(
            f"[[net]] #{nic} ip: {ip} is not a host address of network {net.name} "
            f"({net.subnet}, gateway {net.gateway})"
        )
    return str(addr)


def prepare_nics(profile: Profile, vm_name: str, ns: str | None = None) -> PreparedNics:
    """Bring up the networks the profile's NICs name, make one tap per NIC on them, and return
    QEMU's netdev options and fds. Anything made is undone if a later step fails."""
    prepared = PreparedNics(taps=(), fds=[], record=[], append=(), netns=ns)
    if not any(n.mode in ("network", "bridge") for n in profile.nets):
        prepared.record = [
            _plain(n.mode, n.mac or stable_mac(vm_name, i)) for i, n in enumerate(profile.nets)
        ]
        prepared.taps = tuple(None for _ in profile.nets)
        prepared.append = guest_append(profile, any(n.mode == "user" for n in profile.nets))
        return prepared
    try:
        with netns.entered(ns), runtime.locked(ns):
            _prepare(profile, vm_name, ns, prepared)
    except BaseException:
        prepared.rollback()
        raise
    return prepared


def guest_append(profile: Profile, dhcp_wanted: bool) -> tuple[str, ...]:
    """qlaunch.dhcp tells the qlaunch guest init to take a lease with udhcpc on every NIC."""
    return ("qlaunch.dhcp",) if dhcp_wanted and profile.boot.initrd == "qlaunch" else ()


def _plain(mode: str, mac: str) -> dict[str, Any]:
    return {"mode": mode, "mac": mac}


def _prepare(profile: Profile, vm_name: str, ns: str | None, out: PreparedNics) -> None:
    taps: list[str | None] = []
    # QEMU's user networking and a host bridge's LAN offer DHCP as a rule; ours when enabled.
    dhcp_wanted = any(n.mode in ("user", "bridge") for n in profile.nets)
    per_network: dict[str, list[runtime.Attachment]] = {}
    actives: dict[str, runtime.Active] = {}
    undo = out._undo
    for i, n in enumerate(profile.nets):
        mac = n.mac or stable_mac(vm_name, i)
        if n.mode not in ("network", "bridge"):
            taps.append(None)
            out.record.append(_plain(n.mode, mac))
            continue
        if n.mode == "network":
            assert n.network is not None
            net = definitions.load(n.network)
            if n.network not in actives:
                was_up = runtime.is_up(ns, net)
                a = runtime.bring_up(ns, net)
                actives[n.network] = a
                if not was_up:
                    undo.add(f"network {net.name}", _taker(ns, a))
            a = actives[n.network]
            bridge = a.net.bridge
            ip = _check_static_ip(a.net, n.ip, i) if n.ip and a.net.subnet else None
            if n.ip and not a.net.subnet:
                raise UsageError(f"[[net]] #{i} ip: network {net.name} has no subnet of ours")
            dhcp_wanted = dhcp_wanted or a.net.serves_dhcp or a.net.mode == "bridge"
        else:
            assert n.bridge is not None
            bridge, ip, a = n.bridge, None, None
        name = links.tap_name(vm_name, i)
        with links.iproute() as ipr:
            _refuse_leftover(ipr, name)
            fd = links.open_tap(name)
            out.fds.append(fd)
            links.attach_tap(ipr, name, bridge, mac, links.tap_alias(vm_name, i))
        taps.append(f"fd={fd}")
        out.record.append(
            {
                "mode": n.mode,
                "network": n.network,
                "bridge": bridge,
                "tap": name,
                "mac": mac,
                "ip": ip,
                "netns": ns,
            }
        )
        if a is not None and n.network is not None:
            per_network.setdefault(n.network, []).append(
                runtime.Attachment(vm_name, i, n.network, name, mac, ip, hostname_of(vm_name, i))
            )
    for network, items in per_network.items():
        _record(ns, actives[network], vm_name, items, undo)
    out.taps = tuple(taps)
    out.append = guest_append(profile, dhcp_wanted)


def _taker(ns: str | None, a: runtime.Active) -> Callable[[], object]:
    return lambda: runtime.take_down(ns, a)


def _refuse_leftover(ipr: Any, name: str) -> None:
    """A tap of this name that exists belongs to a live VM (or is someone's persistent tap):
    TUNSETIFF would attach to a persistent one, so refuse it here, naming the holder."""
    for link in links.links(ipr):
        if link.name != name:
            continue
        owner = links.parse_alias(link.alias)
        who = f"VM {owner[0]}" if owner else "another program"
        raise StateError(
            f"tap {name} exists already (held by {who})",
            hint="is that VM still running? `qlaunch net gc` removes leftover taps",
        )


def _record(
    ns: str | None,
    a: runtime.Active,
    vm_name: str,
    items: list[runtime.Attachment],
    undo: runtime.Undo,
) -> None:
    """Static leases and names in dnsmasq's hosts file, and the VM's record on the network."""
    mine = {x.mac for x in items}
    existing = runtime.attachments(a.rundir)
    with links.iproute() as ipr:
        taps = runtime.live_taps(ipr)
    for x in items:
        for other in existing:
            if other.vm != vm_name and x.ip and other.ip == x.ip and other.tap in taps:
                raise StateError(
                    f"address {x.ip} on network {a.net.name} is VM {other.vm}'s",
                    hint="pick another [[net]] ip",
                )
    # A previous run of this VM that was never released (its QEMU SIGKILLed with no one to
    # clean up): its records are replaced.
    runtime.release_records(a, [x for x in existing if x.vm == vm_name])
    runtime.add_attachments(a.rundir, vm_name, items)
    undo.add(
        f"records of {vm_name} on {a.net.name}",
        lambda: runtime.vm_record(a.rundir, vm_name).unlink(missing_ok=True),
    )
    if a.net.serves_dhcp:
        hosts = [h for h in dhcp.read_hosts(a.rundir) if h.mac not in mine]
        hosts += [dhcp.Host(x.mac, x.hostname, x.ip) for x in items]
        before = dhcp.read_hosts(a.rundir)
        dhcp.write_hosts(a.rundir, hosts)
        dhcp.reload(a.rundir)

        def restore() -> None:
            dhcp.write_hosts(a.rundir, [h for h in before if h.mac not in mine])
            dhcp.reload(a.rundir)

        undo.add(f"static leases on {a.net.name}", restore)


def release_nics(vm_name: str, ns: str | None = None) -> list[dict[str, Any]]:
    """The VM has ended: drop its static leases, leases and records on every network in the
    namespace. Idempotent; safe to call from the supervisor and from `stop` alike. Taps need
    no removing: they went with the last fd."""
    try:
        with netns.entered(ns), runtime.locked(ns):
            done = runtime.release_vm(ns, vm_name)
    except HostError:
        if ns is not None and not netns.exists(ns):
            return []  # the namespace is gone, and everything in it with it
        raise
    return [x.to_dict() for x in done]


def leases_of(record: list[dict[str, Any]], ns: str | None = None) -> dict[str, str]:
    """MAC -> leased address, for the NICs of a VM's record (what `status` can show)."""
    out: dict[str, str] = {}
    for nic in record:
        network = nic.get("network")
        if not network:
            continue
        for lease in dhcp.leases(runtime.run_dir(ns, network)):
            if lease.mac == nic["mac"]:
                out[nic["mac"]] = lease.ip
    return out


@contextmanager
def nics_for(profile: Profile, vm_name: str, ns: str | None = None) -> Iterator[PreparedNics]:
    """For a foreground launch (`qlaunch run`): the NICs prepared, the body run in the
    namespace (so QEMU spawned there lives there), then our fds closed and the VM released."""
    nics = prepare_nics(profile, vm_name, ns)
    try:
        with netns.entered(ns if nics.fds else None):
            yield nics
    finally:
        nics.close_fds()
        if any(r.get("network") for r in nics.record):
            release_nics(vm_name, ns)
