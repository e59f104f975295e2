"""migrate: move a running VM to another host over ssh (qlaunch.vm.livemigrate); and its
other end, migrate-incoming, which the source runs on the destination (not for users)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qlaunch.cli import output
from qlaunch.cli.argtypes import positive


def register(sub: Any) -> None:
    p = sub.add_parser(
        "migrate",
        help="move a running VM to another host, live, over ssh",
        description="Live migration of a running VM to the host at URI "
        "(ssh://[user@]host[:port][?command=...], as --connect takes). qlaunch starts the VM "
        "there through ssh, with the same profile, uuid, restart policy and hotplugged "
        "devices, waiting for its state (a qlaunch network of the same name must exist there); "
        "RAM (and with --copy-storage the disks) go through ssh forwards of unix sockets, "
        "so no port opens anywhere. The VM stops here only once it runs there; then its record "
        "and data (UEFI variables) are gone from here. Any failure leaves it running here as "
        "before, with nothing left there. Without --copy-storage its disks must be at the same "
        "paths there (shared storage).",
    )
    p.add_argument("name")
    p.add_argument("uri", metavar="URI", help="the destination, ssh://[user@]host[:port]")
    p.add_argument(
        "--copy-storage",
        action="store_true",
        help="copy the writable disks there (made anew at the same paths; never over an "
        "existing file) with QEMU's block mirror over NBD, in step until the switch-over",
    )
    p.add_argument(
        "--max-downtime",
        type=positive(int),
        metavar="MS",
        help="the longest pause QEMU may plan for the last pass (QEMU's default: 300 ms)",
    )
    p.add_argument(
        "--bandwidth",
        type=positive(int),
        metavar="MIB",
        help="cap the stream (and each disk mirror) at MIB MiB/s (default: no cap)",
    )
    p.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("migrate-incoming")
    p.set_defaults(func=cmd_migrate_incoming)
    # Not for users: hidden from the list of commands (the source runs it over ssh).
    sub._choices_actions = [a for a in sub._choices_actions if a.dest != "migrate-incoming"]


def cmd_migrate(args: argparse.Namespace) -> int:
    from qlaunch.errors import UsageError
    from qlaunch.remote import uri as urimod
    from qlaunch.vm import livemigrate

    if args.guest_cmd is not None:
        raise UsageError("`qlaunch migrate` takes no command after --")
    with output.Progress(f"{args.name}: migrating", enabled=not args.json) as p:
        shown = {"what": ""}

        def progress(what: str, done: int, total: int, downtime: int | None) -> None:
            if what != shown["what"]:
                shown["what"] = what
                p.step(f"{args.name}: {'copying disks' if what == 'disks' else 'sending RAM'}")
            if what == "RAM" and downtime is not None:
                p.what = f"{args.name}: sending RAM (expected downtime {downtime} ms)"
            p.update(done, total)

        report = livemigrate.migrate(
            args.name,
            args.uri,
            copy_storage=args.copy_storage,
            max_downtime_ms=args.max_downtime,
            bandwidth_mib=args.bandwidth,
            note=p.note,
            progress=progress if p.enabled else None,
        )
        p.close()  # the line is done with; the note below says how it went
    where = urimod.parse(args.uri).where
    output.note(
        f"{args.name}: runs on {where} now (downtime "
        f"{report.downtime_ms:.0f} ms, {report.seconds:.1f} s in all); removed here"
    )
    if args.json:
        output.emit_json(report.to_json())
    return 0


def cmd_migrate_incoming(args: argparse.Namespace) -> int:
    from qlaunch.vm import livemigrate

    return livemigrate.receive(sys.stdin.buffer, sys.stdout.buffer)
