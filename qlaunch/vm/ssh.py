"""The way into a VM over ssh: where to connect, with which key, and the `ssh` argv.

    from qlaunch.vm import ssh
    way = ssh.find_way(vm)                  # Way(host="127.0.0.1", port=2222, netns=None, ...)
    argv = ssh.argv(vm, way, user="debian", key=None, command=["uname", "-m"])

The way, in this order:
1. a user-mode NIC's forward to guest port 22 (`forward = ["tcp:127.0.0.1:2222-:22"]`; an
   empty or 0.0.0.0 host address means 127.0.0.1);
2. the guest's address on a NIC on a qlaunch network or a host bridge: the one its guest
   agent reports for that NIC's MAC, else the NIC's DHCP lease (qlaunch networks).
QEMU's forwards listen where QEMU runs, and qlaunch networks live in the VM's namespace, so
ssh runs in the VM's network namespace when it has one.

The key: the one given, else the private key beside a `.pub` that matches one of the
profile's `[cloud-init] ssh_authorized_keys` (looked for in ~/.ssh and in the profile's own
directory), else whatever ssh would use by itself. Host keys go to a known_hosts file in the
VM's state directory (new at each start), accepted on first sight: a VM rebuilt under the same
name is not refused, and a changed key during one run still is.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlaunch.errors import StateError, UsageError

if TYPE_CHECKING:
    from qlaunch.vm.api import VM

DEFAULT_USER = "debian"  # Debian's cloud images (and qlaunch image build) name it so
CONNECT_TIMEOUT = 10
GUEST_PORT = 22


@dataclass(frozen=True)
class Way:
    host: str
    port: int
    netns: str | None
    via: str  # how it was found: "forward tcp:127.0.0.1:2222-:22", "agent", "lease"


def profile_of(vm: VM) -> dict[str, Any]:
    """What profile.json says about the VM: the merged profile (`profile`) and its source."""
    try:
        data = json.loads((vm.dir / "profile.json").read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def parse_forward(rule: str) -> tuple[str, str, int, str, int] | None:
    """QEMU's hostfwd syntax, [tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT, as
    (proto, host address, host port, guest address, guest port); None if it is not that."""
    try:
        host, guest = rule.split("-", 1)
        proto, haddr, hport = host.split(":") if host.count(":") == 2 else ("tcp", *host.split(":"))
        gaddr, gport = guest.rsplit(":", 1)
        return (proto or "tcp", haddr, int(hport), gaddr, int(gport))
    except ValueError:
        return None


def forward_way(prof: dict[str, Any]) -> Way | None:
    for net in prof.get("net") or []:
        if not isinstance(net, dict) or net.get("mode", "user") != "user":
            continue
        for rule in net.get("forward") or []:
            f = parse_forward(str(rule))
            if f and f[0] == "tcp" and f[4] == GUEST_PORT:
                host = f[1] if f[1] not in ("", "0.0.0.0") else "127.0.0.1"
                return Way(host, f[2], None, f"forward {rule}")
    return None


def find_way(vm: VM) -> Way:
    """Where ssh connects; StateError (exit 5) naming what is missing when there is no way."""
    from qlaunch.vm import agent
    from qlaunch.vm.api import _nics_status

    live = vm.live()
    if live.qemu is None:
        raise StateError(f"VM {vm.name} is not running (state {live.state})")
    rec = live.record
    prof = profile_of(vm).get("profile") or {}
    way = forward_way(prof)
    if way is not None:
        return Way(way.host, way.port, rec.netns, way.via)
    reachable = [n for n in rec.nics if n.get("network") or n.get("bridge")]
    if not reachable:
        raise StateError(
            f"VM {vm.name} has no way in for ssh: no user-mode forward to port 22 and no NIC "
            "on a qlaunch network or a host bridge",
            hint='give its [[net]] forward = ["tcp:127.0.0.1:2222-:22"] (mode user)',
        )
    macs = {str(n.get("mac", "")).lower() for n in reachable}
    found = agent.addresses(vm, live, probe=True) or []
    for fam in ("ipv4", "ipv6"):
        for a in found:
            mac = str(a.get("mac") or "").lower()
            if mac in macs and a.get("family") == fam and not a["address"].startswith("fe80:"):
                return Way(a["address"], GUEST_PORT, rec.netns, "agent")
    for n in _nics_status(rec):
        if n.get("lease"):
            return Way(str(n["lease"]), GUEST_PORT, rec.netns, "lease")
    raise StateError(
        f"VM {vm.name}: no address known yet for its NIC on "
        + ", ".join(str(n.get("network") or n.get("bridge")) for n in reachable),
        hint="the guest may still be booting: --wait SECONDS waits for it",
    )


def _key_id(line: str) -> tuple[str, str] | None:
    """(type, base64) of an authorized_keys or .pub line; options before the type are
    skipped."""
    parts = line.split()
    for i, p in enumerate(parts[:-1]):
        if p.startswith(("ssh-", "ecdsa-", "sk-")):
            return (p, parts[i + 1])
    return None


def key_dirs(vm: VM) -> list[Path]:
    dirs = [Path.home() / ".ssh"]
    source = profile_of(vm).get("source")
    if source and "/" in str(source):
        dirs.append(Path(str(source)).parent)
    return dirs


def find_key(vm: VM) -> Path | None:
    """The private key whose public half is one of the profile's cloud-init keys."""
    ci = (profile_of(vm).get("profile") or {}).get("cloud-init") or {}
    wanted = {k for k in map(_key_id, map(str, ci.get("ssh_authorized_keys") or [])) if k}
    if not wanted:
        return None
    for d in key_dirs(vm):
        with contextlib.suppress(OSError):
            for pub in sorted(d.glob("*.pub")):
                with contextlib.suppress(OSError, UnicodeDecodeError):
                    if _key_id(pub.read_text().strip()) in wanted:
                        private = pub.with_suffix("")
                        if private.is_file():
                            return private
    return None


def argv(
    vm: VM,
    way: Way,
    *,
    user: str = DEFAULT_USER,
    key: str | os.PathLike[str] | None = None,
    command: Sequence[str] = (),
    batch: bool | None = None,
    connect_timeout: int = CONNECT_TIMEOUT,
    extra: Sequence[str] = (),
) -> list[str]:
    """The system ssh's argv. batch (default: stdin is not a terminal): no password or
    passphrase prompts. The command's words go to ssh as they are; ssh joins them with
    spaces and the guest's login shell runs the line, as with plain ssh."""
    if batch is None:
        batch = not sys.stdin.isatty()
    out = [
        "ssh",
        "-o",
        f"UserKnownHostsFile={vm.dir / 'known_hosts'}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=accept-new",
        "-o",
        f"ConnectTimeout={connect_timeout}",
        # "Permanently added ... to the list of known hosts" on every new VM is noise.
        "-o",
        "LogLevel=ERROR",
    ]
    if batch:
        out += ["-o", "BatchMode=yes"]
    if key is not None:
        out += ["-i", str(key), "-o", "IdentitiesOnly=yes"]
    out += [*extra, "-p", str(way.port), "-l", user, "--", way.host, *command]
    return out


def check_key(key: str) -> Path:
    p = Path(key)
    if not p.is_file():
        raise UsageError(f"no key file {key}", hint="-i takes the private key's path")
    return p


def banner(way: Way, timeout: float = 3.0) -> str | None:
    """The ssh server's identification line ("SSH-2.0-OpenSSH_9.2p1 ..."), or None when
    nothing answers with one. Read in the VM's namespace."""
    from qlaunch.net import netns

    with netns.entered(way.netns):
        try:
            s = socket.create_connection((way.host, way.port), timeout=timeout)
        except OSError:
            return None
    deadline = time.monotonic() + timeout
    data = b""
    with s:
        # A user-mode forward accepts at once even while nothing listens in the guest; then
        # the connection just ends. Only a banner means sshd is there.
        while b"\n" not in data and time.monotonic() < deadline:
            try:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(256)
            except OSError:
                return None
            if not chunk:
                break
            data += chunk
    line = data.split(b"\n", 1)[0].strip().decode(errors="replace")
    return line if line.startswith("SSH-") else None
