"""`qlaunch screenshot NAME OUT.png`: a running VM's screen as a PNG."""

from __future__ import annotations

import argparse
from typing import Any

from qlaunch.cli import output


def register(sub: Any) -> None:
    p = sub.add_parser(
        "screenshot",
        help="save a running VM's screen as a PNG (VMs with a display)",
        description="QMP screendump of the VM's display, written to OUT as PNG (through a "
        "temporary file and a rename). Only for VMs with [display] type = vnc.",
    )
    p.add_argument("name")
    p.add_argument("out", metavar="OUT.png")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace OUT if it exists and qlaunch did not write it (never a file a VM holds)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_screenshot)


def cmd_screenshot(args: argparse.Namespace) -> int:
    from qlaunch.vm import screen

    shot = screen.screenshot(args.name, args.out, force=args.force)
    if args.json:
        output.emit_json(shot.to_json())
    else:
        output.note(f"{shot.name}: {shot.width}x{shot.height} screen saved to {shot.path}")
    return 0
