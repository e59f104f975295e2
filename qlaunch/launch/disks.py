"""A launch's disks, made real: missing images created, locks checked, the cloud-init seed built.

`prepare_disks` is the one I/O step between a validated profile and its argv. Both launch edges
(foreground `run`, background `start`) call it and pass what it returns as
`argv.Runtime(disk_paths=...)`.

QEMU's image locking stays on: it is what keeps two VMs from writing one disk. Before QEMU starts,
each disk is opened the way the VM will open it (qemu-io, read-write or read-only), so that a
conflict is reported with the holder's name instead of QEMU's "Failed to get "write" lock". The
check and QEMU's own open are not atomic; a VM that takes the disk in between still meets QEMU's
lock, with QEMU's message.

Throwaway disks (`snapshot = true`) use QEMU's own `snapshot=on`: QEMU 7.2 creates its temporary
qcow2 overlay in $TMPDIR (default /var/tmp) and unlinks it right after opening it, so nothing is
left behind even when QEMU is killed with SIGKILL, and the base is opened read-only.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from qlaunch import units
from qlaunch.boot import seed
from qlaunch.config.profile import CloudInit, Disk, Profile
from qlaunch.errors import ProfileError, QemuError
from qlaunch.launch.argv import esc
from qlaunch.spawn import spawn
from qlaunch.storage import image, outfile
from qlaunch.storage.holders import ImageInUse, describe, locked_path

log = logging.getLogger(__name__)

SEED_NAME = "cloud-init-seed.iso"


def prepare_disks(
    profile: Profile,
    workdir: Path,
    *,
    note: Callable[[str], None] | None = None,
    make: bool = True,
    check_locks: bool = True,
) -> tuple[str, ...]:
    """Per-disk paths for the argv, absolute; creates what `size` asks for and the seed ISO.

    Everything is checked before anything is made, so a refusal leaves no file behind;
    make=False (`qlaunch cmdline`) stops after the checks. check_locks=False: the disks are
    shared with the QEMU this VM migrates from, which holds them until the switch-over.
    """
    paths: list[str] = []
    create: list[tuple[int, Disk, str]] = []
    for i, d in enumerate(profile.disks):
        if d.cloud_init_seed:
            paths.append(str(workdir / SEED_NAME))
            continue
        path = os.path.abspath(d.path)
        paths.append(path)
        if not os.path.lexists(path):
            _check_creatable(profile, i, d, path)
            create.append((i, d, path))
            continue
        what = outfile.kind(path)
        if what not in (None, "a block device"):
            where = f"{profile.source}: [[disk]] #{i} path"
            raise ProfileError(f"{where}: {path} is {what}, not an image")
        if d.interface == "sd":
            _check_sd_size(profile, i, d, path)
        if d.media != "cdrom" and check_locks:
            check_lock(path, d.format, write=not (d.readonly or d.snapshot), label=f"disk #{i}")
    seed_files = _seed_inputs(profile, profile.cloud_init) if profile.cloud_init else None
    if not make:
        return tuple(paths)
    for i, d, path in create:
        assert d.size is not None
        log.debug("disk #%d: creating %s (%s, %d bytes)", i, path, d.format, d.size)
        image.create(path, d.size, fmt=d.format)
        if note:
            note(
                f"created {path} ({d.format}, {units.format_size(d.size)}) for "
                f"[[disk]] #{i}, as its size asks"
            )
    if seed_files is not None:
        _build_seed(workdir / SEED_NAME, *seed_files)
    return tuple(paths)


def _check_creatable(profile: Profile, i: int, d: Disk, path: str) -> None:
    where = f"{profile.source}: [[disk]] #{i} path"
    if d.size is None:
        hint = None
        if not d.readonly:
            hint = (
                f'add size = "8G" to this [[disk]] to create it at start, or run: '
                f"qlaunch image create {path} 8G --format {d.format}"
            )
        raise ProfileError(f"{where}: {path} does not exist", hint=hint)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ProfileError(f"{where}: {parent} does not exist, so {path} cannot be created")


def _check_sd_size(profile: Profile, i: int, d: Disk, path: str) -> None:
    size = (
        os.stat(path).st_size if d.format == "raw" else image.info(path, fmt=d.format).virtual_size
    )
    if not units.is_power_of_two(size):
        raise ProfileError(
            f"{profile.source}: [[disk]] #{i}: {path} is {units.format_size(size)}, but an SD card "
            "image must be a power of two in size",
            hint=f"grow it to {units.format_size(units.round_up_pow2(size))} with: "
            f"qlaunch image sd-round {path}",
        )


# --- locks ------------------------------------------------------------------------------------


def check_lock(path: str, fmt: str, *, write: bool, label: str = "disk") -> None:
    """Open the image as the VM will, and say who holds it if QEMU's lock refuses.

    Without qemu-io there is nothing to ask; QEMU's own lock still refuses at start.
    """
    qemu_io = shutil.which("qemu-io")
    if qemu_io is None:
        return
    opts = f"driver={fmt},file.driver=file,file.filename={esc(path)}"
    argv = [qemu_io, *([] if write else ["-r"]), "--image-opts", opts, "-c", "quit"]
    proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate()
    text = out.decode(errors="replace")
    locked = locked_path(text)
    if locked is None:
        if proc.returncode == 0:
            return
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        reason = (lines[-1] if lines else "qemu-io failed").removeprefix("qemu-io: ")
        reason = reason.removeprefix("can't open: ")
        raise QemuError(
            f"{label} {path} cannot be opened as {fmt}: {reason}",
            hint=f"check the image and its format with: qlaunch image info {path}",
        )
    locked = locked or path
    what = f"{label} {path}" if locked == path else f"{label} {path} (through {locked})"
    hint = "stop it first: a disk is written by one VM at a time"
    if not write:
        hint = "stop it first: even a read-only or snapshot disk needs an image nobody writes"
    raise ImageInUse(f"{what} is in use by {describe(locked)}; QEMU's lock refuses it", hint=hint)


# --- the cloud-init seed ----------------------------------------------------------------------


def _read(profile: Profile, key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ProfileError(f"{profile.source}: [cloud-init] {key}: {path} does not exist") from None
    except OSError as e:
        raise ProfileError(
            f"{profile.source}: [cloud-init] {key}: cannot read {path}: {e.strerror}"
        ) from None


def _seed_inputs(
    profile: Profile, ci: CloudInit
) -> tuple[bytes, bytes | None, str | None, tuple[str, ...]]:
    """(user-data, network-config, hostname, keys for meta-data)."""
    network = _read(profile, "network_config", ci.network_config) if ci.network_config else None
    if ci.user_data:
        # Verbatim, whatever its kind (#cloud-config, a script, MIME): hostname and keys go into
        # meta-data, which cloud-init applies next to any user-data.
        return (
            _read(profile, "user_data", ci.user_data),
            network,
            ci.hostname,
            ci.ssh_authorized_keys,
        )
    return seed.user_data_from(ci.hostname, ci.ssh_authorized_keys), network, ci.hostname, ()


def _build_seed(
    out: Path, user_data: bytes, network: bytes | None, hostname: str | None, keys: tuple[str, ...]
) -> None:
    seed.build_seed(
        out, user_data=user_data, network_config=network, hostname=hostname, public_keys=keys
    )


__all__ = ["SEED_NAME", "check_lock", "prepare_disks"]
