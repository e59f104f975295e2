"""`cmdline`, `run`, `host`, `profiles`: the foreground core."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from qlaunch.cli import output
from qlaunch.errors import UsageError


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
    p = sub.add_parser("cmdline", help="print the QEMU argv a profile makes")
    add_profile_args(p)
    p.add_argument("--json", action="store_true", help="a JSON list of strings")
    p.set_defaults(func=cmd_cmdline)

    p = sub.add_parser(
        "run",
        help="run QEMU in the foreground with the console on the terminal",
        description="Boot a profile in the foreground. With `-- CMD ARGS`, the guest runs CMD, "
        "powers off, and run exits with CMD's status.",
    )
    add_profile_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("host", help="QEMU binaries and accelerator verdicts for this host")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_host)

    p = sub.add_parser("profiles", help="list the profiles qlaunch can find")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profiles)


def _no_guest_cmd(args: argparse.Namespace) -> None:
    if args.guest_cmd is not None:
        raise UsageError(f"`qlaunch {args.command}` takes no command after --")


def cmd_cmdline(args: argparse.Namespace) -> int:
    from qlaunch import paths
    from qlaunch.boot import dtb as dtbmod
    from qlaunch.config import profile
    from qlaunch.launch import argv as argvmod
    from qlaunch.launch import host, resolve

    _no_guest_cmd(args)
    prof = profile.load(args.profile, args.sets)
    facts = host.probe()
    files = resolve.refs(prof, paths.cache_dir())
    initrd = files.initrd
    if initrd == "qlaunch":
        initrd = _qlaunch_initrd(prof)
    dtb = dtbmod.for_board(prof.board, files.dtb)
    rt = argvmod.Runtime(name=prof.name, kernel=files.kernel, initrd=initrd, dtb=dtb)
    argv = argvmod.build_argv(prof, facts, rt)
    _, accel_note = argvmod.choose_accel(prof, facts)
    if accel_note:
        output.note(accel_note)
    if args.json:
        output.emit_json(argv)
    else:
        print(shlex.join(argv))
    return 0


def _qlaunch_initrd(prof: Any) -> str:
    """The built initramfs's path if the assets are there; else a placeholder that says so."""
    from qlaunch.boot import assets, initramfs
    from qlaunch.config import boards
    from qlaunch.errors import AssetError
    from qlaunch.launch import resolve

    set_name = resolve.asset_set_of(prof)
    try:
        aset = assets.require(set_name)
    except AssetError:
        return f"<qlaunch initramfs for {set_name}: run qlaunch assets fetch --arch {set_name}>"
    defaults = initramfs.DEFAULT_MODULES.get(aset.arch, [])
    modules = boards.guest_modules(prof.board, defaults) + list(prof.boot.modules)
    return str(initramfs.build_initramfs(aset, modules))


def cmd_run(args: argparse.Namespace) -> int:
    from qlaunch.config import profile
    from qlaunch.launch import host, run

    prof = profile.load(args.profile, args.sets)
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
