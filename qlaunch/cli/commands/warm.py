"""`qlaunch warm list|clean`: the warm images that `qlaunch run --warm` restores."""

from __future__ import annotations

import argparse
import time
from typing import Any

from qlaunch.cli import output


def register(sub: Any) -> None:
    p = sub.add_parser(
        "warm",
        help="list or clean the warm images of `run --warm`",
        description="Warm images are guests saved once booted, restored by `qlaunch run "
        "PROFILE --warm -- CMD` instead of a boot. One per profile and inputs (QEMU, argv, "
        "kernel, initramfs, DTB); past $QLAUNCH_WARM_MAX (default 4G) the least recently "
        "used go.",
    )
    wsub = p.add_subparsers(dest="warm_cmd", metavar="{list,clean}", required=True)
    q = wsub.add_parser("list", help="the warm images, most recently used first")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_list)
    q = wsub.add_parser(
        "clean",
        help="remove what builds that died left, and images past the size cap",
    )
    q.add_argument("--all", action="store_true", help="remove every warm image too")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_clean)


def cmd_list(args: argparse.Namespace) -> int:
    from qlaunch.vm import warm

    rows = warm.images()
    if args.json:
        output.emit_json(rows)
        return 0
    now = time.time()
    output.table(
        [
            {
                "key": r["key"][:12],
                "profile": r["profile"],
                "machine": f"{r['arch']}/{r['machine']}",
                "size": f"{int(r['bytes']) >> 20}M",
                "used": f"{int(now - float(r['used']))} s ago",
            }
            for r in rows
        ],
        ["key", "profile", "machine", "size", "used"],
    )
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from qlaunch.vm import warm

    gone = warm.clean(everything=args.all)
    if args.json:
        output.emit_json({"removed": gone})
    else:
        output.note(f"removed {len(gone)} warm image(s) and leftover(s)")
    return 0
