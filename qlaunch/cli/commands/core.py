"""`cmdline`, `run`, `host`, `profiles`: the foreground core."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from qlaunch.cli import output


def add_set_arg(p: argparse.ArgumentParser) -> None:
    """--set SECTION.KEY=VALUE, the same on every command that loads a profile."""
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a profile key (repeatable), e.g. machine.memory=1G or disk.0.path=x.img",
    )


def add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile", help="profile name (profiles/, ~/.config/qlaunch/profiles/) or path")
    add_set_arg(p)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "cmdline",
        help="print the QEMU argv a profile makes",
        description="Print exactly what `run`, `start` or `exec` would run for a profile, "
        "checked and refused as that command would; fds and paths made at launch show as "
        "<placeholders>. A guest command after -- goes into the plan as it would there.",
    )
    add_profile_args(p)
    p.add_argument(
        "--for",
        dest="entry",
        default="run",
        metavar="ENTRY",
        help="the command whose launch to show: run (default), start, restore, exec, or "
        "warm-build and warm-run (run --warm: the boot that saves, a restore)",
    )
    p.add_argument("--name", help="the VM name (start, restore; default: from the profile)")
    p.add_argument(
        "--json",
        action="store_true",
        help="the whole plan: argv, the fds QEMU inherits, the sockets and files it makes",
    )
    p.set_defaults(func=cmd_cmdline)

    p = sub.add_parser(
        "run",
        help="run QEMU in the foreground with the console on the terminal",
        description="Boot a profile in the foreground. With `-- CMD ARGS`, the guest runs CMD, "
        "powers off, and run exits with CMD's status.",
    )
    add_profile_args(p)
    p.add_argument(
        "--warm",
        action="store_true",
        help="restore a saved guest that waits for its command (saved by the first such "
        "run) instead of booting: see `qlaunch warm`",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("host", help="QEMU binaries and accelerator verdicts for this host")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_host)

    p = sub.add_parser("profiles", help="list the profiles qlaunch can find")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profiles)


def cmd_cmdline(args: argparse.Namespace) -> int:
    from qlaunch.launch import plan as planmod

    planmod.check_entry(args.entry)
    cmd = args.guest_cmd or None
    launch = _plan_for(args, cmd)
    if launch.accel_note:
        output.note(launch.accel_note)
    if args.json:
        output.emit_json(launch.to_json())
    else:
        print(shlex.join(launch.argv))
    return 0


def _plan_for(args: argparse.Namespace, cmd: list[str] | None) -> Any:
    """The entry's own preparation, with nothing made: its checks, its plan."""
    if args.entry == "exec":
        from qlaunch.testloop import driver

        spec = driver.ExecSpec(
            cmd=tuple(cmd or ["true"]), profile=args.profile, sets=tuple(args.sets)
        )
        return driver.plan_exec(spec)
    import tempfile
    from pathlib import Path

    from qlaunch.config import profile
    from qlaunch.launch import host, run

    prof = profile.load(args.profile, args.sets)
    facts = host.probe()
    if args.entry in ("start", "restore"):
        from qlaunch.vm import api

        return api.plan_start(prof, facts, args.name, cmd, entry=args.entry)
    from qlaunch.launch import plan as planmod

    if args.entry in planmod.WARM:
        from qlaunch.launch import warm

        warm.check(prof, True)
        with tempfile.TemporaryDirectory(prefix="qlaunch-cmdline-") as tmp:
            launch = run.plan_warm(prof, facts, args.entry, cmd or ["true"], Path(tmp), make=False)
        return planmod.relocate(launch, tmp, planmod.TMP)
    if not cmd and not prof.cloud_init:
        # Nothing would be written to the run's directory: no need to make one to show it.
        return run.plan_run(prof, facts, cmd, Path(planmod.TMP), make=False)
    with tempfile.TemporaryDirectory(prefix="qlaunch-cmdline-") as tmp:
        launch = run.plan_run(prof, facts, cmd, Path(tmp), make=False)
    return planmod.relocate(launch, tmp, planmod.TMP)


def cmd_run(args: argparse.Namespace) -> int:
    from qlaunch.config import profile
    from qlaunch.launch import host, run

    prof = profile.load(args.profile, args.sets)
    if args.warm:
        from qlaunch.launch import warm as warmpure

        warmpure.check(prof, bool(args.guest_cmd))
        from qlaunch.vm import warm

        return warm.run_warm(prof, host.probe(), args.guest_cmd, note=output.note).status
    result = run.run(prof, host.probe(), args.guest_cmd or None, note=output.note)
    return result.status


def cmd_host(args: argparse.Namespace) -> int:
    from qlaunch.launch import host

    facts = host.probe()
    qemu = {
        arch: {"binary": path, "version": host.qemu_version(path) if path else None}
        for arch, path in facts.qemu.items()
    }
    report = {
        "arch": facts.arch,
        "kvm": {"usable": facts.kvm.usable, "reason": facts.kvm.reason},
        "tcg": {"usable": True, "reason": "software emulation, always available"},
        "qemu": qemu,
        "tun": facts.tun,
    }
    if args.json:
        output.emit_json(report)
        return 0
    print(f"host arch: {facts.arch}")
    print(f"kvm: {'usable' if facts.kvm.usable else 'NOT usable'}: {facts.kvm.reason}")
    print("tcg: usable")
    for arch, q in qemu.items():
        where = f"{q['binary']} ({q['version']})" if q["binary"] else "not installed"
        print(f"qemu {arch}: {where}")
    print(f"tun: {'/dev/net/tun present' if facts.tun else 'missing'}")
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    from qlaunch.config import profile
    from qlaunch.errors import ProfileError

    rows = []
    for name, path in sorted(profile.available().items()):
        try:
            p = profile.load(str(path))
            rows.append(
                {
                    "name": name,
                    "arch": p.machine.arch,
                    "machine": p.machine.machine,
                    "memory": f"{p.machine.memory_mib}M",
                    "path": str(path),
                    "error": None,
                }
            )
        except ProfileError as e:
            rows.append(
                {
                    "name": name,
                    "arch": "",
                    "machine": "",
                    "memory": "",
                    "path": str(path),
                    "error": e.message,
                }
            )
    if args.json:
        output.emit_json(rows)
    else:
        output.table(rows, ["name", "arch", "machine", "memory", "path"])
        for r in rows:
            if r["error"]:
                print(f"qlaunch: {r['name']}: {r['error']}", file=sys.stderr)
    return 0
