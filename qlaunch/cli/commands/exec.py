"""`exec`: boot a kernel, run a command in it, exit with the command's code (or a failure's)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qlaunch.cli import output
from qlaunch.cli.argtypes import positive
from qlaunch.cli.commands.core import add_set_arg
from qlaunch.config import boards

EXAMPLES = """\
examples:
  qlaunch exec -- uname -r                         the default profile's kernel (x86_64)
  qlaunch exec --kernel arch/x86/boot/bzImage --modules /tmp/mods --share . -- ./test.sh
  qlaunch exec --kernel asset:x86_64-generic --share . -- sh -c 'make check'
  qlaunch exec --profile default --profile aarch64-virt --junit out.xml -- uname -m
  git bisect run qlaunch exec --kernel arch/x86/boot/bzImage --boot-failure-exit 125 \\
      -- sh -c "$(cat t.sh)"                       the script's text goes in: no share needed

exit codes: the command's own; 118 the kernel did not boot (--boot-failure-exit); 119 WARNING
(--fail-on-warn); 120 no status from the guest; 121 kernel panic; 122 oops or BUG; 123 RCU
stall, hung task or soft lockup; 124 timeout or no-output watchdog. With several runs: 1 if any
failed.
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "exec",
        help="boot a kernel, run a command in it, exit with the command's code",
        description="Boot a kernel with qlaunch's initramfs, run CMD as root in the guest, "
        "stream its stdout and stderr to ours (the kernel console is kept apart: --console), "
        "power off, and exit with CMD's exit code.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--kernel",
        metavar="PATH|asset:SET",
        help="bzImage/vmlinuz (x86_64, i386), Image or vmlinuz (aarch64), zImage (arm), vmlinux "
        "(ppc64le), vmlinuz (s390x, mips64el); or an asset "
        "set (its kernel and modules); default: the profile's kernel",
    )
    p.add_argument("--arch", choices=boards.ARCHES, help="default: from the kernel")
    p.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="P",
        help="board and machine to boot on (default per arch); repeat to run on several at once",
    )
    p.add_argument("--matrix", metavar="FILE", help="runs from a TOML file ([[run]] tables)")
    add_set_arg(p)
    p.add_argument(
        "--modules",
        metavar="DIR",
        help="kernel modules: a `make modules_install INSTALL_MOD_PATH=DIR` tree or an unpacked "
        "linux-image package; without it only built-in drivers (or an asset set's modules)",
    )
    p.add_argument(
        "--module",
        action="append",
        default=[],
        metavar="NAME",
        help="pack module NAME (and what it needs) so that `modprobe NAME` works in the guest",
    )
    p.add_argument(
        "--share",
        action="append",
        default=[],
        metavar="HOST[:GUEST][:ro]",
        help="share a host directory (default guest path: the same as on the host) over "
        "virtiofs, or 9p where virtiofs cannot be had and for :ro; the command starts in the "
        "host's working directory when a share holds it",
    )
    p.add_argument(
        "--share-type",
        choices=("auto", "virtiofs", "9p"),
        default="auto",
        help="auto (the default): virtiofs where the host and the kernel allow it, else 9p "
        "(and a note says why); virtiofs: an error where it cannot be had",
    )
    p.add_argument("--cpus", type=positive(int), metavar="N")
    p.add_argument("--memory", metavar="M", help="like 512M or 2G")
    p.add_argument("--append", default="", metavar="ARGS", help="extra kernel command line")
    p.add_argument("--timeout", type=positive(float), metavar="S", help="overall limit in seconds")
    p.add_argument(
        "--watchdog",
        type=positive(float),
        metavar="S",
        help="fail after S seconds without any output (default 30; x10 under TCG)",
    )
    p.add_argument("--console", action="store_true", help="show the kernel console on stderr")
    p.add_argument("--console-log", metavar="FILE", help="where to keep the console log")
    p.add_argument("--fail-on-warn", action="store_true", help="a kernel WARNING fails the run")
    p.add_argument(
        "--boot-failure-exit",
        type=int,
        default=118,
        metavar="N",
        help="exit code when the kernel does not boot (125 makes `git bisect run` skip it)",
    )
    p.add_argument("--junit", metavar="FILE", help="write a JUnit XML report")
    p.add_argument("--json", metavar="FILE", help="write a JSON report")
    p.add_argument(
        "--force",
        action="store_true",
        help="let --console-log, --junit and --json replace files qlaunch did not write",
    )
    p.add_argument(
        "--jobs", type=positive(int), metavar="N", help="parallel runs (default: host cores)"
    )
    p.set_defaults(func=cmd_exec)


class TerminalSink:
    """The command's stdout and stderr to ours as they arrive; the console to stderr if asked."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def stdout(self, data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    def stderr(self, data: bytes) -> None:
        sys.stderr.buffer.write(data)
        sys.stderr.buffer.flush()

    def console(self, data: bytes) -> None:
        self.stderr(data)

    def note(self, message: str) -> None:
        self.notes.append(message)
        output.note(message)


def cmd_exec(args: argparse.Namespace) -> int:
    from qlaunch.errors import UsageError
    from qlaunch.testloop import driver as testloop

    if not args.guest_cmd and not args.matrix:
        raise UsageError("exec needs a command after --", hint="qlaunch exec -- uname -r")
    if not 0 <= args.boot_failure_exit <= 255:
        raise UsageError("--boot-failure-exit takes 0 to 255")
    if args.kernel and not args.kernel.startswith("asset:"):
        from qlaunch.storage import outfile

        # A directory or FIFO is not "missing", and a FIFO would hang the architecture probe.
        outfile.require_file(args.kernel, "--kernel")
    several = bool(args.matrix) or len(args.profile) > 1
    if args.console_log and several:
        raise UsageError("--console-log is for one run; several runs log one file each")
    _check_outputs(args)
    base = testloop.ExecSpec(
        cmd=tuple(args.guest_cmd or ()),
        kernel=args.kernel,
        arch=args.arch,
        profile=args.profile[0] if len(args.profile) == 1 else None,
        sets=tuple(args.sets),
        modules=args.modules,
        module=tuple(args.module),
        shares=tuple(testloop.parse_share(s) for s in args.share),
        share_type=args.share_type,
        cpus=args.cpus,
        memory=args.memory,
        append=args.append,
        timeout=args.timeout,
        watchdog=args.watchdog,
        fail_on_warn=args.fail_on_warn,
        boot_failure_exit=args.boot_failure_exit,
        console_log=args.console_log,
    )
    if args.matrix or len(args.profile) > 1:
        # Threads and XML only where several runs need them: a single run starts sooner.
        from qlaunch.testloop import matrix

        if args.matrix:
            specs = matrix.load_matrix(args.matrix, base)
        else:
            specs = [testloop.ExecSpec(**{**vars_of(base), "profile": p}) for p in args.profile]
        results = matrix.run_matrix(
            specs, jobs=args.jobs, show_console=args.console, note=output.note
        )
        sys.stdout.flush()
        print()
        output.table(matrix.summary_rows(results), matrix.SUMMARY_COLUMNS)
        _reports(args, results)
        return 0 if all(r.ok for r in results) else 1
    sink = TerminalSink()
    try:
        result = testloop.run_spec(base, sink, show_console=args.console)
    finally:
        if args.console_log:
            from pathlib import Path

            from qlaunch.storage import outfile

            outfile.remember(Path(args.console_log))
    report = result.report()
    if report:
        output.note(report[0])
        for line in report[1:]:
            print(line, file=sys.stderr)
    _reports(args, [result])
    return result.code


def _check_outputs(args: argparse.Namespace) -> None:
    """Where exec will write, checked before anything boots: an existing directory, and no
    file that qlaunch did not write (without --force) or that a VM holds (ever)."""
    if not (args.console_log or args.junit or args.json):
        return  # and the report writers and VM state stay unimported: a run starts sooner
    from qlaunch.errors import StateError, UsageError
    from qlaunch.storage import outfile
    from qlaunch.testloop import matrix
    from qlaunch.vm import state

    outputs = [
        ("--console-log", args.console_log, None, True),
        ("--junit", args.junit, matrix.is_junit, False),
        ("--json", args.json, matrix.is_json_report, False),
    ]
    seen: dict[str, str] = {}
    for flag, path, ours, stream in outputs:
        if path is None:
            continue
        who = state.holder_of(path)
        if who is not None:
            raise StateError(f"{flag} {path} is {who}; exec never writes over it")
        p = outfile.check_target(path, flag, force=args.force, ours=ours, stream=stream)
        if str(p) in seen and outfile.kind(p) is not None and outfile.kind(p) != "missing":
            continue  # /dev/null for two of them is fine
        if str(p) in seen:
            raise UsageError(f"{flag} and {seen[str(p)]} name the same file {path}")
        seen[str(p)] = flag


def vars_of(spec: Any) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}


def _reports(args: argparse.Namespace, results: list[Any]) -> None:
    if not (args.junit or args.json):
        return
    from qlaunch.testloop import matrix

    if args.junit:
        matrix.write_junit(args.junit, results)
    if args.json:
        matrix.write_json(args.json, results)
