"""`qlaunch boards`: the boards qlaunch knows, their limits, and the QEMU binary serving each."""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import Any

from qlaunch.cli import output
from qlaunch.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "boards",
        help="boards, their CPU and RAM limits, and whether their QEMU binary is installed",
        description="Every board (arch and machine) a profile can name: its CPU and RAM limits, "
        "console, DTB, storage and NIC, the QEMU binary that serves it and whether that is "
        "installed, the profiles that use it, and what it cannot do (hotplug, powerdown, "
        "migration).",
    )
    p.add_argument("--json", action="store_true", help="a JSON list with every field")
    p.set_defaults(func=cmd_boards)


def _mib(n: int) -> str:
    return f"{n // 1024}G" if n % 1024 == 0 else f"{n}M"


def _profiles_by_board() -> dict[tuple[str, str], list[str]]:
    from qlaunch.config import profile
    from qlaunch.errors import ProfileError

    out: dict[tuple[str, str], list[str]] = {}
    for name, path in sorted(profile.available().items()):
        try:
            p = profile.load(str(path))
        except ProfileError:
            continue  # `qlaunch profiles` reports what fails to load
        out.setdefault((p.machine.arch, p.machine.machine), []).append(name)
    return out


def board_report() -> list[dict[str, Any]]:
    from qlaunch.config import boards

    uses = _profiles_by_board()
    rows = []
    for (arch, machine), b in boards.BOARDS.items():
        path = shutil.which(b.binary)
        rows.append(
            {
                "arch": arch,
                "machine": machine,
                "description": b.description,
                "qemu_binary": b.binary,
                "qemu_path": path,
                "installed": path is not None,
                "qemu_package": boards.QEMU_PACKAGE[arch],
                "cpu": b.cpu,
                "smp": {"fixed": b.smp_fixed, "max": b.smp_fixed or b.smp_max},
                "memory_mib": {
                    "fixed": b.memory_fixed_mib,
                    "max": b.memory_fixed_mib or b.memory_max_mib,
                    "default": b.memory_default_mib,
                    "align": b.memory_align_mib,
                },
                "console": b.console,
                "console_serial": b.console_serial,
                "dtb": b.dtb,
                "dtb_removed_nodes": list(b.dtb_remove),
                "storage": list(b.storage),
                "sd_slots": b.sd_slots,
                "sd_pow2": b.sd_pow2,
                "virtio": b.virtio or None,
                "nic_model": b.nic_model,
                "acpi": b.acpi,
                "powerdown": b.powerdown or None,
                "cannot": boards.cannot(b),
                "halts_on_poweroff": b.halts_on_poweroff,
                "default_for_arch": boards.DEFAULT_MACHINE[arch] == machine,
                "profiles": uses.get((arch, machine), []),
            }
        )
    return rows


def _limit(fixed: int | None, top: int | None, fmt: Any) -> str:
    if fixed is not None:
        return f"={fmt(fixed)}"
    return f"<={fmt(top)}" if top is not None else "-"


def cmd_boards(args: argparse.Namespace) -> int:
    if args.guest_cmd is not None:
        raise UsageError("`qlaunch boards` takes no command after --")
    rows = board_report()
    if args.json:
        output.emit_json(rows)
        return 0
    table = [
        {
            "arch": r["arch"],
            "machine": r["machine"],
            "cpus": _limit(r["smp"]["fixed"], r["smp"]["max"], str),
            "ram": _limit(r["memory_mib"]["fixed"], r["memory_mib"]["max"], _mib),
            "console": r["console"],
            "storage": ",".join(r["storage"]),
            "nic": r["nic_model"] or "none",
            "qemu": r["qemu_binary"],
            "installed": "yes" if r["installed"] else "NO",
            "profiles": ",".join(r["profiles"]) or "-",
            "cannot": ",".join(r["cannot"]) or "-",
        }
        for r in rows
    ]
    columns = ["arch", "machine", "cpus", "ram", "console", "storage", "nic", "qemu"]
    output.table(table, [*columns, "installed", "profiles", "cannot"])
    missing = sorted({r["qemu_package"] for r in rows if not r["installed"]})
    if missing:
        print(
            f"qlaunch: some QEMU binaries are missing: apt-get install {' '.join(missing)}",
            file=sys.stderr,
        )
    return 0
