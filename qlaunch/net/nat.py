"""NAT and forwarding with nftables: one table, `inet qlaunch`, with chains per network.

The whole table is rewritten in one `nft -f -` transaction from the networks that are up in
this namespace, so a rule never outlives its network and gc is a rewrite. nft reads the rules
on stdin; it is spawned with an argv, never through a shell.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from qlaunch import spawn
from qlaunch.errors import HostError
from qlaunch.net.definitions import Network

log = logging.getLogger(__name__)

TABLE = "qlaunch"
NFT = "nft"


def _chains(net: Network) -> tuple[list[str], list[str], list[str]]:
    """(forward base-chain jumps, postrouting jumps, chain bodies) for one network."""
    br = f'"{net.bridge}"'
    fwd = f"fwd-{net.name}"
    nat = f"nat-{net.name}"
    subnet = str(net.subnet)
    up = f' oifname "{net.uplink}"' if net.uplink else ""
    up_in = f' iifname "{net.uplink}"' if net.uplink else ""
    jumps = [f"iifname {br} jump {fwd}", f"oifname {br} jump {fwd}"]
    rules = [f"iifname {br} oifname {br} accept"]
    post: list[str] = []
    body: list[str] = []
    if net.mode == "nat":
        rules += [
            f"iifname {br} ip saddr {subnet}{up} accept",
            f"oifname {br} ip daddr {subnet} ct state established,related accept",
        ]
        post = [f"ip saddr {subnet} ip daddr != {subnet} jump {nat}"]
        nat_rules = ["ip daddr 224.0.0.0/24 return", "ip daddr 255.255.255.255 return"]
        if net.uplink:
            nat_rules.append(f'oifname != "{net.uplink}" return')
        nat_rules.append("masquerade")
        body.append(_chain(nat, nat_rules))
    elif net.mode == "route":
        rules += [
            f"iifname {br} ip saddr {subnet}{up} accept",
            f"oifname {br} ip daddr {subnet}{up_in} accept",
        ]
    # isolated, and anything the rules above did not accept: no forwarding at all.
    rules += [f"iifname {br} reject", f"oifname {br} reject"]
    body.insert(0, _chain(fwd, rules))
    return jumps, post, body


def _chain(name: str, rules: Iterable[str], head: str | None = None) -> str:
    lines = [f"\tchain {name} {{"]
    if head:
        lines.append(f"\t\t{head}")
    lines += [f"\t\t{r}" for r in rules]
    lines.append("\t}")
    return "\n".join(lines)


def ruleset(networks: Iterable[Network]) -> str:
    """The nft script that makes the table hold exactly these networks' chains (pure)."""
    nets = [n for n in networks if n.managed]
    script = [f"table inet {TABLE} {{}}", f"delete table inet {TABLE}"]
    if not nets:
        return "\n".join(script) + "\n"
    jumps: list[str] = []
    post: list[str] = []
    bodies: list[str] = []
    for n in sorted(nets, key=lambda n: n.name):
        j, p, b = _chains(n)
        jumps += j
        post += p
        bodies += b
    chains = [
        _chain("forward", jumps, "type filter hook forward priority filter; policy accept;"),
        _chain("postrouting", post, "type nat hook postrouting priority srcnat; policy accept;"),
        *bodies,
    ]
    script.append(f"table inet {TABLE} {{\n" + "\n".join(chains) + "\n}")
    return "\n".join(script) + "\n"


def apply(networks: Iterable[Network]) -> None:
    """Rewrite the table in the calling thread's namespace; turn on IPv4 forwarding if needed."""
    nets = list(networks)
    text = ruleset(nets)
    try:
        r = spawn.run([NFT, "-f", "-"], input=text)
    except FileNotFoundError:
        raise HostError("nft is not installed", hint="apt-get install nftables") from None
    if r.returncode != 0:
        raise HostError(f"nft refused the qlaunch table: {r.stderr.strip()}")
    if any(n.mode in ("nat", "route") for n in nets):
        set_forwarding(True)


def set_forwarding(on: bool) -> None:
    # /proc/sys/net follows the opening thread's namespace, so this is the one we are in.
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n" if on else "0\n")


def listing() -> str:
    """`nft list table inet qlaunch` here, or "" when there is none."""
    r = spawn.run([NFT, "list", "table", "inet", TABLE])
    return r.stdout if r.returncode == 0 else ""
