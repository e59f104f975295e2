"""Running VMs, changed: save, restore, snapshot, attach-disk, detach-disk, attach-nic,
detach-nic.

Handlers import what they need when they run (qemu.qmp is heavy; `qlaunch list` must not pay
for it).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from qlaunch.cli import output
from qlaunch.cli.argtypes import positive
from qlaunch.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "save",
        help="save a running VM's state to a file; the VM ends",
        description="Pause the guest, migrate its state (RAM, devices) into FILE, then end "
        "the VM (recorded as saved). Its disks are not in FILE: `restore` needs them "
        "unchanged.",
    )
    p.add_argument("name")
    p.add_argument("file")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace FILE if it exists (never a file a VM holds: a disk, a kernel, a save "
        "file of a saved VM)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_save)

    p = sub.add_parser(
        "restore",
        help="start a VM from a save file; the guest goes on where it was",
        description="Check FILE, start the saved VM's QEMU (same profile, command and "
        "hotplugged devices) waiting for its state, load it, and resume the guest if it was "
        "running. Prints the VM's name.",
    )
    p.add_argument("file")
    p.add_argument("--name", help="name for the restored VM (default: the saved VM's)")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser(
        "snapshot",
        help="internal snapshots of a running VM's qcow2 disks and guest state",
        description="create TAG: every writable disk (all must be qcow2) and the guest's "
        "state; list; revert TAG: disks and guest back to that instant; delete TAG.",
    )
    p.add_argument("name")
    p.add_argument("action", choices=["create", "list", "revert", "delete"])
    p.add_argument("tag", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser("attach-disk", help="plug an image into a running VM (virtio disk)")
    p.add_argument("name")
    p.add_argument("path")
    p.add_argument("--format", choices=["qcow2", "raw", "vdi", "vmdk"], help="default: by name")
    p.add_argument("--readonly", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_attach_disk)

    p = sub.add_parser("detach-disk", help="unplug a hotplugged disk (the guest must let go)")
    p.add_argument("name")
    p.add_argument("id", help="as attach-disk printed it (hpdisk1...)")
    p.add_argument(
        "--timeout", type=positive(float), default=60.0, help="seconds to wait for the guest"
    )
    p.set_defaults(func=cmd_detach_disk)

    p = sub.add_parser("attach-nic", help="plug a NIC into a running VM")
    p.add_argument("name")
    p.add_argument("--mode", default="user", choices=["user"], help="user: QEMU's NAT")
    p.add_argument("--model", help="NIC model (default: the board's, virtio-net-pci)")
    p.add_argument("--mac", help="default: stable per VM and NIC, 52:54:00:...")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_attach_nic)

    p = sub.add_parser("detach-nic", help="unplug a hotplugged NIC (the guest must let go)")
    p.add_argument("name")
    p.add_argument("id", help="as attach-nic printed it (hpnet1...)")
    p.add_argument(
        "--timeout", type=positive(float), default=60.0, help="seconds to wait for the guest"
    )
    p.set_defaults(func=cmd_detach_nic)


def _no_cmd(args: argparse.Namespace) -> None:
    if args.guest_cmd is not None:
        raise UsageError(f"`qlaunch {args.command}` takes no command after --")


def _print_entry(entry: dict[str, Any], as_json: bool) -> None:
    if as_json:
        output.emit_json({k: v for k, v in entry.items() if k != "args"})
    else:
        print(entry["id"])


def cmd_save(args: argparse.Namespace) -> int:
    from qlaunch.vm import migrate

    _no_cmd(args)
    with output.Progress(f"{args.name}: saving", enabled=not args.json) as p:
        report = migrate.save(
            args.name,
            args.file,
            force=args.force,
            note=p.note,
            progress=p.update if p.enabled else None,
        )
    if args.json:
        output.emit_json(report.to_json())
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from qlaunch.vm import migrate

    _no_cmd(args)
    with output.Progress(f"restoring {args.file}") as p:
        vm = migrate.restore(
            args.file, args.name, note=p.note, progress=p.update if p.enabled else None
        )
    print(vm.name)
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    from qlaunch.vm import snapshot

    _no_cmd(args)
    if args.action == "list":
        if args.tag:
            raise UsageError("snapshot list takes no TAG")
        snaps = snapshot.list_(args.name)
        if args.json:
            output.emit_json([s.to_json() for s in snaps])
            return 0
        rows = [
            {
                "tag": s.tag,
                "date": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.date)),
                "vm clock": f"{s.vm_clock:.1f}s",
                "state": f"{s.vm_state_size / 2**20:.1f}M",
                "disks": ",".join(s.disks),
            }
            for s in snaps
        ]
        output.table(rows, ["tag", "date", "vm clock", "state", "disks"])
        return 0
    if not args.tag:
        raise UsageError(f"snapshot {args.action} needs a TAG")
    say = lambda m: output.note(f"{args.name}: {m}")  # noqa: E731
    if args.action == "create":
        snap = snapshot.create(args.name, args.tag, note=say)
    elif args.action == "revert":
        snap = snapshot.revert(args.name, args.tag, note=say)
    else:
        snap = snapshot.delete(args.name, args.tag)
    if args.json:
        output.emit_json(snap.to_json())
    else:
        done = {"create": "created", "revert": "reverted to", "delete": "deleted"}[args.action]
        output.note(f"{args.name}: {done} snapshot {snap.tag} ({', '.join(snap.disks)})")
    return 0


def cmd_attach_disk(args: argparse.Namespace) -> int:
    from qlaunch.vm import hotplug

    _no_cmd(args)
    entry = hotplug.attach_disk(args.name, args.path, fmt=args.format, readonly=args.readonly)
    _print_entry(entry, args.json)
    return 0


def cmd_detach_disk(args: argparse.Namespace) -> int:
    from qlaunch.vm import hotplug

    _no_cmd(args)
    hotplug.detach_disk(args.name, args.id, timeout=args.timeout)
    return 0


def cmd_attach_nic(args: argparse.Namespace) -> int:
    from qlaunch.vm import hotplug

    _no_cmd(args)
    entry = hotplug.attach_nic(args.name, mode=args.mode, model=args.model, mac=args.mac)
    _print_entry(entry, args.json)
    return 0


def cmd_detach_nic(args: argparse.Namespace) -> int:
    from qlaunch.vm import hotplug

    _no_cmd(args)
    hotplug.detach_nic(args.name, args.id, timeout=args.timeout)
    return 0
