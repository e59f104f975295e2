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
  qlaunch exec --matrix runs.toml --on slurm --partition debug --junit out.xml -- ./test.sh
                                                   one Slurm job array, a task per run

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
        "--jobs",
        type=positive(int),
        metavar="N",
        help="parallel runs (default: host cores; with --on slurm: no limit but Slurm's)",
    )
    p.add_argument(
        "--cell",
        type=_cell_index,
        metavar="N",
        help="run only run N of --matrix (from 0), as a single run: what a Slurm task runs",
    )
    slurm = p.add_argument_group("several runs on a Slurm cluster (--on slurm)")
    slurm.add_argument(
        "--on",
        choices=("local", "slurm"),
        default="local",
        help="where the runs of --matrix or several --profile go: this host (default), or "
        "one Slurm job array with a task per run, each asking for its CPUs, memory and time",
    )
    slurm.add_argument("--partition", metavar="P", help="the Slurm partition (default: Slurm's)")
    slurm.add_argument(
        "--slurm-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more sbatch option, written --slurm-arg=--account=A; repeat for more",
    )
    slurm.add_argument(
        "--no-wait",
        action="store_true",
        help="print the job id once submitted; `qlaunch matrix collect JOBID` gets the results",
    )
    slurm.add_argument(
        "--stage-dir",
        metavar="DIR",
        help="a directory every node sees: the job's directory goes there, and kernels, "
        "modules and :ro shares the nodes cannot see are copied into it",
    )
    p.set_defaults(func=cmd_exec)

    m = sub.add_parser(
        "matrix",
        help="matrices submitted to Slurm: collect their results",
        description="A matrix submitted with `qlaunch exec --matrix FILE --on slurm` runs as "
        "one Slurm job array; these commands work on it by its job id.",
    )
    msub = m.add_subparsers(dest="matrix_command", metavar="COMMAND", required=True)
    c = msub.add_parser(
        "collect",
        help="wait for a matrix job's tasks, then print the summary and write the reports",
        description="Wait for the tasks of a matrix job still pending or running (Ctrl-C stops "
        "the waiting, not the job), then print the summary and write JUnit and JSON as "
        "`qlaunch exec --matrix` does. Exits 1 if any run failed.",
    )
    c.add_argument("job", metavar="JOBID", help="the job id (or the job's directory)")
    c.add_argument("--junit", metavar="FILE", help="write a JUnit XML report")
    c.add_argument("--json", metavar="FILE", help="write a JSON report")
    c.add_argument(
        "--force",
        action="store_true",
        help="let --junit and --json replace files qlaunch did not write",
    )
    c.set_defaults(func=cmd_collect)


def _cell_index(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


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
    _check_backend(args)
    if not 0 <= args.boot_failure_exit <= 255:
        raise UsageError("--boot-failure-exit takes 0 to 255")
    if args.kernel and not args.kernel.startswith("asset:"):
        from qlaunch.storage import outfile

        # A directory or FIFO is not "missing", and a FIFO would hang the architecture probe.
        outfile.require_file(args.kernel, "--kernel")
    several = (bool(args.matrix) and args.cell is None) or len(args.profile) > 1
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
    if args.cell is not None:
        from qlaunch.testloop import matrix

        specs = matrix.unique_names(matrix.load_matrix(args.matrix, base))
        if args.cell >= len(specs):
            raise UsageError(f"--cell {args.cell}: {args.matrix} has runs 0 to {len(specs) - 1}")
        base = specs[args.cell]
    elif args.matrix or len(args.profile) > 1:
        # Threads and XML only where several runs need them: a single run starts sooner.
        from qlaunch.testloop import matrix

        if args.matrix:
            specs = matrix.load_matrix(args.matrix, base)
        else:
            specs = [testloop.ExecSpec(**{**vars_of(base), "profile": p}) for p in args.profile]
        if args.on == "slurm":
            return _on_slurm(args, specs)
        results = matrix.run_matrix(
            specs, jobs=args.jobs, show_console=args.console, note=output.note
        )
        sys.stdout.flush()
        print()
        output.table(matrix.summary_rows(results), matrix.SUMMARY_COLUMNS)
        _reports(args, results)
        return 0 if all(r.ok for r in results) else 1
    if args.cell is not None:
        return _one_cell(args, base)
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


def _one_cell(args: argparse.Namespace, spec: Any) -> int:
    """One run of a matrix (a Slurm task's work): as a single run, except that an error
    before or instead of a verdict is a result too, so the collector gets the cell's own."""
    from qlaunch.errors import QlaunchError
    from qlaunch.testloop import driver as testloop
    from qlaunch.testloop import matrix

    sink = TerminalSink()
    try:
        result = testloop.run_spec(spec, sink, show_console=args.console)
    except QlaunchError as e:
        if args.json:
            kernel = spec.kernel or ""
            failed = matrix.error_result(spec.name or "", spec.profile or "", kernel, e)
            matrix.write_json(args.json, [failed])
        raise
    finally:
        if args.console_log:
            from pathlib import Path

            from qlaunch.storage import outfile

            outfile.remember(Path(args.console_log))
    for i, line in enumerate(result.report()):
        if i == 0:
            output.note(line)
        else:
            print(line, file=sys.stderr)
    _reports(args, [result])
    return result.code


def _check_backend(args: argparse.Namespace) -> None:
    """Which options go with --on slurm, --cell and each other."""
    from qlaunch.errors import UsageError

    slurm_only = [
        flag
        for flag, given in (
            ("--partition", args.partition is not None),
            ("--slurm-arg", bool(args.slurm_arg)),
            ("--no-wait", args.no_wait),
            ("--stage-dir", args.stage_dir is not None),
        )
        if given
    ]
    if slurm_only and args.on != "slurm":
        raise UsageError(f"{slurm_only[0]} is for --on slurm")
    if args.cell is not None and not args.matrix:
        raise UsageError("--cell N picks a run of --matrix FILE")
    if args.on != "slurm":
        return
    if args.cell is not None:
        raise UsageError("--cell runs one run here: it does not go with --on slurm")
    if not args.matrix and len(args.profile) < 2:
        raise UsageError(
            "--on slurm runs several runs: give --matrix FILE or several --profile",
            hint="qlaunch exec --matrix runs.toml --on slurm -- ./test.sh",
        )
    if args.console:
        raise UsageError(
            "--console shows a local run's console: on Slurm each run's console log is kept "
            "in the job's directory"
        )
    from qlaunch.testloop import slurm

    slurm.check_slurm_args(args.slurm_arg)


def _on_slurm(args: argparse.Namespace, specs: list[Any]) -> int:
    from qlaunch.testloop import slurm

    job = slurm.submit(
        specs,
        partition=args.partition,
        slurm_args=args.slurm_arg,
        jobs=args.jobs,
        stage_dir=args.stage_dir,
        note=output.note,
    )
    n = len(job.cells)
    what = f"job {job.job_id}: {n} run{'s' if n != 1 else ''} submitted to Slurm"
    where = f"results in {job.directory}"
    if args.no_wait:
        print(job.job_id)
        output.note(f"{what}; {where}; qlaunch matrix collect {job.job_id} gathers them")
        return 0
    output.note(f"{what}; {where}")
    return _watch(args, job, cancel=True)


def cmd_collect(args: argparse.Namespace) -> int:
    from qlaunch.testloop import slurm

    args.console_log = None  # collect writes no console log: each task kept its own
    _check_outputs(args)
    job = slurm.find_job(args.job)
    return _watch(args, job, cancel=False)


class _Watch:
    """A matrix job on the terminal: each run's output and report as its result comes (as a
    local matrix prints them), and a progress line of what Slurm says meanwhile."""

    def __init__(self, job: Any) -> None:
        import threading
        import time

        self.job = job
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.text = "submitted"
        self.progress: output.Progress | None = None
        self._show()

    def _show(self) -> None:
        self.progress = output.Progress(f"job {self.job.job_id}: {self.text}")
        # The job's time, not this line's: the line is drawn anew after each run's output.
        self.progress.started = self.progress.step_started = self.t0
        self.progress.update()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    def status(self, st: Any) -> None:
        self.text = st.text()
        if self.progress is not None and self.progress.enabled:
            self.progress.what = f"job {self.job.job_id}: {self.text}"
            self.progress.update()

    def result(self, i: int, result: Any, node: str) -> None:
        from qlaunch.testloop import matrix

        self.close()
        sink = matrix.PrefixSink(result.name, self.lock, output.note)
        sink.stdout(result.stdout.encode())
        sink.stderr(result.stderr.encode())
        sink.close()
        for line in result.report():
            sink.note(line)
        self._show()


def _watch(args: argparse.Namespace, job: Any, *, cancel: bool) -> int:
    from qlaunch.testloop import matrix, slurm

    watch = _Watch(job)
    try:
        results, nodes = slurm.wait(job, on_result=watch.result, on_status=watch.status)
    except KeyboardInterrupt:
        watch.close()
        if not cancel:
            output.note(f"job {job.job_id} goes on (scancel {job.job_id} ends it)")
            raise
        output.note(f"cancelling job {job.job_id} (scancel)")
        if not slurm.cancel(job):
            output.note(
                f"job {job.job_id} may go on: Slurm did not answer, or squeue still lists it "
                f"(scancel {job.job_id})"
            )
        raise
    finally:
        watch.close()
    sys.stdout.flush()
    print()
    output.table(matrix.summary_rows(results, nodes), (*matrix.SUMMARY_COLUMNS, "node"))
    _reports(args, results, nodes)
    return 0 if all(r.ok for r in results) else 1


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


def _reports(args: argparse.Namespace, results: list[Any], nodes: list[str] | None = None) -> None:
    if not (args.junit or args.json):
        return
    from qlaunch.testloop import matrix

    if args.junit:
        matrix.write_junit(args.junit, results, nodes)
    if args.json:
        matrix.write_json(args.json, results, nodes)
