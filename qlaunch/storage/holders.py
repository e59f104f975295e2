"""Who holds an image: the processes that have it open, with the VM name of each QEMU.

QEMU's lock failures ("Failed to get "write" lock") name no one, and its OFD locks carry no pid.
The open file descriptors do: every process whose /proc/PID/fd points at the image is a
candidate, and a QEMU among them is named by its `-name guest=NAME`, which qlaunch sets to the
VM name for background VMs and the profile name for `run`. Processes of other users are not
visible without root; then the message falls back to "another process".
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from qlaunch.errors import StateError

LOCK_RE = re.compile(r'Failed to get (?:shared )?"[a-z ]+" lock')
LOCKED_PATH_RE = re.compile(r"Is another process using the image \[(.*)\]\?")


class ImageInUse(StateError):
    """An image another process holds under QEMU's lock."""


@dataclass(frozen=True)
class Holder:
    pid: int
    process: str  # its name, e.g. qemu-system-x86_64
    vm: str | None  # the `-name` of a QEMU, else None

    def describe(self) -> str:
        if self.vm:
            return f"VM {self.vm!r} (pid {self.pid})"
        return f"another process (pid {self.pid}, {self.process})"


def holders(path: str) -> list[Holder]:
    """Processes with `path` open (those this user may look at)."""
    import psutil

    real = os.path.realpath(path)
    found: list[Holder] = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if not any(f.path == real for f in proc.open_files()):
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if proc.pid == os.getpid():
            continue
        cmdline = proc.info.get("cmdline") or []
        found.append(Holder(proc.pid, str(proc.info.get("name") or "?"), vm_name(cmdline)))
    return found


def describe(path: str) -> str:
    """ "VM 'web' (pid 12)", several of those, or "another process" when none can be seen."""
    found = holders(path)
    return ", ".join(h.describe() for h in found) if found else "another process"


def vm_name(cmdline: list[str]) -> str | None:
    """The guest name of a QEMU command line: `-name guest=NAME,...` or `-name NAME`."""
    if not cmdline or "qemu-system" not in os.path.basename(cmdline[0]):
        return None
    for flag, value in zip(cmdline, cmdline[1:], strict=False):
        if flag != "-name":
            continue
        # QEMU option syntax: ",," is a literal comma; the first lone comma ends the value.
        first = re.split(r"(?<!,),(?!,)", value, maxsplit=1)[0]
        first = first.removeprefix("guest=")
        return first.replace(",,", ",") or None
    return None


def locked_path(qemu_stderr: str) -> str | None:
    """The image a QEMU tool could not lock, from its message; None if it is no lock failure."""
    if not LOCK_RE.search(qemu_stderr):
        return None
    m = LOCKED_PATH_RE.search(qemu_stderr)
    return m.group(1) if m else ""


__all__ = ["Holder", "ImageInUse", "describe", "holders", "locked_path", "vm_name"]
