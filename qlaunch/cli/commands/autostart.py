"""`qlaunch autostart enable|disable|list`: VMs that start when the host boots (systemd)."""

from __future__ import annotations

import argparse
from typing import Any

from qlaunch.cli import output


def register(sub: Any) -> None:
    p = sub.add_parser(
        "autostart",
        help="start VMs again when the host boots, stop them when it shuts down (systemd)",
        description="enable NAME: save the VM's definition (its profile as resolved, command, "
        "restart policy, netns, --runas) and write the systemd template unit qlaunch@.service "
        "and the link multi-user.target.wants/qlaunch@NAME.service; disable NAME: remove them "
        "(the template with the last VM); list: the VMs enabled and their unit files. Units "
        "go in /etc/systemd/system (root only), or $QLAUNCH_SYSTEMD_DIR.",
    )
    asub = p.add_subparsers(dest="autostart_command", metavar="ACTION", required=True)
    e = asub.add_parser("enable", help="start the VM NAME at boot, from its definition as now")
    e.add_argument("name")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_enable)
    d = asub.add_parser("disable", help="no longer start the VM NAME at boot")
    d.add_argument("name")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_disable)
    ls = asub.add_parser("list", help="the VMs enabled, with their unit files")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    # What the unit's ExecStart runs; not for people (no help: argparse leaves it unlisted).
    s = asub.add_parser("start")
    s.add_argument("name")
    s.set_defaults(func=cmd_start)


def cmd_enable(args: argparse.Namespace) -> int:
    from qlaunch.vm import autostart

    e = autostart.enable(args.name, note=None if args.json else output.note)
    if args.json:
        output.emit_json(e.to_json())
    return 0


def cmd_disable(args: argparse.Namespace) -> int:
    from qlaunch.vm import autostart

    removed = autostart.disable(args.name, note=None if args.json else output.note)
    if args.json:
        output.emit_json({"name": args.name, "removed": removed})
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from qlaunch.vm import autostart

    rows = [e.to_json() for e in autostart.list_enabled()]
    if args.json:
        output.emit_json(rows)
        return 0
    for r in rows:
        r["profile"] = r["profile"] or "?"
        r["note"] = r["note"] or ""
    output.table(rows, ["name", "unit", "state", "profile", "note"])
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from qlaunch.vm import autostart

    vm = autostart.start(args.name, note=output.note)
    print(vm.name)
    return 0
