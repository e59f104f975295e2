"""`qlaunch net gc`: remove what outlived its VM or network in one namespace.

- VM records (static leases, leases) whose tap is gone: the VM ended with no one to clean up.
- Networks whose bridge is gone or whose dnsmasq died: taken down the rest of the way.
- dnsmasq processes of ours whose network is no longer up here.
- Bridges of ours (by their alias) that no network here owns.
- Persistent taps of ours (qlaunch makes none; a crashed older version or a user might).
- The nftables table, rewritten to hold only networks that are up.
- Runtime state of namespaces that were deleted (`ip netns del`) with no VM left in them: the
  bridges and taps went with the namespace, but its dnsmasq processes live on (and keep it
  alive, unnamed) until they are ended.
"""

from __future__ import annotations

import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

from qlaunch import paths
from qlaunch.errors import HostError, StateError
from qlaunch.net import dhcp, links, nat, netns, runtime

BRIDGE_ALIAS = f"{links.ALIAS_PREFIX}network="


@dataclass
class GcReport:
    vms: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)
    dnsmasq: list[int] = field(default_factory=list)
    taps: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[str] | list[int]]:
        return {
            "vms_released": self.vms,
            "networks_taken_down": self.networks,
            "dnsmasq_killed": self.dnsmasq,
            "taps_removed": self.taps,
            "problems": self.problems,
        }


def collect(ns: str | None) -> GcReport:
    report = GcReport()
    if ns is None or netns.exists(ns):  # a deleted one is swept below, with the others
        with netns.entered(ns), runtime.locked(ns):
            _collect(ns, report)
    _vanished(report)
    return report


def _vanished(report: GcReport) -> None:
    for space in namespaces_with_state():
        if space is None or netns.exists(space):
            continue
        users = _vms_in(space)
        if users:
            report.problems.append(
                f"network namespace {space} was deleted, but VM {', '.join(users)} still "
                "runs in it; its networks are left up until it ends"
            )
            continue
        with runtime.locked(space):
            for name, a in runtime.active(space).items():
                pid = dhcp.running_pid(a.rundir)
                if dhcp.stop(a.rundir) and pid is not None:
                    report.dnsmasq.append(pid)
                for vm in sorted({x.vm for x in runtime.attachments(a.rundir)}):
                    if vm not in report.vms:
                        report.vms.append(vm)
                report.networks.append(f"{name} (deleted netns {space})")
            report.dnsmasq += _orphan_dnsmasq(space)
            shutil.rmtree(runtime.ns_dir(space), ignore_errors=True)


def _vms_in(space: str) -> list[str]:
    """Background VMs, alive, that were started in namespace SPACE."""
    from qlaunch.vm import state

    out = []
    root = state.root()
    for name in state.names(root):
        try:
            live = state.inspect(root / name)
        except StateError:
            continue
        if live.alive and live.record.netns == space:
            out.append(name)
    return out


def _collect(ns: str | None, report: GcReport) -> None:
    with links.iproute() as ipr:
        names = {link.name for link in links.links(ipr)}
        taps = runtime.live_taps(ipr)
    for name, a in runtime.active(ns).items():
        if a.net.bridge not in names or (a.net.serves_dhcp and dhcp.running_pid(a.rundir) is None):
            report.problems += runtime.take_down(ns, a)
            report.networks.append(name)
            continue
        dead = sorted({x.vm for x in runtime.attachments(a.rundir) if x.tap not in taps})
        for vm in dead:
            released = runtime.release_vm(ns, vm, only_dead=True)
            if released and vm not in report.vms:
                report.vms.append(vm)
    report.dnsmasq += _orphan_dnsmasq(ns)
    up = {a.net.bridge for a in runtime.active(ns).values() if a.created_bridge}
    with links.iproute() as ipr:
        for link in links.links(ipr):
            if link.kind == "tun" and link.tun_persist and links.parse_alias(link.alias):
                links.delete(ipr, link.name)
                report.taps.append(link.name)
            elif (
                link.kind == "bridge"
                and (link.alias or "").startswith(BRIDGE_ALIAS)
                and link.name not in up
            ):
                # Ours by its alias, but no network here owns it any more (its state was lost).
                links.delete(ipr, link.name)
                report.networks.append((link.alias or "")[len(BRIDGE_ALIAS) :])
    try:
        nat.apply([a.net for a in runtime.active(ns).values()])
    except HostError as e:
        report.problems.append(str(e))


def _orphan_dnsmasq(ns: str | None) -> list[int]:
    """dnsmasq processes whose pid file lies in this namespace's runtime tree but whose network
    is not up here (its directory removed, or the pid file naming another process)."""
    import psutil

    base = str(runtime.ns_dir(ns)) + os.sep
    killed = []
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] != dhcp.DNSMASQ:
            continue
        pidfile = next(
            (a.split("=", 1)[1] for a in p.info["cmdline"] or [] if a.startswith("--pid-file=")),
            None,
        )
        if not pidfile or not pidfile.startswith(base):
            continue
        rundir = Path(pidfile).parent
        if dhcp.running_pid(rundir) == p.pid and runtime.Active.read(rundir) is not None:
            continue
        try:
            os.kill(p.pid, signal.SIGTERM)
            killed.append(p.pid)
        except ProcessLookupError:
            pass
    return killed


def namespaces_with_state() -> list[str | None]:
    """Every namespace qlaunch has runtime state for (None: the caller's own)."""
    d = paths.state_dir() / ".networks"
    out: list[str | None] = []
    if d.is_dir():
        for sub in sorted(d.iterdir()):
            if sub.is_dir():
                out.append(None if sub.name == netns.key(None) else sub.name)
    return out
