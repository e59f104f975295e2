"""A launch's kernel against its board: the image header must be for the board's architecture.

QEMU boots a kernel of the wrong architecture without complaint and the guest prints nothing,
so the mismatch is named before QEMU starts. A file whose header qlaunch does not recognise is
let through: it may still be something QEMU can boot (a U-Boot image, a raw binary).
"""

from __future__ import annotations

from qlaunch.boot import kernel as kmod
from qlaunch.config.profile import Profile
from qlaunch.errors import ProfileError

# The kernels each board architecture boots: qemu-system-x86_64 runs 32-bit x86 kernels too,
# but qemu-system-i386 no 64-bit ones.
ACCEPTS = {"x86_64": ("x86_64", "i386"), "aarch64": ("aarch64",), "arm": ("arm",)}

# A shipped profile per kernel architecture: for the hint, and the one `exec --arch` boots.
PROFILE_FOR = {
    "x86_64": "default",
    "aarch64": "aarch64-virt",
    "arm": "arm-virt",
    "i386": "i386-pc",
    "ppc64le": "ppc64le-pseries",
    "s390x": "s390x-ccw",
    "mips64el": "mips64el-malta",
}


def check_kernel(profile: Profile, path: str | None) -> None:
    """Raise ProfileError when the kernel at path is built for another architecture."""
    if path is None:
        return
    board = profile.board
    try:
        arch = kmod.detect_arch(path)
    except OSError as e:
        raise ProfileError(
            f"{profile.source}: [boot] kernel: cannot read {path}: {e.strerror}"
        ) from None
    if arch is None or arch in ACCEPTS.get(board.arch, (board.arch,)):
        return
    other = PROFILE_FOR.get(arch)
    use = f"{_a(arch)} profile such as {other}" if other else f"{_a(arch)} board"
    raise ProfileError(
        f"{profile.source}: [boot] kernel: {path} is {kmod.describe(arch)} ({arch}), but "
        f"{board.machine} is {_a(board.arch)} board",
        hint=f"give {board.machine} a kernel built for {board.arch}, or boot this one with {use}",
    )


def _a(word: str) -> str:
    # x86_64 is read "ex eighty-six", s390x "ess three-ninety".
    return f"{'an' if word[0] in 'aeiosx' else 'a'} {word}"
