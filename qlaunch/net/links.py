"""Bridges, taps and veth pairs with pyroute2, in the calling thread's network namespace.

Taps are opened through /dev/net/tun without IFF_PERSIST: the tap exists while some process holds
its fd, so when QEMU (and whoever passed it the fd) dies, even by SIGKILL, the kernel removes it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from qlaunch.errors import HostError, StateError

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TAP_PREFIX = "qt-"
ALIAS_PREFIX = "qlaunch "


@contextmanager
def iproute() -> Iterator[Any]:
    from pyroute2 import IPRoute

    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def netlink_error(e: Exception) -> int:
    code = getattr(e, "code", None)
    return int(code) if isinstance(code, int) else 0


def index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


@dataclass(frozen=True)
class Link:
    name: str
    index: int
    kind: str | None
    master: int | None
    alias: str | None
    up: bool
    tun_persist: bool | None


def links(ipr: Any) -> list[Link]:
    out = []
    for msg in ipr.get_links():
        info = msg.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        persist = None
        if kind == "tun":
            data = info.get_attr("IFLA_INFO_DATA")
            persist = bool(data.get_attr("IFLA_TUN_PERSIST")) if data else None
        out.append(
            Link(
                name=msg.get_attr("IFLA_IFNAME"),
                index=int(msg["index"]),
                kind=kind,
                master=msg.get_attr("IFLA_MASTER"),
                alias=msg.get_attr("IFLA_IFALIAS"),
                up=bool(msg["flags"] & 1),
                tun_persist=persist,
            )
        )
    return out


def bridge_mac(name: str) -> str:
    """A fixed bridge address: without one the bridge takes its lowest port's and changes."""
    h = hashlib.sha256(f"bridge/{name}".encode()).digest()
    return "52:54:00:{:02x}:{:02x}:{:02x}".format(*h[:3])


def make_bridge(ipr: Any, name: str, address: str, prefixlen: int, alias: str) -> int:
    """Create an up bridge with its gateway address; fails if NAME exists."""
    try:
        ipr.link("add", ifname=name, kind="bridge", address=bridge_mac(name), br_stp_state=0)
    except Exception as e:
        if netlink_error(e) == errno.EEXIST:
            raise StateError(
                f"interface {name} exists",
                hint="another network or program uses that name; pick --bridge",
            ) from None
        raise HostError(f"cannot create bridge {name}: {e}") from None
    idx = index(ipr, name)
    assert idx is not None
    try:
        ipr.link("set", index=idx, ifalias=alias)
        ipr.addr("add", index=idx, address=address, prefixlen=prefixlen)
        ipr.link("set", index=idx, state="up")
    except Exception as e:
        delete(ipr, name)
        if netlink_error(e) == errno.EEXIST:
            raise StateError(f"address {address}/{prefixlen} is in use here") from None
        raise HostError(f"cannot set up bridge {name}: {e}") from None
    return idx


def delete(ipr: Any, name: str) -> bool:
    idx = index(ipr, name)
    if idx is None:
        return False
    try:
        ipr.link("del", index=idx)
    except Exception as e:
        if netlink_error(e) != errno.ENODEV:
            raise HostError(f"cannot delete interface {name}: {e}") from None
        return False
    return True


def address_in_use(ipr: Any, address: str) -> str | None:
    """The interface that already has ADDRESS, if any."""
    for msg in ipr.get_addr(family=2):
        if msg.get_attr("IFA_ADDRESS") == address:
            name = msg.get_attr("IFA_LABEL")
            return str(name) if name else f"interface #{msg['index']}"
    return None


def tap_name(vm_name: str, nic: int) -> str:
    """qt-VM-N, or qt-<6 chars of VM><4 hex>-N when that is longer than 15 characters."""
    name = f"{TAP_PREFIX}{vm_name}-{nic}"
    if len(name) <= 15:
        return name
    h = hashlib.sha256(vm_name.encode()).hexdigest()[:4]
    return f"{TAP_PREFIX}{vm_name[:6]}{h}-{nic}"


def tap_alias(vm_name: str, nic: int) -> str:
    return f"{ALIAS_PREFIX}vm={vm_name} nic={nic}"


def parse_alias(alias: str | None) -> tuple[str, int] | None:
    """(vm name, nic index) from a tap's alias, or None for taps not ours."""
    if not alias or not alias.startswith(ALIAS_PREFIX):
        return None
    fields = dict(f.split("=", 1) for f in alias[len(ALIAS_PREFIX) :].split() if "=" in f)
    try:
        return fields["vm"], int(fields["nic"])
    except (KeyError, ValueError):
        return None


def open_tap(name: str) -> int:
    """A new non-persistent tap NAME in this namespace; returns its fd (close-on-exec set).

    A name in use is refused rather than shared: TUNSETIFF on a live tap's name fails EBUSY,
    and a leftover persistent tap would be attached to, so that is refused first by the caller.
    """
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EBUSY:
            raise StateError(f"tap {name} is in use by another process") from None
        raise HostError(f"cannot create tap {name}: {e.strerror}", hint="needs root") from None
    return fd


def attach_tap(ipr: Any, name: str, bridge: str, mac: str, alias: str) -> None:
    """Put tap NAME on BRIDGE and up. Its own address is MAC with fe: first, as libvirt does,
    so that the bridge (whose address is fixed anyway) never prefers it."""
    idx = index(ipr, name)
    br = index(ipr, bridge)
    if idx is None:
        raise HostError(f"tap {name} vanished while being set up")
    if br is None:
        raise StateError(f"bridge {bridge} does not exist here")
    try:
        ipr.link("set", index=idx, address="fe:" + mac[3:], ifalias=alias)
        ipr.link("set", index=idx, master=br, state="up")
    except Exception as e:
        raise HostError(f"cannot attach tap {name} to {bridge}: {e}") from None


def make_veth(ipr: Any, name: str, peer: str, peer_netns: str | None = None) -> None:
    """A veth pair; with peer_netns the peer end moves to that named namespace."""
    try:
        ipr.link("add", ifname=name, kind="veth", peer=peer)
    except Exception as e:
        raise HostError(f"cannot create veth {name}: {e}") from None
    if peer_netns:
        pidx = index(ipr, peer)
        ipr.link("set", index=pidx, net_ns_fd=peer_netns)


def up(ipr: Any, name: str, address: str | None = None, prefixlen: int = 24) -> None:
    idx = index(ipr, name)
    if idx is None:
        raise StateError(f"no interface {name}")
    if address:
        ipr.addr("add", index=idx, address=address, prefixlen=prefixlen)
    ipr.link("set", index=idx, state="up")
