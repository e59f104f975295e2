"""Argument parsing, printing, and the one place errors become messages and exit codes.

Subcommands live in qlaunch/commands/*: each module has `register(sub)` that adds its parsers
and sets `func`. Heavy libraries (qemu.qmp, pyroute2, psutil) are imported inside handlers so
that `qlaunch cmdline` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from types import ModuleType
from typing import Any, NoReturn

from qlaunch import __version__
from qlaunch.cli import output
from qlaunch.cli.commands import remote
from qlaunch.errors import QlaunchError, UsageError

# The command modules (qlaunch.cli.commands.NAME), in the order --help lists their commands.
COMMAND_NAMES = (
    "core",
    "assets",
    "net",
    "image",
    "boards",
    "vm",
    "control",
    "agent",
    "ssh",
    "screenshot",
    "autostart",
    "migrate",
    "warm",
    "exec",
)
# Commands whose parser is built alone (their module's, not every module's): exec is the
# kernel loop, where each run pays for qlaunch's start (about 40 ms of imports and parsers).
ALONE = {"exec": "exec", "matrix": "exec"}


def _command_modules(names: Sequence[str]) -> list[ModuleType]:
    return [importlib.import_module(f"qlaunch.cli.commands.{n}") for n in names]


def __getattr__(name: str) -> Any:
    if name == "COMMAND_MODULES":
        return _command_modules(COMMAND_NAMES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


EXAMPLES = """\
examples:
  qlaunch run default -- uname -a          boot, run a command in the guest, exit with its status
  qlaunch run default                      boot it with a shell on the console (Ctrl-a x quits QEMU)
  qlaunch cmdline aarch64-virt --json      the QEMU argv a profile makes
  qlaunch run default --set machine.memory=1G -- free -m
  qlaunch host --json                      QEMU binaries and whether KVM really works here
  qlaunch assets fetch --arch x86_64,aarch64,arm
"""


# Subcommands that take a command for the guest after `--`.
GUEST_CMD_PROGS = {
    "qlaunch run": "qlaunch run PROFILE",
    "qlaunch cmdline": "qlaunch cmdline PROFILE",
    "qlaunch start": "qlaunch start PROFILE",
    "qlaunch exec": "qlaunch exec",
    "qlaunch ssh": "qlaunch ssh NAME",
}


GUEST_CMD_WORDS = {p.split()[1] for p in GUEST_CMD_PROGS}


def split_guest_cmd(args_list: list[str]) -> tuple[list[str], list[str] | None]:
    """qlaunch's own arguments, and the guest's command. For run, start, exec, ssh and
    cmdline (which shows what run, start or exec would run) everything after `--` is the
    guest's command, never qlaunch's options. For every other command `--` means what it
    means to any Unix tool, the end of the options: `qlaunch stop -- -x` stops a VM named -x."""
    end = args_list.index("--") if "--" in args_list else len(args_list)
    if command_word(args_list[:end]) in GUEST_CMD_WORDS:
        return args_list[:end], args_list[end + 1 :]
    return args_list, None


def command_word(args: Sequence[str]) -> str | None:
    """The subcommand in qlaunch's arguments: the first that is not an option (qlaunch's own
    options before it take no values)."""
    return next((a for a in args if not a.startswith("-")), None)


class _Parser(argparse.ArgumentParser):
    """argparse with qlaunch's one-line errors: no usage block, a hint to --help instead."""

    def error(self, message: str, hint: str | None = None) -> NoReturn:
        output.error(message, hint or f"{self.prog} --help")
        sys.exit(2)


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C would be: the same cleanup paths (QEMU stopped,
    temporary files, taps and leases released) run for a killed or hung-up qlaunch."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated(signum)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with only a command word of ALONE, just that command's (the same
    parser for what it parses)."""
    parser = _Parser(
        prog="qlaunch",
        description="A low-level QEMU launcher: profiles to argv, runs, supervision, QMP.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qlaunch {__version__}")
    parser.add_argument("--debug", action="store_true", help="tracebacks and debug logging")
    # Read by main() before parsing (qlaunch.cli.commands.remote); here for --help.
    parser.add_argument("--connect", metavar="URI", help=remote.HELP)
    parser.add_argument("--local-profile", metavar="FILE", action="append", help=remote.LOCAL_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = (ALONE[only],) if only in ALONE else COMMAND_NAMES
    for module in _command_modules(names):
        module.register(sub)
    return parser


def _english_only() -> None:
    """argparse asks gettext for a translation of every string it formats, and each ask stats
    a catalogue per language in the environment: about 0.1 s for qlaunch's 60 parsers, on
    every command. qlaunch's messages are English; the application says so, once."""
    argparse._ = str  # type: ignore[attr-defined]
    argparse.ngettext = lambda one, many, n: one if n == 1 else many  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> int:
    _english_only()
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        connect, local_profiles, args_list = remote.split(args_list)
        connect = remote.wanted(connect)
        if connect is not None or local_profiles:
            return _remote(connect, args_list, local_profiles)
    except QlaunchError as e:
        output.error(e.message, e.hint)
        return e.exit_code
    args_list, guest_cmd = split_guest_cmd(args_list)
    end = args_list.index("--") if "--" in args_list else len(args_list)
    # Error messages say "run again with --debug": it works after the subcommand too.
    debug = "--debug" in args_list[:end]
    args_list = [a for a in args_list[:end] if a != "--debug"] + args_list[end:]
    parser = build_parser(only=command_word(args_list))
    try:
        args = _parse(parser, args_list)
    except SystemExit as e:
        # Usage errors, --help and --version: a code to return, so that callers in-process
        # (tests, scripts) get it as the console script's caller does.
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    args.guest_cmd = guest_cmd
    args.debug = debug
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="qlaunch: %(name)s: %(message)s",
    )
    if not args.debug:
        # qemu.qmp logs a refused connection as an error; qlaunch's own message says it
        # better, once. The application sets this, never the library (pytest users decide).
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    if not getattr(args, "func", None):
        parser.print_help()
        output.error("no command given", "the commands are listed above")
        return 2
    handlers = _catch_termination()
    try:
        return int(args.func(args) or 0)
    except QlaunchError as e:
        if args.debug:
            traceback.print_exc()
        output.error(e.message, e.hint)
        return e.exit_code
    except _Terminated as e:
        print(f"qlaunch: terminated by {signal.Signals(e.signum).name}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("qlaunch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
    finally:
        for signum, old in handlers.items():
            signal.signal(signum, old)


def _remote(uri: str | None, args: list[str], profiles: list[str]) -> int:
    """The whole command runs on the host at uri (qlaunch.cli.commands.remote)."""
    if uri is None:
        raise UsageError("--local-profile goes with --connect", hint="qlaunch --help")
    if "--debug" in args:
        logging.basicConfig(level=logging.DEBUG, format="qlaunch: %(name)s: %(message)s")
    handlers = _catch_termination()
    try:
        return remote.forward(uri, args, profiles)
    except _Terminated as e:
        return 128 + e.signum
    except KeyboardInterrupt:
        return 130
    finally:
        for signum, old in handlers.items():
            signal.signal(signum, old)


def _parse(parser: argparse.ArgumentParser, args_list: list[str]) -> argparse.Namespace:
    args, unknown = parser.parse_known_args(args_list)
    if unknown:
        # Reported by the subcommand's parser, whose --help lists the options meant.
        sub = _innermost(parser, args)
        hint = None
        if not unknown[0].startswith("-") and sub.prog in GUEST_CMD_PROGS:
            usage = GUEST_CMD_PROGS[sub.prog]
            hint = f"the guest's command goes after --: {usage} -- {' '.join(unknown)}"
        sub.error(f"unrecognized arguments: {' '.join(unknown)}", hint)
    return args


def _innermost(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Any:
    """The (sub)parser that parsed the last command word in args."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if name is None or name not in subs[0].choices:
            return parser
        parser = subs[0].choices[name]


def _catch_termination() -> dict[int, Any]:
    """SIGTERM and SIGHUP become _Terminated; returns the handlers to put back."""
    if threading.current_thread() is not threading.main_thread():
        return {}  # signal handlers can only be set there (cli.main called from a thread)
    old: dict[int, Any] = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        handler = signal.getsignal(signum)
        if handler is signal.SIG_IGN:
            continue  # nohup and the like asked for this signal to be ignored: keep it so
        old[signum] = handler
        signal.signal(signum, _raise_terminated)
    return old
