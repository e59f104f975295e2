"""Where a remote host is: `ssh://[USER@]HOST[:PORT][/][?KEY=VALUE&...]`, as libvirt writes it.

    target = parse("ssh://root@web1:2222?command=/opt/qlaunch/bin/qlaunch")

Query keys (libvirt's names where it has one):
  command      the remote qlaunch: a path, or a name looked up on the remote PATH (default
               `qlaunch`)
  keyfile      the private key to log in with (only that one: IdentitiesOnly)
  known_hosts  the known_hosts file that holds the host's key
Anything else is refused, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from qlaunch.errors import UsageError

KEYS = ("command", "keyfile", "known_hosts")
DEFAULT_COMMAND = "qlaunch"
EXAMPLE = "ssh://user@host[:port][?command=/path/to/qlaunch]"
# A host name or an address: never something ssh would read as one of its own options.
_HOST = re.compile(r"[A-Za-z0-9_.:%-]+")
_USER = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.@-]*")


@dataclass(frozen=True)
class Target:
    host: str
    user: str | None = None
    port: int | None = None
    command: str = DEFAULT_COMMAND
    keyfile: str | None = None
    known_hosts: str | None = None

    @property
    def where(self) -> str:
        """user@host[:port], how messages name the host."""
        who = f"{self.user}@" if self.user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{who}{host}" + (f":{self.port}" if self.port else "")

    def uri(self) -> str:
        """The URI back, with the keys that differ from the defaults."""
        q = [
            f"{k}={v}"
            for k, v in (
                ("command", self.command if self.command != DEFAULT_COMMAND else None),
                ("keyfile", self.keyfile),
                ("known_hosts", self.known_hosts),
            )
            if v is not None
        ]
        return f"ssh://{self.where}" + (f"?{'&'.join(q)}" if q else "")

    def key(self) -> str:
        """A short stable name for the connection (its control socket): one master per
        (user, host, port, key, known_hosts)."""
        ident = "\0".join(
            str(x) for x in (self.user, self.host, self.port, self.keyfile, self.known_hosts)
        )
        return hashlib.sha1(ident.encode()).hexdigest()[:20]


def parse(text: str, what: str = "--connect") -> Target:
    """A Target, or UsageError saying what is wrong with text (what: how to name it)."""
    bad = f"{what} {text!r}"
    try:
        u = urlsplit(text)
        port = u.port
    except ValueError as e:
        raise UsageError(f"{bad}: {e}", hint=f"write it as {EXAMPLE}") from None
    if u.scheme != "ssh":
        raise UsageError(
            f"{bad}: only ssh:// URIs are supported (qlaunch runs on the remote host over ssh)",
            hint=f"write it as {EXAMPLE}",
        )
    host = u.hostname
    if not host or not _HOST.fullmatch(host) or host.startswith("-"):
        raise UsageError(f"{bad}: no host name in it", hint=f"write it as {EXAMPLE}")
    user = unquote(u.username) if u.username else None
    if user is not None and not _USER.fullmatch(user):
        raise UsageError(f"{bad}: {user!r} is not a user name ssh would take")
    if u.password is not None:
        raise UsageError(f"{bad}: no password in the URI: ssh logs in with keys")
    if u.path not in ("", "/") or u.fragment:
        raise UsageError(f"{bad}: no path after the host", hint=f"write it as {EXAMPLE}")
    if port == 0:
        raise UsageError(f"{bad}: port 0 is not a port")
    opts: dict[str, str] = {}
    for k, v in parse_qsl(u.query, keep_blank_values=True, strict_parsing=False):
        if k not in KEYS:
            raise UsageError(f"{bad}: unknown key {k!r}", hint=f"known: {', '.join(KEYS)}")
        if not v or "\0" in v:
            raise UsageError(f"{bad}: {k} needs a value")
        opts[k] = v
    command = opts.get("command", DEFAULT_COMMAND)
    return Target(
        host=host,
        user=user,
        port=port,
        command=command,
        keyfile=opts.get("keyfile"),
        known_hosts=opts.get("known_hosts"),
    )
