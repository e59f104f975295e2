"""Argument parsing, printing, and the one place errors become messages and exit codes.

Subcommands live in qlaunch/commands/*: each module has `register(sub)` that adds its parsers
and sets `func`. Heavy libraries (qemu.qmp, pyroute2, psutil) are imported inside handlers so
that `qlaunch cmdline` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from qlaunch import __version__
from qlaunch.errors import QlaunchError

COMMAND_MODULES = [
    "qlaunch.commands.core",
    "qlaunch.commands.assets",
    "qlaunch.commands.net",
    "qlaunch.commands.image",
    "qlaunch.commands.boards",
    "qlaunch.commands.vm",
    "qlaunch.commands.control",
    "qlaunch.commands.exec",
]

EXAMPLES = """\
examples:
  qlaunch run default -- uname -a          boot, run a command in the guest, exit with its status
  qlaunch run default                      boot it with a shell on the console (Ctrl-a x quits QEMU)
  qlaunch cmdline aarch64-virt --json      the QEMU argv a profile makes
  qlaunch run default --set machine.memory=1G -- free -m
  qlaunch host --json                      QEMU binaries and whether KVM really works here
  qlaunch assets fetch --arch x86_64,aarch64,arm
"""


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def note(message: str) -> None:
    """A one-line remark on stderr that is not an error (e.g. why TCG was picked)."""
    print(f"qlaunch: {message}", file=sys.stderr)


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns).rstrip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlaunch",
        description="A low-level QEMU launcher: profiles to argv, runs, supervision, QMP.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qlaunch {__version__}")
    parser.add_argument("--debug", action="store_true", help="tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # Everything after `--` is the guest's command, never qlaunch's options.
    guest_cmd: list[str] | None = None
    if "--" in args_list:
        i = args_list.index("--")
        args_list, guest_cmd = args_list[:i], args_list[i + 1 :]
    parser = build_parser()
    args = parser.parse_args(args_list)
    args.guest_cmd = guest_cmd
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="qlaunch: %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except QlaunchError as e:
        if args.debug:
            traceback.print_exc()
        hint = f" (hint: {e.hint})" if e.hint else ""
        print(f"qlaunch: error: {e.message}{hint}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("qlaunch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
