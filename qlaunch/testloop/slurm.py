"""`qlaunch exec --matrix FILE --on slurm`: a matrix as one Slurm job array, a task per cell.

Slurm schedules; qlaunch runs a cell and reports. The matrix is loaded, named and prepared here
exactly as a local one is (a mistake in any cell stops all, before anything is submitted),
then goes to Slurm as one `sbatch --array` job whose task N runs `qlaunch exec --matrix
JOBDIR/matrix.toml --cell N` on whichever node Slurm picks. Each cell asks for its own CPUs,
memory (guest RAM plus QEMU's own) and time (its timeout plus a margin): the array goes in
with the largest request, held when some cells need less, and those tasks are lowered one
shape at a time (`scontrol update JobId=J_[...]`) before it is released.

Results come from files, not from Slurm's accounting (which a cluster may not keep): each task
writes its result (exec's JSON report, node included) and its console log into the job
directory, beside Slurm's output of the task. squeue only says what is pending and running.

The job directory, qlaunch-matrix-STAMP in the working directory or in --stage-dir:

    job.json       the job id and the cells: names, labels, what each asked Slurm for
    matrix.toml    every cell's exec options spelled out, paths absolute
    job.sh         the batch script (and the sbatch command that submitted it)
    N/slurm.out    task N's output: the guest command's stdout and stderr, qlaunch's notes
    N/result.json  task N's result
    N/console.log  task N's kernel console
    stage/         copies of what the nodes could not see (--stage-dir)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qlaunch import paths, spawn
from qlaunch.errors import HostError, QlaunchError, UsageError
from qlaunch.testloop import driver as testloop
from qlaunch.testloop import matrix

JOB_PREFIX = "qlaunch-matrix-"
# Memory beside guest RAM: QEMU's own (device model, TCG's translation cache: about 170 MiB
# over a 256 MiB guest measured here) and qlaunch's driver process (about 40 MiB).
QEMU_OWN_MIB = 192
DRIVER_MIB = 64
TIME_MARGIN = 60.0  # seconds past a cell's --timeout: qlaunch's start, prepare, QEMU's end
POLL = 0.25  # seconds between looks into the job directory
SQUEUE_EVERY = 1.0  # seconds between squeue calls
LOST_GRACE = 10.0  # seconds a task gone from squeue gets for its result to show (NFS caches)
UNANSWERED = 60.0  # seconds of Slurm not answering before a wait gives up
CANCEL_WAIT = 60.0  # seconds to wait for cancelled tasks to leave squeue
SLURM_TIMEOUT = 120.0  # seconds one Slurm command may take
INDEX_KEEP = 200  # job ids remembered for `qlaunch matrix collect JOBID` from anywhere

# File systems every node of a cluster mounts alike: network and cluster file systems.
NETWORK_FS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "lustre",
        "gpfs",
        "beegfs",
        "ceph",
        "glusterfs",
        "panfs",
        "afs",
        "ocfs2",
        "gfs2",
        "pvfs2",
        "orangefs",
        "wekafs",
        "9p",
        "virtiofs",
        "sshfs",
        "cvmfs",
        "juicefs",
    }
)
# Memory of one host (and under Slurm's job_container/tmpfs, of one job): never shared.
MEMORY_FS = frozenset({"tmpfs", "ramfs"})
SHARED_ENV = "QLAUNCH_SLURM_SHARED"

# sbatch options qlaunch sets itself; a --slurm-arg may not change them.
OWN_OPTIONS = {
    "-a": "--array",
    "--array": "--array",
    "-o": "--output",
    "--output": "--output",
    "-e": "--error",
    "--error": "--error",
    "-D": "--chdir",
    "--chdir": "--chdir",
    "--wrap": "--wrap",
    "--parsable": "--parsable",
    "-H": "--hold",
    "--hold": "--hold",
    "-c": "--cpus-per-task",
    "--cpus-per-task": "--cpus-per-task",
    "--mem": "--mem",
    "--mem-per-cpu": "--mem",
    "--mem-per-gpu": "--mem",
    "-t": "--time",
    "--time": "--time",
    "-n": "--ntasks",
    "--ntasks": "--ntasks",
    "-N": "--nodes",
    "--nodes": "--nodes",
    "-p": "--partition",
    "--partition": "--partition",
}

# What Slurm's commands print when the controller is not there or authentication fails.
_UNANSWERED = (
    "unable to contact slurm controller",
    "connection refused",
    "socket timed out",
    "zero bytes were transmitted",
    "communication connection failure",
    "authentication",
    "munge",
    "could not establish a configuration source",
    "unable to establish a configuration source",
)


class SlurmGone(HostError):
    """Slurm is not installed here, or its controller does not answer (exit 3)."""


# ---- talking to Slurm -----------------------------------------------------------------------


def _slurm(argv: Sequence[str], *, stdin: str | None = None) -> str:
    """A Slurm command's output. Not installed or not answering: SlurmGone (exit 3); any other
    refusal: UsageError with Slurm's own words (a partition, a request, a --slurm-arg)."""
    try:
        r = spawn.run(argv, input=stdin, timeout=SLURM_TIMEOUT)
    except FileNotFoundError:
        raise SlurmGone(
            f"Slurm is not installed here: no {argv[0]}",
            hint="apt-get install -y slurm-client, on a host that may submit to the cluster",
        ) from None
    except subprocess.TimeoutExpired:
        raise SlurmGone(
            f"Slurm is not answering: {argv[0]} took more than {SLURM_TIMEOUT:g} s",
            hint="is slurmctld running? `sinfo` should answer",
        ) from None
    if r.returncode != 0:
        said = [ln.strip() for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
        message = said[-1] if said else f"exit status {r.returncode}"
        message = message.removeprefix(f"{Path(argv[0]).name}: ")
        if any(word in message.lower() for word in _UNANSWERED):
            conf = os.environ.get("SLURM_CONF")
            raise SlurmGone(
                f"Slurm is not answering: {argv[0]}: {message}",
                hint="is slurmctld running"
                + (f" as {conf} says" if conf else "")
                + "? `sinfo` should answer",
            )
        raise _Refused(f"{argv[0]}: {message}")
    return r.stdout


class _Refused(UsageError):
    """Slurm answered no (a job id it does not know, a request it cannot meet)."""


@dataclass(frozen=True)
class Cluster:
    partition: str | None
    nodes: tuple[str, ...]
    single_host: bool  # every node of the partition is this host: all its files are seen
    cpus: int  # the most CPUs one node has
    mem_mib: int  # the most memory one node has


def _local_names() -> tuple[set[str], set[str]]:
    name = socket.gethostname()
    names = {name, name.split(".")[0], "localhost"}
    with contextlib.suppress(OSError):
        names.add(socket.getfqdn())
    addrs = {"::1"}
    with contextlib.suppress(OSError):
        addrs.update(socket.gethostbyname_ex(name)[2])
    return names, addrs


def _number(text: str) -> int:
    digits = text.rstrip("+")  # sinfo writes 4+ where nodes differ
    return int(digits) if digits.isdigit() else 0


def cluster(partition: str | None) -> Cluster:
    """The partition's nodes, as sinfo lists them; the first word with Slurm, so a missing or
    silent Slurm is said before anything else is done."""
    out = _slurm(["sinfo", "--noheader", "--Node", "--format=%P|%N|%n|%o|%c|%m"])
    rows = [ln.split("|") for ln in out.splitlines() if ln.count("|") == 5]
    if partition is not None:
        rows = [r for r in rows if r[0].rstrip("*") == partition]
        if not rows:
            raise UsageError(
                f"--partition {partition}: Slurm has no such partition, or no nodes in it",
                hint="sinfo lists the partitions",
            )
    else:
        rows = [r for r in rows if r[0].endswith("*")]
        if not rows:
            raise UsageError("Slurm has no default partition", hint="give --partition P")
    names, addrs = _local_names()
    single = all(
        r[2] in names or r[1] in names or r[3] in addrs or r[3].startswith("127.") for r in rows
    )
    return Cluster(
        partition,
        tuple(sorted({r[1] for r in rows})),
        single,
        max(_number(r[4]) for r in rows),
        max(_number(r[5]) for r in rows),
    )


def _check_fits(cells: Sequence[Cell], cl: Cluster) -> None:
    """A cell no node can hold would wait in the queue forever (PartitionConfig): refused
    before it is submitted, naming it and the largest node."""
    part = f"partition {cl.partition}" if cl.partition else "the default partition"
    for c in cells:
        r = c.request
        if cl.cpus and r.cpus > cl.cpus:
            raise UsageError(
                f"run {c.name}: asks for {r.cpus} CPUs, and the largest node of {part} has "
                f"{cl.cpus}",
                hint="fewer cpus for it (matrix key cpus, or machine.smp)",
            )
        if cl.mem_mib and r.mem_mib > cl.mem_mib:
            raise UsageError(
                f"run {c.name}: asks for {r.mem_mib} MiB (guest RAM and QEMU's own), and the "
                f"largest node of {part} has {cl.mem_mib} MiB",
                hint="less memory for it (matrix key memory)",
            )


def check_slurm_args(args: Sequence[str]) -> None:
    for a in args:
        opt = a.split("=", 1)[0]
        if opt.startswith("-") and not opt.startswith("--") and len(opt) > 2:
            opt = opt[:2]  # -c4, -pdebug
        if opt in OWN_OPTIONS:
            raise UsageError(
                f"--slurm-arg {a}: qlaunch sets {OWN_OPTIONS[opt]} itself",
                hint="a cell's cpus, memory and timeout set what it asks for; --partition, "
                "--jobs and --stage-dir the rest",
            )


# ---- where files are ------------------------------------------------------------------------


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    for code in ("040", "011", "012", "134"):
        field = field.replace("\\" + code, chr(int(code, 8)))
    return field


def mount_of(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(mount point, file system type) of the file system holding path."""
    real = os.path.realpath(path)
    best = ("/", "")
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return best
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mnt = _unescape(fields[4])
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        # Later lines are mounts over earlier ones: the last that holds the path wins.
        if inside and len(mnt) >= len(best[0]):
            best = (mnt, right.split()[0])
    return best


def shared_roots() -> list[Path]:
    """Directories the site says every node sees at the same path ($QLAUNCH_SLURM_SHARED)."""
    roots = os.environ.get(SHARED_ENV, "")
    return [Path(os.path.realpath(r)) for r in roots.split(":") if r.strip()]


def unseen(path: str | os.PathLike[str], single_host: bool) -> str | None:
    """Why the nodes may not see path, or None when they do: it is under a root listed in
    $QLAUNCH_SLURM_SHARED, or on a network file system, or every node is this host; never when
    it is in memory (tmpfs, ramfs)."""
    real = Path(os.path.realpath(path))
    for root in shared_roots():
        if real == root or root in real.parents:
            return None
    mnt, fstype = mount_of(real)
    base = fstype.removeprefix("fuse.")
    if fstype in MEMORY_FS:
        return f"is on {fstype} ({mnt}): memory of one host, which no other node or job sees"
    if base in NETWORK_FS:
        return None
    if single_host:
        return None
    return (
        f"is on {fstype or 'a file system'} ({mnt}) of this host, not on storage every node "
        f"mounts (network file systems, or directories listed in ${SHARED_ENV})"
    )


@dataclass(frozen=True)
class _Input:
    cell: str
    flag: str  # how the user named it: --kernel, --modules, --share, --profile, a disk
    path: Path
    stage: str | None  # "file" or "dir": may be copied into --stage-dir; None: may not
    why_not: str = ""  # when it may not be copied


def _inputs(spec: testloop.ExecSpec, plan: testloop.Plan) -> list[_Input]:
    """The files a cell's task opens on its node, by the user's name for each."""
    from qlaunch.config import profile as pmod

    name = plan.name
    out: list[_Input] = []
    if spec.kernel is not None and not spec.kernel.startswith("asset:"):
        out.append(_Input(name, "--kernel", _absolute(spec.kernel), "file"))
    if spec.modules:
        out.append(_Input(name, "--modules", _absolute(spec.modules), "dir"))
    for s in spec.shares:
        if s.readonly:
            out.append(_Input(name, "--share", s.host, "dir"))
        else:
            why = "the guest may write it, and a copy would keep that from you (:ro is copied)"
            out.append(_Input(name, "--share", s.host, None, why))
    if spec.profile is not None:
        p = pmod.find(spec.profile).absolute()
        if paths.SHIPPED_PROFILES not in p.resolve().parents:
            by_name = "a profile named is looked up on the node: give its path to copy it"
            stage = "file" if _is_path(spec.profile) else None
            out.append(_Input(name, "--profile", p, stage, "" if stage else by_name))
    for d in plan.profile.disks:
        why = "a disk is the guest's to write: put it where every node sees it"
        out.append(_Input(name, "disk", Path(d.path).absolute(), None, why))
    return out


def _absolute(path: str | Path) -> Path:
    return Path(path).expanduser().absolute()


def _is_path(profile: str) -> bool:
    return "/" in profile or profile.endswith(".toml")


# ---- what a cell asks for -------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    cpus: int
    mem_mib: int
    minutes: int | None  # None: no --time (the partition's default)

    def sbatch(self) -> list[str]:
        args = ["--ntasks=1", f"--cpus-per-task={self.cpus}", f"--mem={self.mem_mib}M"]
        return args + ([f"--time={self.minutes}"] if self.minutes is not None else [])

    def scontrol(self) -> list[str]:
        args = [f"CPUsPerTask={self.cpus}", f"NumCPUs={self.cpus}", f"MinCPUsNode={self.cpus}"]
        args.append(f"MinMemoryNode={self.mem_mib}")
        return args + ([f"TimeLimit={self.minutes}"] if self.minutes is not None else [])


def request_for(plan: testloop.Plan) -> Request:
    """A cell's CPUs, memory and time: its vCPUs; its guest RAM plus QEMU's own (or the
    profile's [resources] memory_limit, which is QEMU's whole) plus qlaunch's driver; its
    timeout plus a margin, in whole minutes, as Slurm counts them."""
    prof = plan.profile
    limit = prof.resources.memory_limit
    qemu = math.ceil(limit / (1 << 20)) if limit else prof.machine.memory_mib + QEMU_OWN_MIB
    minutes = None if plan.timeout is None else math.ceil((plan.timeout + TIME_MARGIN) / 60)
    return Request(prof.machine.smp, qemu + DRIVER_MIB, minutes)


def _largest(reqs: Sequence[Request]) -> Request:
    times = [r.minutes for r in reqs]
    return Request(
        max(r.cpus for r in reqs),
        max(r.mem_mib for r in reqs),
        None if None in times else max(t for t in times if t is not None),
    )


def _ranges(ids: Sequence[int]) -> str:
    """0,1,2,5 -> 0-2,5 (Slurm's array index syntax)."""
    out: list[str] = []
    ids = sorted(ids)
    start = prev = ids[0]
    for i in [*ids[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)


# ---- the job --------------------------------------------------------------------------------


@dataclass
class Cell:
    name: str
    profile: str
    kernel: str  # as the user named it (the summary's KERNEL), not the path the node opens
    request: Request


@dataclass
class Job:
    job_id: str
    directory: Path
    cells: list[Cell]

    def cell_dir(self, i: int) -> Path:
        return self.directory / str(i)


def qlaunch_command() -> list[str]:
    """How a task starts qlaunch: this very installation, by its absolute path."""
    exe = Path(sys.executable).parent / "qlaunch"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "qlaunch"]


def _batch_script(directory: Path, sbatch_argv: Sequence[str]) -> str:
    d = shlex.quote(str(directory))
    run = shlex.join(qlaunch_command())
    return (
        "#!/bin/sh\n"
        "# qlaunch exec --matrix on Slurm: array task N runs cell N of matrix.toml (job.json\n"
        "# names the cells). One cell again, by hand:\n"
        f"#   {run} exec --matrix {d}/matrix.toml --cell N\n"
        f"# Submitted with: {shlex.join(sbatch_argv)}\n"
        f'cell={d}/"$SLURM_ARRAY_TASK_ID"\n'
        f'exec {run} exec --matrix {d}/matrix.toml --cell "$SLURM_ARRAY_TASK_ID" \\\n'
        '    --json "$cell/result.json" --console-log "$cell/console.log" --force\n'
    )


def _for_nodes(spec: testloop.ExecSpec, staged: dict[Path, Path]) -> testloop.ExecSpec:
    """The spec a task reads: paths absolute, or their copies in the stage directory."""

    def moved(p: str | Path) -> str:
        a = _absolute(p)
        return str(staged.get(a, a))

    kernel = spec.kernel
    if kernel is not None and not kernel.startswith("asset:"):
        kernel = moved(kernel)
    profile = spec.profile
    if profile is not None and _is_path(profile):
        profile = moved(profile)
    shares = tuple(
        dataclasses.replace(s, host=Path(moved(s.host))) if s.host in staged else s
        for s in spec.shares
    )
    return dataclasses.replace(
        spec,
        kernel=kernel,
        profile=profile,
        modules=moved(spec.modules) if spec.modules else None,
        shares=shares,
        console_log=None,
    )


def _stage(inputs: Sequence[_Input], stage: Path) -> dict[Path, Path]:
    """Copy each input into stage/N/ under its own name (a kernel with the config found beside
    it, so that the node reads the same config as here). Returns original -> copy."""
    from qlaunch.boot import kernel as kmod

    done: dict[Path, Path] = {}
    for inp in inputs:
        if inp.path in done:
            continue
        d = stage / str(len(done))
        d.mkdir(parents=True)
        dest = d / inp.path.name
        if inp.stage == "dir":
            shutil.copytree(inp.path, dest, symlinks=True)
        else:
            shutil.copy2(inp.path, dest)
        if inp.flag == "--kernel":
            with tempfile.TemporaryDirectory() as tmp:
                release = kmod.kernel_release(inp.path)
                config = kmod.find_config(inp.path, None, release, Path(tmp))
                if config is not None and Path(tmp) not in config.parents:
                    shutil.copy2(config, d / "config")
        done[inp.path] = dest
    return done


def _check_inputs(
    all_inputs: Sequence[_Input], cl: Cluster, stage_dir: Path | None
) -> list[_Input]:
    """The inputs to copy; an input the nodes cannot see and that cannot be copied is refused
    in one line that names it."""
    to_stage: list[_Input] = []
    for inp in all_inputs:
        why = unseen(inp.path, cl.single_host)
        if why is None:
            continue
        what = f"run {inp.cell}: {inp.flag} {inp.path} {why}"
        if stage_dir is None:
            hint = "put it on storage every node mounts"
            if inp.stage is not None:
                hint += ", or give --stage-dir DIR (on such storage) to copy it there"
            raise UsageError(what, hint=hint)
        if inp.stage is None:
            raise UsageError(f"{what}, and it cannot be copied: {inp.why_not}")
        to_stage.append(inp)
    return to_stage


def submit(
    specs: Sequence[testloop.ExecSpec],
    *,
    partition: str | None = None,
    slurm_args: Sequence[str] = (),
    jobs: int | None = None,
    stage_dir: str | None = None,
    note: Callable[[str], None],
) -> Job:
    """Check, prepare and submit the matrix; returns once Slurm has it. Nothing is left
    behind when any step fails (the job is cancelled, its directory removed)."""
    check_slurm_args(slurm_args)
    cl = cluster(partition)
    specs = matrix.unique_names(specs)
    plans = matrix.prepare_all(specs)
    try:
        cells = [Cell(p.name, p.profile.name, p.kernel_label, request_for(p)) for p, _ in plans]
        inputs = [i for s, (p, _) in zip(specs, plans, strict=True) for i in _inputs(s, p)]
    finally:
        for _, tmp in plans:
            shutil.rmtree(tmp, ignore_errors=True)
    _check_fits(cells, cl)
    home = Path(stage_dir).absolute() if stage_dir else Path.cwd()
    flag = f"--stage-dir {stage_dir}" if stage_dir else "the working directory"
    if not home.is_dir():
        raise UsageError(f"{flag}: {home} is not a directory")
    why = unseen(home, cl.single_host)
    if why is not None:
        raise UsageError(
            f"the job's results go to {flag} ({home}), which {why}",
            hint="run from a directory every node sees, or give --stage-dir DIR on one",
        )
    to_stage = _check_inputs(inputs, cl, Path(stage_dir) if stage_dir else None)
    if not cl.single_host and unseen(qlaunch_command()[0], False) is not None:
        note(
            f"the nodes run {qlaunch_command()[0]}: it must be installed at that path on each "
            "node (or live on storage they share)"
        )

    stamp = time.strftime("%Y%m%d-%H%M%S")
    directory = Path(tempfile.mkdtemp(prefix=f"{JOB_PREFIX}{stamp}-", dir=home))
    job_id: str | None = None
    try:
        staged = _stage(to_stage, directory / "stage")
        node_specs = [_for_nodes(s, staged) for s in specs]
        _write_matrix(directory / "matrix.toml", node_specs)
        for i in range(len(cells)):
            (directory / str(i)).mkdir()
        largest = _largest([c.request for c in cells])
        lower = {c.request for c in cells} - {largest}
        array = f"0-{len(cells) - 1}" + (f"%{jobs}" if jobs else "")
        argv = ["sbatch", "--parsable", f"--array={array}", "--job-name=qlaunch-matrix"]
        # % starts Slurm's file name patterns: a literal one is written %%.
        output = str(directory).replace("%", "%%") + "/%a/slurm.out"
        argv += [f"--output={output}", f"--chdir={Path.cwd()}"]
        argv += largest.sbatch()
        argv += ["--hold"] if lower else []
        argv += [f"--partition={partition}"] if partition else []
        argv += list(slurm_args)
        script = _batch_script(directory, argv)
        (directory / "job.sh").write_text(script)
        job_id = _slurm(argv, stdin=script).strip().split(";")[0]
        if not job_id.isdigit():
            raise SlurmGone(f"sbatch answered {job_id!r}, not a job id")
        for req in sorted(lower, key=lambda r: (r.cpus, r.mem_mib, r.minutes or 0)):
            ids = [i for i, c in enumerate(cells) if c.request == req]
            _slurm(["scontrol", "update", f"JobId={job_id}_[{_ranges(ids)}]", *req.scontrol()])
        job = Job(job_id, directory, cells)
        _write_job(job)
        if lower:
            _slurm(["scontrol", "release", job_id])
    except BaseException:
        if job_id is not None:
            with contextlib.suppress(QlaunchError):
                _slurm(["scancel", job_id])
        shutil.rmtree(directory, ignore_errors=True)
        raise
    _remember(job)
    return job


def _write_matrix(path: Path, specs: Sequence[testloop.ExecSpec]) -> None:
    header = (
        "What the array's tasks run: cell N is [[run]] number N (from 0).\n"
        "qlaunch exec --matrix THIS --cell N runs one of them again."
    )
    path.write_bytes(matrix.matrix_toml(specs, header))
    # Read back as a task will: a path or argument that does not survive is refused here.
    back = matrix.unique_names(matrix.load_matrix(str(path), testloop.ExecSpec(cmd=())))
    for want, got in zip(specs, back, strict=True):
        lost = [
            f.name
            for f in dataclasses.fields(want)
            if getattr(want, f.name) != getattr(got, f.name)
        ]
        if lost:
            raise UsageError(
                f"run {want.name}: its {', '.join(lost)} cannot be handed to the nodes in a "
                "matrix file (a path with ':' in a share?)",
                hint="change that, or run it with --on local",
            )


def _write_job(job: Job) -> None:
    doc = {
        "job_id": job.job_id,
        "cells": [
            {
                "name": c.name,
                "profile": c.profile,
                "kernel": c.kernel,
                "cpus": c.request.cpus,
                "mem_mib": c.request.mem_mib,
                "minutes": c.request.minutes,
            }
            for c in job.cells
        ],
    }
    tmp = job.directory / ".job.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, job.directory / "job.json")


def _index() -> Path:
    return paths.data_dir() / "matrix-jobs"


def _remember(job: Job) -> None:
    """Where job N's directory is, for `qlaunch matrix collect N` from anywhere. Best effort:
    collect also looks in the working directory."""
    with contextlib.suppress(OSError):
        d = _index()
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{job.job_id}.{os.getpid()}.tmp"
        tmp.write_text(str(job.directory) + "\n")
        os.replace(tmp, d / job.job_id)
        entries = sorted(d.iterdir(), key=lambda p: p.stat().st_mtime)
        for old in entries[: max(0, len(entries) - INDEX_KEEP)]:
            old.unlink(missing_ok=True)


def _read_job(directory: Path) -> Job | None:
    try:
        doc = json.loads((directory / "job.json").read_text())
        cells = [
            Cell(
                str(c["name"]),
                str(c["profile"]),
                str(c["kernel"]),
                Request(int(c["cpus"]), int(c["mem_mib"]), c["minutes"]),
            )
            for c in doc["cells"]
        ]
        return Job(str(doc["job_id"]), directory, cells)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_job(ref: str) -> Job:
    """A job by its id (through the index, else in the working directory) or its directory."""
    if not ref.isdigit():
        job = _read_job(Path(ref))
        if job is None:
            raise UsageError(f"{ref} is neither a job id nor a qlaunch matrix job's directory")
        return job
    candidates: list[Path] = []
    with contextlib.suppress(OSError):
        candidates.append(Path((_index() / ref).read_text().strip()))
    candidates += sorted(Path.cwd().glob(f"{JOB_PREFIX}*"), reverse=True)
    for d in candidates:
        job = _read_job(d)
        if job is not None and job.job_id == ref:
            return job
    raise UsageError(
        f"no matrix job {ref} submitted from here",
        hint="give its directory (qlaunch-matrix-...), or run collect where it was submitted",
    )


# ---- waiting --------------------------------------------------------------------------------


@dataclass
class Status:
    pending: int = 0
    running: int = 0
    done: int = 0
    total: int = 0
    reason: str = ""  # why tasks wait, as squeue says (Resources, Priority, JobHeldUser...)
    answering: bool = True

    def text(self) -> str:
        parts = [f"{self.done}/{self.total} done", f"{self.running} running"]
        pending = f"{self.pending} pending"
        if self.pending and self.reason and self.reason != "None":
            pending += f" ({self.reason})"
        parts.append(pending)
        if not self.answering:
            parts.append("Slurm is not answering")
        return ", ".join(parts)


def _tasks(job_id: str) -> dict[int, tuple[str, str, str]]:
    """The job's tasks that Slurm still lists: task id -> (state, node, reason)."""
    try:
        out = _slurm(
            ["squeue", "--noheader", "--array", f"--jobs={job_id}", "--format=%K|%T|%N|%r"]
        )
    except _Refused as e:
        if "invalid job id" in e.message.lower():
            return {}  # ended long enough ago that the controller forgot it
        raise
    tasks: dict[int, tuple[str, str, str]] = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) == 4 and parts[0].isdigit():
            tasks[int(parts[0])] = (parts[1], parts[2], parts[3])
    return tasks


def _load_result(job: Job, i: int) -> tuple[testloop.Result, str] | None:
    try:
        doc = json.loads((job.cell_dir(i) / "result.json").read_text())
        result, node = matrix.result_from_dict(doc["runs"][0])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        result = _lost(job, i, "its result.json is not a qlaunch result")
        return result, ""
    # The names the summary gives, as a local run of the same matrix gives them (the task
    # read absolute or staged paths).
    cell = job.cells[i]
    result.name, result.profile, result.kernel = cell.name, cell.profile, cell.kernel
    return result, node


def _lost(job: Job, i: int, why: str) -> testloop.Result:
    out = job.cell_dir(i) / "slurm.out"
    last = ""
    with contextlib.suppress(OSError):
        lines = [ln.strip() for ln in out.read_text(errors="replace").splitlines() if ln.strip()]
        last = lines[-1][:300] if lines else ""
    cell = job.cells[i]
    message = f"Slurm task {job.job_id}_{i} {why}" + (f"; it said: {last}" if last else "")
    return testloop.Result(
        name=cell.name,
        code=1,
        stdout="",
        stderr="",
        console="",
        verdict="error",
        message=f"{message} (output: {out})",
        profile=cell.profile,
        kernel=cell.kernel,
    )


def wait(
    job: Job,
    *,
    on_result: Callable[[int, testloop.Result, str], None],
    on_status: Callable[[Status], None],
) -> tuple[list[testloop.Result], list[str]]:
    """Until every cell has a result, or the job has left squeue (a task gone without one is
    an error result naming its output). Results come in the cells' order, with their nodes."""
    n = len(job.cells)
    got: dict[int, tuple[testloop.Result, str]] = {}
    nodes: dict[int, str] = {}
    last_ask = -math.inf
    gone_at: float | None = None
    silent_since: float | None = None
    status = Status(total=n)
    tasks: dict[int, tuple[str, str, str]] = {}
    while True:
        for i in range(n):
            # A task still pending has nothing to read (a big array on NFS: many files).
            if i not in got and tasks.get(i, ("",))[0] != "PENDING":
                loaded = _load_result(job, i)
                if loaded is not None:
                    got[i] = loaded
                    on_result(i, *loaded)
        if len(got) == n:
            status.done, status.pending, status.running = n, 0, 0
            on_status(status)
            break
        now = time.monotonic()
        if now - last_ask >= SQUEUE_EVERY:
            last_ask = now
            try:
                tasks = _tasks(job.job_id)
            except SlurmGone:
                silent_since = silent_since if silent_since is not None else now
                status.answering = False
                if now - silent_since > UNANSWERED:
                    raise SlurmGone(
                        f"Slurm stopped answering while job {job.job_id} ran",
                        hint=f"the job may go on: qlaunch matrix collect {job.job_id} later",
                    ) from None
            else:
                silent_since = None
                status.answering = True
                for k, (_, node, _) in tasks.items():
                    if node:
                        nodes[k] = node
                if any(k not in got for k in tasks):
                    gone_at = None
                elif gone_at is None:
                    gone_at = now
            # Counted without the tasks whose results are in (squeue lags behind them).
            live = [v for k, v in tasks.items() if k not in got]
            waiting = [r for s, _, r in live if s == "PENDING"]
            status.done, status.pending = len(got), len(waiting)
            status.running = len(live) - len(waiting)
            status.reason = waiting[0] if waiting else ""
            on_status(status)
        if gone_at is not None and time.monotonic() - gone_at > LOST_GRACE:
            break
        time.sleep(POLL)
    results: list[testloop.Result] = []
    where: list[str] = []
    for i in range(n):
        if i in got:
            result, node = got[i]
        else:
            result, node = _lost(job, i, "ended without a result"), nodes.get(i, "")
            on_result(i, result, node)
        results.append(result)
        where.append(node or nodes.get(i, ""))
    return results, where


def cancel(job: Job) -> bool:
    """scancel the job and wait (a while) until squeue lists none of its tasks; True once it
    does, False when Slurm did not answer or still lists some. A second Ctrl-C stops the
    waiting, not the cancel."""
    try:
        _slurm(["scancel", job.job_id])
    except _Refused:
        pass  # it has ended already
    except SlurmGone:
        return False
    deadline = time.monotonic() + CANCEL_WAIT
    while time.monotonic() < deadline:
        try:
            if not _tasks(job.job_id):
                return True
        except SlurmGone:
            pass
        time.sleep(0.2)
    return False


__all__ = [
    "Cell",
    "Cluster",
    "Job",
    "Request",
    "SlurmGone",
    "Status",
    "cancel",
    "check_slurm_args",
    "cluster",
    "find_job",
    "mount_of",
    "request_for",
    "submit",
    "unseen",
    "wait",
]
