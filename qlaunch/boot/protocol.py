"""The protocol between qlaunch and its guest init (boot/guest/init), and the exit codes that
stand for what the guest did.

The init reads `qlaunch.*` kernel parameters, prints markers on the console, and reports the
command's status on a virtio port or, without one, in framed console lines. `run`, `exec`,
the console scanner and the plan all take their words from here.
"""

from __future__ import annotations

import re

# Exit codes of `qlaunch exec` (and `run`'s 120), documented in the README. They sit in 117-125
# so they miss the codes commands commonly use (0-2, 126-127 from the shell, 128+N for
# signals), and stay below 128 so `git bisect run` reads them as "bad" (125: "skip").
EXIT_NO_STATUS = 120  # the guest ended without reporting the command's status
EXIT_PANIC = 121
EXIT_OOPS = 122  # oops, BUG, and the rest of the oops family
EXIT_HANG = 123  # RCU stall, hung task, soft lockup
EXIT_TIMEOUT = 124  # --timeout or the no-output watchdog, as timeout(1)
EXIT_WARNING = 119  # WARNING, only with --fail-on-warn
EXIT_BOOT_FAILURE = 118  # no qlaunch init: the kernel did not boot (--boot-failure-exit)

# Markers the guest init prints.
# A command's foreground guest, which nothing powers down (it ends with its command): the init
# sets up no power-button handler (four busybox processes, 60 to 80 ms under TCG on aarch64).
NO_BUTTON = "qlaunch.nobutton"
INIT_MARKER = "QLAUNCH_INIT"
EXIT_MARKER = "QLAUNCH_EXIT="
EXIT_RE = re.compile(r"QLAUNCH_EXIT=(\d+)")
FALLBACK_RE = re.compile(r"QLAUNCH_FALLBACK=(\S+)")
NOTE_RE = re.compile(r"QLAUNCH_NOTE=(.*)")
FRAME_OUT = b"QLAUNCH_O:"
FRAME_ERR = b"QLAUNCH_E:"
# Ends each framed stream, right after its last byte: a frame ending in it had no newline.
FRAME_END = b"QLAUNCH_EOS"
HALT_RE = re.compile(r"reboot: (System halted|Power down)")

# The virtio console ports of exec, /dev/virtio-ports/qlaunch.NAME in the guest.
PORTS = ("stdout", "stderr", "status")
TRANSPORTS = ("ports", "console")


def exec_kernel_args(transport: str, fail_on_warn: bool = False) -> tuple[str, ...]:
    """The kernel parameters exec gives the init: how to send output (ports or framed console
    lines). Which shares to mount where (qlaunch.9p=, qlaunch.virtiofs=) the kernel command
    line gets from the launch's shares, as for any launch with qlaunch's initramfs."""
    # The boot-time crypto self-tests take about 0.2 s of a 1.5 s TCG boot; a test loop boots
    # often. --append cryptomgr.notests=0 (it comes later, so it wins) brings them back.
    args = ["cryptomgr.notests", f"qlaunch.exec={transport}"]
    if fail_on_warn:
        # `quiet` keeps KERN_WARNING off the console, and a WARNING is printed at that level.
        args.append("loglevel=5")
    return tuple(args)
