"""`qlaunch image build debian`: a bootable Debian 12 disk, with progress on a terminal."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from typing import IO, Any

from qlaunch.cli import output
from qlaunch.errors import UsageError

BUILD_ARCHES = ("x86_64", "aarch64")  # as qlaunch.storage.build.ARCHES, not imported here


def register_build(isub: Any) -> None:
    """Adds `build` to the `qlaunch image` actions."""
    b = isub.add_parser(
        "build",
        help="build a bootable Debian 12 disk image from Debian's packages (root, mmdebstrap)",
        description="Build a bootable Debian 12 qcow2 disk with mmdebstrap: kernel, GRUB, "
        "systemd, cloud-init, qemu-guest-agent and openssh-server, a serial console, DHCP on "
        "the NICs. Give it an ssh key through a cloud-init seed (qlaunch seed, or a profile's "
        "[cloud-init]); the user is `debian`. Needs root; an aarch64 image on an x86_64 host "
        "also needs qemu-user-static and binfmt-support. Nothing is left behind on failure or "
        "Ctrl-C.",
    )
    b.add_argument("distribution", choices=["debian"], help="the distribution (Debian 12)")
    b.add_argument("out", metavar="OUT.qcow2", help="the image to write (qcow2)")
    b.add_argument("--arch", choices=BUILD_ARCHES, help="default: the host's")
    b.add_argument("--size", default="4G", help="virtual disk size (default 4G, at least 2G)")
    b.add_argument(
        "--firmware",
        choices=("bios", "uefi"),
        help="what boots it: bios (GRUB in the MBR, x86_64 only) or uefi (GRUB at the "
        "removable path of the ESP); default bios on x86_64, uefi on aarch64",
    )
    b.add_argument("--force", action="store_true", help="replace OUT if it exists")
    b.add_argument(
        "--mirror",
        metavar="URL",
        help="Debian mirror (default http://deb.debian.org/debian; security updates from "
        "URL-security)",
    )
    b.add_argument("--json", action="store_true", help="print the result as JSON, no progress")
    b.set_defaults(func=cmd_build)


class StepProgress:
    """Steps with their elapsed time, redrawn in place each second on a terminal.

    `[2/5] installing Debian packages (mmdebstrap)  0:42  Setting up cloud-init ...`; a step
    that ends keeps its line with its time.
    """

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.started = time.monotonic()
        self.step_started = self.started
        self.label = ""
        self.text = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()

    def step(self, number: int, total: int, label: str) -> None:
        with self._lock:
            self._finish_line()
            self.label = f"[{number}/{total}] {label}"
            self.text = ""
            self.step_started = time.monotonic()
            self._draw()

    def detail(self, text: str) -> None:
        with self._lock:
            self.text = text
            self._draw()

    def end(self) -> None:
        self._stop.set()
        self._ticker.join()
        with self._lock:
            self._finish_line()

    def _finish_line(self) -> None:
        if self.label:
            self.text = ""
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
            self.label = ""

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                if self.label:
                    self._draw()

    def _draw(self) -> None:
        if not self.label:
            return
        secs = int(time.monotonic() - self.step_started)
        line = f"{self.label}  {secs // 60}:{secs % 60:02d}"
        if self.text:
            line += f"  {self.text}"
        width = shutil.get_terminal_size((100, 24)).columns - 1
        self.stream.write("\r\x1b[K" + line[:width])
        self.stream.flush()


def cmd_build(args: argparse.Namespace) -> int:
    from qlaunch import units
    from qlaunch.errors import StateError
    from qlaunch.storage import build
    from qlaunch.vm import state

    def check_held(path: str) -> None:
        who = state.holder_of(path)
        if who is not None:
            raise StateError(f"{path} is {who}; an image build never replaces it")

    if args.guest_cmd is not None:
        raise UsageError("`qlaunch image build` takes no command after --")
    arch = args.arch or _host_arch()
    if arch not in BUILD_ARCHES:
        raise UsageError(f"no default --arch on a {arch} host", hint="--arch x86_64 or aarch64")
    spec = build.Spec(
        arch=arch,
        firmware=args.firmware or build.default_firmware(arch),
        size=units.parse_size(args.size),
        mirror=args.mirror or build.DEFAULT_MIRROR,
    )
    progress = None
    if not args.json and sys.stderr.isatty():
        progress = StepProgress(sys.stderr)
    try:
        made = build.build(
            spec, args.out, force=args.force, progress=progress, check_held=check_held
        )
    except build.BuildError as e:
        if progress:
            progress.end()
            progress = None
        for line in e.log_tail:
            print(f"  | {line}", file=sys.stderr)
        raise
    finally:
        if progress:
            progress.end()
    if args.json:
        output.emit_json(made.as_dict())
        return 0
    print(
        f"built {made.path}: Debian 12 {spec.arch}, {spec.firmware}, "
        f"{units.format_size(spec.size)} disk ({made.file_size >> 20} MiB file), "
        f"kernel {made.kernel_version}, in {made.seconds:.0f} s"
    )
    return 0


def _host_arch() -> str:
    m = os.uname().machine
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)
