"""The one error root. Every failure a user can act on is a QlaunchError with a hint.

cli.main is the only place these become a one-line message and an exit code.
"""

from __future__ import annotations

# What qlaunch's own exit codes mean, the same for every command. README's "Exit codes" table
# repeats these words (tests/unit/test_exit_codes.py keeps the two alike); `exec` adds its
# codes 118..124 (qlaunch.boot.protocol), and `run` and `exec` pass the guest command's on.
EXIT_CODES = {
    0: "success",
    1: "a failure not covered below, or a check that found problems (`image check`, `exec` "
    "with several runs)",
    2: "bad input: a profile, a key, a flag, a name, a path that is not what it must be",
    3: "the host lacks something: a QEMU binary, KVM, guest assets, a tool",
    4: "QEMU or qemu-img failed (its own error is shown)",
    5: "a state that does not allow it: no such VM, a VM busy or running, a network in use, "
    "a file a VM holds",
}


class QlaunchError(Exception):
    """A failure with a one-line message, an optional hint, and an exit code."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, *, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class UsageError(QlaunchError):
    """Bad input from the user: a profile, a flag, a name. Exit code 2."""

    exit_code = 2


class ProfileError(UsageError):
    """A profile that does not load or validate; the message names the file and key."""


class HostError(QlaunchError):
    """The host lacks something: a binary, an accelerator, a permission."""

    exit_code = 3


class AssetError(HostError):
    """A guest asset (kernel, busybox, DTB) is missing or cannot be fetched."""


class QemuError(QlaunchError):
    """QEMU failed to start or died; the message carries QEMU's own error."""

    exit_code = 4


class StateError(QlaunchError):
    """A VM's state does not allow the operation (no such VM, already running, locked)."""

    exit_code = 5
