"""`qlaunch assets fetch|list`: guest kernels and busybox from Debian packages."""

from __future__ import annotations

import argparse
from typing import Any

from qlaunch.cli import output
from qlaunch.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser("assets", help="guest kernels, modules, DTBs and busybox (Debian packages)")
    asub = p.add_subparsers(dest="assets_command", metavar="ACTION", required=True)
    f = asub.add_parser("fetch", help="download and unpack guest assets into the cache")
    f.add_argument(
        "--arch",
        default="x86_64",
        help="comma-separated asset sets: x86_64, x86_64-generic, aarch64, arm, i386, ppc64le, "
        "s390x, mips64el (default x86_64)",
    )
    f.add_argument("--force", action="store_true", help="fetch again even if present")
    f.set_defaults(func=cmd_fetch)
    ls = asub.add_parser("list", help="what the cache holds")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)


def cmd_fetch(args: argparse.Namespace) -> int:
    from qlaunch.boot import assets

    names = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [n for n in names if n not in assets.ASSET_SETS]
    if unknown or not names:
        raise UsageError(
            f"unknown asset set {unknown[0] if unknown else args.arch!r}",
            hint="choose from " + ", ".join(assets.ASSET_SETS),
        )
    # On a terminal each step is a line with its time, the current one counting; elsewhere
    # each step is logged once as it begins.
    with output.Progress("fetching guest assets") as p:
        assets.fetch(names, progress=p.step if p.enabled else output.note, force=args.force)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from qlaunch.boot import assets

    rows = assets.list_assets()
    if args.json:
        output.emit_json(rows)
    else:
        output.table(rows, ["set", "arch", "version", "present", "size_bytes", "path"])
    return 0
