"""`qlaunch net create|delete|list|show|start|stop|gc`: virtual networks for VMs."""

from __future__ import annotations

import argparse
import time
from typing import Any

from qlaunch.cli import output
from qlaunch.errors import StateError, UsageError

EXAMPLES = """\
examples:
  qlaunch net create lan --subnet 10.77.0.0/24            NAT to the world, DHCP and DNS
  qlaunch net create lab --subnet 10.78.0.0/24 --mode route --uplink eth0
  qlaunch net create quiet --subnet 10.79.0.0/24 --mode isolated
  qlaunch net create host --mode bridge --bridge br0      VMs on an existing host bridge
  qlaunch net show lan --json                             state, leases, VMs
  QLAUNCH_NETNS=test qlaunch net start lan                inside network namespace `test`

A profile puts a NIC on a network with [[net]] mode = "network", network = "lan" (and
optionally ip = "10.77.0.10" for a static lease, mac = "52:54:00:..."). Networks come up
on demand when a VM that uses one starts.
"""


def add_netns(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--netns",
        metavar="NAME",
        help="work inside network namespace NAME (default: $QLAUNCH_NETNS, else this one)",
    )


def register(sub: Any) -> None:
    net = sub.add_parser(
        "net",
        help="virtual networks: bridges, NAT, DHCP",
        description="Virtual networks for VMs: a bridge with a gateway address, nftables NAT "
        "or routing, and a dnsmasq for DHCP and DNS, per network.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    nsub = net.add_subparsers(dest="net_command", metavar="NET_COMMAND")
    net.set_defaults(func=lambda args: _help(net))

    p = nsub.add_parser("create", help="define a network")
    p.add_argument("name")
    p.add_argument("--subnet", help="IPv4 subnet, e.g. 10.77.0.0/24 (gateway: its first host)")
    p.add_argument(
        "--mode",
        default="nat",
        choices=["nat", "route", "isolated", "bridge"],
        help="nat (default): masquerade to the world; route: forward without NAT; "
        "isolated: no forwarding; bridge: attach VMs to the existing host --bridge",
    )
    p.add_argument(
        "--dhcp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run dnsmasq for DHCP and DNS (default: on)",
    )
    p.add_argument("--uplink", metavar="IFACE", help="forward only through this interface")
    p.add_argument("--bridge", metavar="NAME", help="bridge name (default ql-NAME)")
    p.add_argument("--start", action="store_true", help="bring it up now")
    add_netns(p)
    p.set_defaults(func=cmd_create)

    p = nsub.add_parser("delete", help="remove a network's definition (refused while in use)")
    p.add_argument("name")
    add_netns(p)
    p.set_defaults(func=cmd_delete)

    p = nsub.add_parser("list", help="networks and whether they are up")
    p.add_argument("--json", action="store_true")
    add_netns(p)
    p.set_defaults(func=cmd_list)

    p = nsub.add_parser("show", help="one network: state, leases, VMs")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    add_netns(p)
    p.set_defaults(func=cmd_show)

    p = nsub.add_parser("start", help="bring a network up")
    p.add_argument("name")
    add_netns(p)
    p.set_defaults(func=cmd_start)

    p = nsub.add_parser("stop", help="take a network down (refused while VMs use it)")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="even while VMs use it")
    add_netns(p)
    p.set_defaults(func=cmd_stop)

    p = nsub.add_parser("gc", help="remove leftovers of ended VMs and networks")
    p.add_argument("--json", action="store_true")
    add_netns(p)
    p.set_defaults(func=cmd_gc)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _ns(args: argparse.Namespace) -> str | None:
    from qlaunch.net import netns

    if args.guest_cmd is not None:
        raise UsageError(f"`qlaunch net {args.net_command}` takes no command after --")
    return netns.from_env(args.netns)


def cmd_create(args: argparse.Namespace) -> int:
    from qlaunch.net import definitions, netns, runtime

    ns = _ns(args)
    net = definitions.make(
        args.name,
        mode=args.mode,
        subnet=args.subnet,
        dhcp=args.dhcp,
        uplink=args.uplink,
        bridge=args.bridge,
    )
    path = definitions.create(net)
    if args.start:
        try:
            with netns.entered(ns), runtime.locked(ns):
                runtime.bring_up(ns, net)
        except BaseException:
            definitions.remove(net.name)
            raise
    print(net.name)
    output.note(f"network {net.name} defined in {path}" + (" and up" if args.start else ""))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from qlaunch.net import definitions, netns, runtime
    from qlaunch.vm import netgc as gc

    ns = _ns(args)
    definitions.load(args.name)
    spaces = gc.namespaces_with_state()
    if ns not in spaces:
        spaces.append(ns)
    users: dict[str, list[str]] = {}
    for space in spaces:
        if space is not None and not netns.exists(space):
            continue
        with netns.entered(space):
            vms = runtime.in_use(space, args.name)
        if vms:
            users[netns.key(space)] = vms
    if users:
        where = "; ".join(
            f"{', '.join(v)}" + ("" if k == netns.key(None) else f" (netns {k})")
            for k, v in users.items()
        )
        raise StateError(
            f"network {args.name} is in use by VMs: {where}", hint="stop those VMs first"
        )
    for space in spaces:
        if space is not None and not netns.exists(space):
            continue
        with netns.entered(space), runtime.locked(space):
            runtime.stop_network(space, args.name, force=True)
    definitions.remove(args.name)
    output.note(f"network {args.name} deleted")
    return 0


def _summary(ns: str | None, net: Any, act: Any) -> dict[str, Any]:
    from qlaunch.net import dhcp, runtime

    up = act is not None and runtime.is_up(ns, act.net)
    d: dict[str, Any] = net.to_dict()
    d["state"] = "up" if up else ("broken" if act is not None else "down")
    d["vms"] = runtime.in_use(ns, net.name) if act is not None else []
    d["dnsmasq_pid"] = dhcp.running_pid(act.rundir) if act is not None else None
    return d


def cmd_list(args: argparse.Namespace) -> int:
    from qlaunch.net import definitions, netns, runtime

    ns = _ns(args)
    rows = []
    with netns.entered(ns):
        acts = runtime.active(ns)
        for net in definitions.all_networks():
            rows.append(_summary(ns, net, acts.get(net.name)))
    if args.json:
        output.emit_json(rows)
        return 0
    output.table(
        [
            {
                **r,
                "subnet": r.get("subnet", "-"),
                "dhcp": "yes" if r.get("dhcp") else "no",
                "vms": len(r["vms"]),
            }
            for r in rows
        ],
        ["name", "mode", "subnet", "bridge", "dhcp", "state", "vms"],
    )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from qlaunch.net import definitions, dhcp, links, netns, runtime

    ns = _ns(args)
    net = definitions.load(args.name)
    with netns.entered(ns):
        act = runtime.active(ns).get(net.name)
        d = _summary(ns, net, act)
        d["netns"] = ns
        leases = []
        attached = []
        if act is not None:
            now = time.time()
            leases = [
                {
                    "ip": x.ip,
                    "mac": x.mac,
                    "hostname": x.hostname,
                    "expires_in": max(0, int(x.expiry - now)),
                }
                for x in dhcp.leases(act.rundir)
            ]
            with links.iproute() as ipr:
                taps = runtime.live_taps(ipr)
            attached = [
                {**x.to_dict(), "live": x.tap in taps} for x in runtime.attachments(act.rundir)
            ]
            d["running_as"] = act.net.to_dict()
        d["leases"] = leases
        d["attachments"] = attached
    if args.json:
        output.emit_json(d)
        return 0
    for k in ("name", "mode", "state", "bridge", "subnet", "gateway", "uplink", "netns"):
        if d.get(k) is not None:
            print(f"{k + ':':10} {d[k]}")
    if d.get("dhcp"):
        print(f"{'dhcp:':10} {d['dhcp_range'][0]} - {d['dhcp_range'][1]}", end="")
        print(f" (dnsmasq pid {d['dnsmasq_pid']})" if d["dnsmasq_pid"] else "")
    if attached:
        print("\nVMs:")
        output.table(
            [
                {**a, "ip": a["ip"] or "dhcp", "live": "yes" if a["live"] else "no"}
                for a in attached
            ],
            ["vm", "nic", "tap", "mac", "ip", "live"],
        )
    if leases:
        print("\nLeases:")
        output.table(leases, ["ip", "mac", "hostname", "expires_in"])
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from qlaunch.net import definitions, netns, runtime

    ns = _ns(args)
    net = definitions.load(args.name)
    with netns.entered(ns), runtime.locked(ns):
        was_up = runtime.is_up(ns, net)
        runtime.bring_up(ns, net)
    output.note(f"network {net.name} {'was already' if was_up else 'is'} up")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from qlaunch.net import netns, runtime

    ns = _ns(args)
    with netns.entered(ns), runtime.locked(ns):
        stopped = runtime.stop_network(ns, args.name, force=args.force)
    output.note(f"network {args.name} {'stopped' if stopped else 'was not up'}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from qlaunch.vm import netgc as gc

    ns = _ns(args)
    report = gc.collect(ns)
    if args.json:
        output.emit_json(report.to_dict())
        return 0
    for label, items in (
        ("released VMs", report.vms),
        ("took down networks", report.networks),
        ("killed dnsmasq", report.dnsmasq),
        ("removed taps", report.taps),
    ):
        if items:
            print(f"{label}: {', '.join(map(str, items))}")
    for p in report.problems:
        output.note(p)
    if not any((report.vms, report.networks, report.dnsmasq, report.taps)):
        print("nothing to collect")
    return 1 if report.problems else 0
