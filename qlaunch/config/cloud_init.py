"""The values a [cloud-init] section and `qlaunch seed` take: a hostname, ssh public keys.

Checked here, before any seed is written, because cloud-init drops a bad key or hostname in the
guest without a word: the user would find out only when ssh refuses them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from qlaunch.errors import UsageError

_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def check_hostname(hostname: str) -> None:
    labels = hostname.split(".")
    if len(hostname) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise UsageError(
            f"bad hostname {hostname!r}",
            hint="letters, digits and '-', dot-separated labels of at most 63 characters",
        )


# An authorized_keys line: options may come first, then the key type and its base64 blob.
_KEY_RE = re.compile(r"(?:^|\s)(?:ssh|ecdsa|sk)-[A-Za-z0-9@.-]+\s+[A-Za-z0-9+/]+={0,3}(?:\s|$)")


def check_keys(keys: Sequence[str]) -> tuple[str, ...]:
    """SSH public keys, stripped; each must be one line with a key type and its base64 body
    (what ~/.ssh/id_*.pub holds), so that a path or a typo is not handed to cloud-init, which
    would drop it without a word."""
    out: list[str] = []
    for key in keys:
        k = key.strip()
        if not k or "\n" in k or "\r" in k:
            raise UsageError(
                f"bad ssh authorized key {key[:40]!r}", hint="one key per entry, on one line"
            )
        if not _KEY_RE.search(k):
            raise UsageError(
                f"bad ssh authorized key {key[:40]!r}: not a public key line",
                hint="the contents of a .pub file, like: ssh-ed25519 AAAAC3NzaC1lZDI1... me@host",
            )
        out.append(k)
    return tuple(out)
