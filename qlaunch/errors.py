"""The one error root. Every failure a user can act on is a QlaunchError with a hint.

cli.main is the only place these become a one-line message and an exit code.
"""

from __future__ import annotations


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
