"""Running in a named network namespace (`ip netns add NAME`, /run/netns/NAME).

The calling thread joins the namespace with setns(2) and leaves it afterwards. Sockets keep the
namespace they were made in, and children fork from the calling thread, so nft, dnsmasq and QEMU
spawned inside `entered()` live in the namespace with no `ip netns exec` wrapper.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qlaunch.errors import HostError, UsageError

NETNS_DIR = Path("/run/netns")
ENV = "QLAUNCH_NETNS"
CLONE_NEWNET = 0x40000000
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")

_libc = ctypes.CDLL(None, use_errno=True)


def validate(name: str) -> str:
    if not NAME_RE.match(name):
        raise UsageError(
            f"{name!r} is not a network namespace name",
            hint="letters, digits, '.', '-' and '_', at most 64",
        )
    return name


def from_env(value: str | None) -> str | None:
    """--netns if given, else $QLAUNCH_NETNS; an empty value means the caller's namespace."""
    if value is None:
        value = os.environ.get(ENV)
    return validate(value) if value else None


def key(name: str | None) -> str:
    """A directory name for this namespace's runtime state; never a valid namespace name."""
    return "@host" if name is None else name


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def require(name: str | None) -> str | None:
    """NAME if that namespace exists (None passes): lets a start refuse a missing namespace
    before it has made anything."""
    if name is not None and not exists(validate(name)):
        raise HostError(
            f"no network namespace {name!r}", hint=f"create it with: ip netns add {name}"
        )
    return name


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise HostError(f"cannot enter a network namespace: {os.strerror(err)}", hint="run as root")


@contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the body (and everything it spawns) in namespace NAME; None: stay where we are."""
    if name is None:
        yield
        return
    path = NETNS_DIR / validate(name)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise HostError(
            f"no network namespace {name!r}", hint=f"create it with: ip netns add {name}"
        ) from None
    except PermissionError:
        raise HostError(f"cannot open {path}", hint="network namespaces need root") from None
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)
