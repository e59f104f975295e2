"""`qlaunch --connect URI COMMAND ...`: the command runs on another host, over ssh.

app.main hands the whole command line here when --connect (or $QLAUNCH_CONNECT) is given; the
remote qlaunch gets it as it was typed, minus --connect and --local-profile, and its output,
errors and exit code are the command's (qlaunch.remote.transport). Only ssh's own failures
are said here: an unreachable host, a refused key, an unknown host key, no qlaunch there
(one line each, exit 3).

`--local-profile FILE` sends a profile from this host along: FILE is read here (its `extends`
chain merged in), written into a temporary directory on the remote host for the command's
duration, and the command's argument FILE becomes that file:

    qlaunch --connect ssh://root@web1 --local-profile web.toml start web.toml --name web
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qlaunch.errors import UsageError

ENV = "QLAUNCH_CONNECT"
# Commands that are a terminal session when ours is one: the remote end gets a pty (so a
# console is raw, Ctrl-] detaches, and a dropped connection hangs the remote command up).
# Commands with a progress line on a terminal get one there too.
TERMINAL = {"console", "run", "ssh", "events", "log", "migrate", "save", "restore", "image"}
TERMINAL |= {"assets", "exec"}

HELP = (
    "run COMMAND on another host over ssh (also $QLAUNCH_CONNECT): "
    "ssh://[user@]host[:port][?command=/path/to/qlaunch&keyfile=PATH&known_hosts=PATH]. "
    "Profiles, disks and other files named on the command line are that host's"
)
LOCAL_HELP = (
    "with --connect: send this host's profile FILE along; the argument FILE of the command "
    "names it (e.g. --local-profile web.toml start web.toml)"
)


def split(args: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
    """(--connect's URI or None, --local-profile files, the rest). Both are global options:
    only before the command word are they qlaunch's (after it they belong to the command)."""
    uri: str | None = None
    profiles: list[str] = []
    rest: list[str] = []
    i = 0
    args = list(args)
    while i < len(args):
        a = args[i]
        if a == "--" or not a.startswith("-"):
            rest += args[i:]
            break
        for opt in ("--connect", "--local-profile"):
            if a == opt or a.startswith(opt + "="):
                if a == opt:
                    if i + 1 >= len(args):
                        raise UsageError(f"{opt} needs a value", hint="qlaunch --help")
                    value = args[i + 1]
                    i += 2
                else:
                    value = a.split("=", 1)[1]
                    i += 1
                if opt == "--connect":
                    uri = value
                else:
                    profiles.append(value)
                break
        else:
            rest.append(a)
            i += 1
    return uri, profiles, rest


def wanted(uri: str | None) -> str | None:
    """The URI to forward to: --connect's, else $QLAUNCH_CONNECT; '' means here."""
    if uri is None:
        uri = os.environ.get(ENV, "")
    return uri or None


def forward(uri: str, args: list[str], profiles: Sequence[str]) -> int:
    """Run `qlaunch ARGS` on the host at uri; its exit code."""
    from qlaunch.remote import transport
    from qlaunch.remote import uri as urimod

    conn = transport.Connection(urimod.parse(uri))
    words: list[transport.Word] = list(args)
    for f in profiles:
        words = _send_profile(f, words)
    word = next((a for a in args if not a.startswith("-")), None)
    # A pty there merges the command's stdout and stderr: only when both end on this terminal.
    tty = word in TERMINAL and all(f.isatty() for f in (sys.stdin, sys.stdout, sys.stderr))
    return conn.call(words, tty=tty)


def _send_profile(file: str, words: list[Any]) -> list[Any]:
    from qlaunch.config import profile as profmod
    from qlaunch.remote.transport import FileArg

    if file not in words:
        raise UsageError(
            f"--local-profile {file}: the command does not name {file}",
            hint=f"name it where the command takes its profile: qlaunch --connect URI "
            f"--local-profile {file} start {file}",
        )
    path = Path(file)
    data = profmod.load_raw(path)
    name = path.name if path.name.endswith(".toml") else f"{path.name}.toml"
    arg = FileArg(name, to_toml(data))
    return [arg if w == file else w for w in words]


def to_toml(data: dict[str, Any]) -> str:
    """A profile's merged table as TOML: one `key = value` line per top-level key, tables
    inline (TOML's strings, numbers, booleans, arrays and inline tables are JSON-like)."""
    return "".join(f"{_key(k)} = {_value(v)}\n" for k, v in data.items())


def _key(k: str) -> str:
    return json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise UsageError(f"a profile value qlaunch cannot send: {v!r}")
