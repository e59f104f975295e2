"""cloud-init NoCloud seeds: a small ISO labelled `cidata` holding user-data and meta-data.

cloud-init finds the seed by filesystem label (it looks for both `cidata` and `CIDATA`; older
releases only for the lower-case one, which is what this writes, like cloud-localds does).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qlaunch.boot.iso9660 import write_iso
from qlaunch.config.cloud_init import check_hostname as check_hostname
from qlaunch.config.cloud_init import check_keys as check_keys
from qlaunch.errors import UsageError

VOLUME_ID = "cidata"
# YAML 1.1 (PyYAML, which cloud-init uses) accepts these unescaped; everything else in a
# double-quoted scalar must be an escape, or the whole document fails to load.
_YAML_UNPRINTABLE = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)


def is_seed_iso(path: str | os.PathLike[str]) -> bool:
    """Whether path is a NoCloud seed that qlaunch wrote (volume cidata, application QLAUNCH):
    one that a new seed may replace without --force."""
    with open(path, "rb") as f:
        f.seek(16 * 2048)
        pvd = f.read(2048)
    return (
        len(pvd) == 2048
        and pvd[:6] == b"\x01CD001"
        and pvd[40:72].rstrip(b" ") == VOLUME_ID.encode()
        and pvd[574:702].rstrip(b" ") == b"QLAUNCH"
    )


def instance_id(*parts: bytes | None) -> str:
    """A stable id from the seed's content.

    cloud-init runs its per-instance modules (users, keys, packages) once per instance-id: an id
    that follows the content makes an edited user-data take effect on the next boot, while an
    unchanged seed keeps the guest from being re-provisioned on every start.
    """
    h = hashlib.sha256()
    for part in parts:
        # Length-prefixed, with absent distinct from empty, so no two inputs hash alike.
        if part is None:
            h.update(b"\x00")
        else:
            h.update(b"\x01" + len(part).to_bytes(8, "big") + part)
    return "iid-qlaunch-" + h.hexdigest()[:16]


def default_meta_data(
    user_data: bytes,
    network_config: bytes | None,
    hostname: str | None,
    public_keys: Sequence[str] = (),
) -> bytes:
    """meta-data: a content-derived instance-id, local-hostname, and public-keys if given.

    cloud-init gives the default user the meta-data's public-keys in addition to any
    ssh_authorized_keys of the user-data, and takes the user-data's hostname over
    local-hostname: so keys and a hostname can go here next to a user-data used verbatim.
    """
    host = hostname.encode() if hostname else None
    keys = check_keys(public_keys)
    parts = [user_data, network_config, host]
    if keys:
        parts.append("\n".join(keys).encode())
    lines = [f"instance-id: {instance_id(*parts)}"]
    if hostname:
        check_hostname(hostname)
        lines.append(f"local-hostname: {hostname}")
    if keys:
        lines.append(f"public-keys: {_yaml_safe_json(list(keys), indent=None)}")
    return ("\n".join(lines) + "\n").encode()


def build_seed(
    out: str | os.PathLike[str],
    *,
    user_data: bytes,
    meta_data: bytes | None = None,
    network_config: bytes | None = None,
    hostname: str | None = None,
    public_keys: Sequence[str] = (),
) -> Path:
    """Write a NoCloud seed ISO to `out` (replaced atomically if it exists) and return its path.

    Without `meta_data`, one is made: a content-derived instance-id, `local-hostname` when a
    hostname is given, `public-keys` when keys are. With `meta_data`, hostname and public_keys
    must be left out: they would be silently lost.
    """
    if meta_data is None:
        meta_data = default_meta_data(user_data, network_config, hostname, public_keys)
    elif hostname or public_keys:
        raise UsageError(
            "a hostname or keys cannot be added to a meta-data given as it is",
            hint="put local-hostname and public-keys in the meta-data file",
        )
    files = {"user-data": user_data, "meta-data": meta_data}
    if network_config is not None:
        files["network-config"] = network_config
    path = Path(out)
    if not path.parent.is_dir():
        raise UsageError(f"{path.parent}: no such directory")
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not a seed file")
    try:
        return write_iso(path, files, volume_id=VOLUME_ID)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from None


def _yaml_safe_json(doc: Mapping[str, Any] | Sequence[str], indent: int | None = 2) -> str:
    """JSON that PyYAML also reads as the same data.

    ensure_ascii would emit astral characters as surrogate pairs, which YAML decodes into two
    lone surrogates; instead keep text as UTF-8 and escape only what YAML forbids raw.
    """
    text = json.dumps(doc, indent=indent, ensure_ascii=False)

    def esc(m: re.Match[str]) -> str:
        cp = ord(m.group(0))
        return f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"

    # Outside strings JSON has only ASCII structure, so the unprintable ones are inside strings.
    return _YAML_UNPRINTABLE.sub(esc, text)


def user_data_from(
    hostname: str | None,
    ssh_authorized_keys: Sequence[str] = (),
    extra_user_data: Mapping[str, Any] | None = None,
) -> bytes:
    """A `#cloud-config` document from the profile's [cloud-init] keys.

    Written as JSON under the header: JSON is YAML, so no YAML library is needed, and quoting
    everything sidesteps YAML 1.1's surprises (`no` -> false, `0755` -> octal). `extra_user_data`
    holds further cloud-config keys; one that repeats a generated key is an error rather than
    a silent override.
    """
    doc: dict[str, Any] = {}
    if hostname:
        check_hostname(hostname)
        short, _, _ = hostname.partition(".")
        doc["hostname"] = short
        if short != hostname:
            doc["fqdn"] = hostname
    keys = check_keys(ssh_authorized_keys)
    if keys:
        doc["ssh_authorized_keys"] = list(keys)
    for k, v in (extra_user_data or {}).items():
        if k in doc:
            raise UsageError(
                f"cloud-init user-data key {k!r} is set twice",
                hint="drop it from user-data, or drop the matching [cloud-init] key",
            )
        doc[k] = v
    try:
        body = _yaml_safe_json(doc)
    except (TypeError, ValueError) as e:
        raise UsageError(f"cloud-init user-data cannot be written: {e}") from e
    return ("#cloud-config\n" + body + "\n").encode()
