"""SD card images at the launch edge: their size, which ARM boards' SD controllers constrain.

QEMU's SD card model takes only images whose size is a power of two, and says so only once it
has started. Checking the images the profile names before anything starts gives the profile's
file, the disk's index, the size, and the command that grows the image. qlaunch never rounds an
image up itself: growing a user's disk is a choice that is theirs to make.
"""

from __future__ import annotations

import os
import shlex
import stat

from qlaunch.config.profile import Disk, Profile
from qlaunch.errors import ProfileError

# The `qlaunch image` action that grows an image to the next power of two.
ROUND_UP_COMMAND = "qlaunch image sd-round"


def image_size(path: str, fmt: str) -> int:
    """The size the guest sees: the file's (or block device's) length for raw, else qemu-img's."""
    if fmt == "raw":
        st = os.stat(path)
        if stat.S_ISBLK(st.st_mode):
            with open(path, "rb") as f:
                return f.seek(0, os.SEEK_END)
        return st.st_size
    from qlaunch.storage import image

    return image.info(path, fmt=fmt).virtual_size


def check_image(source: str, index: int, disk: Disk, path: str) -> None:
    """Raise ProfileError when the SD card image at path is not a power of two in size."""
    from qlaunch.units import format_size, is_power_of_two, round_up_pow2

    try:
        size = image_size(path, disk.format)
    except OSError as e:
        raise ProfileError(
            f"{source}: [[disk]] #{index} path: cannot read {path}: {e.strerror}"
        ) from None
    if is_power_of_two(size):
        return
    where = f"{source}: [[disk]] #{index} path"
    if size == 0:
        raise ProfileError(
            f"{where}: {path} is empty, and an SD card image must be a power of two in size",
            hint=f"give it a size: qlaunch image resize {shlex.quote(path)} 64M",
        )
    raise ProfileError(
        f"{where}: {path} is {format_size(size)}, but an SD card image must be a power of two "
        "in size",
        hint=f"grow it to {format_size(round_up_pow2(size))} with: "
        f"{ROUND_UP_COMMAND} {shlex.quote(path)}",
    )


def check_images(profile: Profile) -> None:
    """Check every SD card image of the profile that exists.

    One that does not exist yet is left to the disk preparation, which creates it from the
    disk's `size` (validated as a power of two with the profile) or refuses.
    """
    if not profile.board.sd_pow2:
        return
    for i, d in enumerate(profile.disks):
        if d.interface != "sd":
            continue
        path = os.path.abspath(d.path)
        if os.path.exists(path):
            check_image(profile.source, i, d, path)
