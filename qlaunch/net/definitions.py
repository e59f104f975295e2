"""Network definitions: one TOML file per network in config_dir()/networks/NAME.toml.

A definition says what a network is (mode, subnet, DHCP, uplink, bridge); whether it is up is
runtime state (qlaunch.net.runtime). Definitions are shared by every namespace: the same network
can be up in several namespaces at once.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlaunch import paths
from qlaunch.errors import StateError, UsageError

MODES = ("nat", "route", "isolated", "bridge")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")


@dataclass(frozen=True)
class Network:
    name: str
    mode: str
    bridge: str  # the bridge qlaunch makes (nat/route/isolated) or an existing one (bridge)
    subnet: ipaddress.IPv4Network | None = None  # None only in bridge mode
    dhcp: bool = True
    uplink: str | None = None  # nat/route: forward only through this interface

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        assert self.subnet is not None
        return next(self.subnet.hosts())

    @property
    def managed(self) -> bool:
        """True when qlaunch makes the bridge, its address, rules and dnsmasq."""
        return self.mode != "bridge"

    @property
    def serves_dhcp(self) -> bool:
        return self.managed and self.dhcp

    def dhcp_range(self) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
        """The dynamic pool: the upper half of the subnet, so the lower half stays for static."""
        assert self.subnet is not None
        hosts = list(self.subnet.hosts())
        start = max(1, len(hosts) // 2)
        return hosts[start], hosts[-1]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "mode": self.mode, "bridge": self.bridge}
        if self.subnet is not None:
            d["subnet"] = str(self.subnet)
            d["gateway"] = str(self.gateway)
            d["dhcp"] = self.dhcp
            if self.dhcp:
                lo, hi = self.dhcp_range()
                d["dhcp_range"] = [str(lo), str(hi)]
        if self.uplink:
            d["uplink"] = self.uplink
        return d


def validate_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise UsageError(
            f"{name!r} is not a network name",
            hint="letters, digits, '-' and '_', starting with a letter or digit, at most 32",
        )
    return name


def validate_ifname(name: str, what: str) -> str:
    if not IFNAME_RE.match(name):
        raise UsageError(f"{what} {name!r} is not an interface name (at most 15 characters)")
    return name


def default_bridge(name: str) -> str:
    """ql-NAME when it fits the kernel's 15 characters, else a short name with a hash."""
    if len(name) <= 12:
        return f"ql-{name}"
    return f"ql-{name[:7]}-{hashlib.sha256(name.encode()).hexdigest()[:4]}"


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise UsageError(f"--subnet {text!r}: {e}", hint="like 10.77.0.0/24") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise UsageError(f"--subnet {text!r}: only IPv4 subnets are supported")
    if net.prefixlen > 29:
        raise UsageError(f"--subnet {text!r} is too small (at most /29)")
    if not net.is_private:
        raise UsageError(
            f"--subnet {text!r} is not a private range",
            hint="use an RFC 1918 range such as 10.77.0.0/24",
        )
    return net


def make(
    name: str,
    mode: str = "nat",
    subnet: str | None = None,
    dhcp: bool = True,
    uplink: str | None = None,
    bridge: str | None = None,
) -> Network:
    """A validated Network from user input (CLI flags or a file)."""
    validate_name(name)
    if mode not in MODES:
        raise UsageError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if uplink is not None:
        validate_ifname(uplink, "uplink")
        if mode not in ("nat", "route"):
            raise UsageError(f"--uplink is for nat and route networks, not {mode}")
    if mode == "bridge":
        if not bridge:
            raise UsageError(
                "a bridge network needs the existing host bridge", hint="--bridge BRIDGE"
            )
        if subnet:
            raise UsageError("a bridge network takes no --subnet: the host bridge's LAN has one")
        return Network(name, mode, validate_ifname(bridge, "bridge"), None, False, None)
    if not subnet:
        raise UsageError(f"network {name} needs a subnet", hint="--subnet 10.77.0.0/24")
    br = validate_ifname(bridge, "bridge") if bridge else default_bridge(name)
    return Network(name, mode, br, parse_subnet(subnet), dhcp, uplink)


def directory() -> Path:
    return paths.config_dir() / "networks"


def path_of(name: str) -> Path:
    return directory() / f"{validate_name(name)}.toml"


def load(name: str) -> Network:
    p = path_of(name)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise StateError(
            f"no network {name!r}", hint=f"qlaunch net create {name} --subnet 10.77.0.0/24"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{p}: {e}") from None
    try:
        return make(
            name,
            mode=str(data.get("mode", "nat")),
            subnet=data.get("subnet"),
            dhcp=bool(data.get("dhcp", True)),
            uplink=data.get("uplink"),
            bridge=data.get("bridge"),
        )
    except UsageError as e:
        raise UsageError(f"{p}: {e.message}", hint=e.hint) from None


def all_networks() -> list[Network]:
    d = directory()
    if not d.is_dir():
        return []
    return [load(p.stem) for p in sorted(d.glob("*.toml")) if NAME_RE.match(p.stem)]


def _toml(net: Network) -> str:
    lines = [f'mode = "{net.mode}"', f'bridge = "{net.bridge}"']
    if net.subnet is not None:
        lines.append(f'subnet = "{net.subnet}"')
        lines.append(f"dhcp = {'true' if net.dhcp else 'false'}")
    if net.uplink:
        lines.append(f'uplink = "{net.uplink}"')
    return "# qlaunch network definition\n" + "\n".join(lines) + "\n"


def check_clashes(net: Network, others: list[Network]) -> None:
    for o in others:
        if o.name == net.name:
            raise StateError(f"network {net.name!r} exists", hint=f"qlaunch net delete {net.name}")
        if net.managed and o.managed and o.bridge == net.bridge:
            raise StateError(f"network {o.name!r} already uses bridge {net.bridge}")
        if net.subnet and o.subnet and net.subnet.overlaps(o.subnet):
            raise StateError(
                f"subnet {net.subnet} overlaps network {o.name!r} ({o.subnet})",
                hint="pick another --subnet",
            )


def create(net: Network) -> Path:
    """Write the definition; refuses a name, bridge or subnet another network has."""
    check_clashes(net, all_networks())
    d = directory()
    d.mkdir(parents=True, exist_ok=True)
    p = path_of(net.name)
    tmp = p.with_name(f".{p.name}.{os.getpid()}")
    tmp.write_text(_toml(net))
    try:
        # link() fails if the name exists: two creates of one name race safely.
        os.link(tmp, p)
    except FileExistsError:
        raise StateError(f"network {net.name!r} exists") from None
    finally:
        tmp.unlink()
    return p


def remove(name: str) -> None:
    try:
        path_of(name).unlink()
    except FileNotFoundError:
        raise StateError(f"no network {name!r}") from None
