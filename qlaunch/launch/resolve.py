"""Turning a profile's references (asset:SET/PATH, initrd = "qlaunch") into real files.

`asset_path` is pure; `boot_files` is the edge that may build an initramfs.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from qlaunch import paths
from qlaunch.config.profile import Profile
from qlaunch.errors import AssetError, ProfileError
from qlaunch.storage import outfile

log = logging.getLogger(__name__)

ASSET_RE = re.compile(r"^asset:([A-Za-z0-9_-]+)/(.+)$")
# Each arch's asset set is named for it (x86_64 also has x86_64-generic).
DEFAULT_SET = {a: a for a in ("x86_64", "aarch64", "arm", "i386", "ppc64le", "s390x", "mips64el")}


def asset_path(ref: str, cache: Path, source: str = "profile") -> str:
    """asset:SET/REL -> CACHE/assets/SET/REL; anything else is returned as it is."""
    if not ref.startswith("asset:"):
        return ref
    m = ASSET_RE.match(ref)
    rel = PurePosixPath(m.group(2)) if m else None
    if not m or rel is None or rel.is_absolute() or ".." in rel.parts:
        raise ProfileError(f"{source}: {ref!r} is not an asset reference (asset:SET/PATH)")
    return str(cache / "assets" / m.group(1) / rel)


def asset_set_of(profile: Profile) -> str:
    """The asset set that provides busybox and modules for this profile's initramfs."""
    kernel = profile.boot.kernel or ""
    m = ASSET_RE.match(kernel)
    return m.group(1) if m else DEFAULT_SET[profile.machine.arch]


@dataclass(frozen=True)
class BootFiles:
    kernel: str | None
    initrd: str | None
    dtb: str | None


def refs(profile: Profile, cache: Path) -> BootFiles:
    """Pure: asset references resolved against a cache root; `qlaunch` initrd left as it is."""
    b = profile.boot
    return BootFiles(
        kernel=asset_path(b.kernel, cache, profile.source) if b.kernel else None,
        initrd=asset_path(b.initrd, cache, profile.source) if b.initrd else None,
        dtb=asset_path(b.dtb, cache, profile.source) if b.dtb else None,
    )


def boot_files(
    profile: Profile,
    cmd: list[str] | None,
    workdir: Path,
    *,
    warm: bool = False,
    button: bool = True,
) -> BootFiles:
    """Real boot files for a launch: checks they exist and builds the qlaunch initramfs.
    warm (run --warm): the initramfs of a command run, with the crng reseed helper and
    without the command (a restored guest is sent it). button=False: a command's guest that
    nothing powers down (a foreground run) gets no power-button drivers."""
    from qlaunch.boot import kernelcheck
    from qlaunch.storage import sdcard

    files = refs(profile, paths.cache_dir())
    for what, path in (("kernel", files.kernel), ("dtb", files.dtb)):
        if path and not Path(path).is_file():
            _missing(profile, what, path)
        if what == "kernel":
            # Before the DTB: a wrong kernel's asset set lacks the board's DTB, the lesser news.
            kernelcheck.check_kernel(profile, path)
    sdcard.check_images(profile)
    initrd = files.initrd
    if initrd == "qlaunch":
        from qlaunch.boot import assets, initramfs
        from qlaunch.config import boards

        aset = assets.require(asset_set_of(profile))
        defaults = initramfs.DEFAULT_MODULES.get(aset.arch, [])
        pack: list[str] = []
        if cmd:
            # A command's guest gets only what its devices need (more: [boot] modules).
            defaults, pack = initramfs.command_modules(
                aset.arch,
                disks=bool(profile.disks),
                nets=bool(profile.nets),
                shares=bool(profile.shares),
                button=button,
            )
        modules = boards.guest_modules(profile.board, defaults) + list(profile.boot.modules)
        pack = boards.guest_modules(profile.board, pack)
        extra = None
        if warm:
            from qlaunch.boot import reseed
            from qlaunch.launch import warm as warmmod

            extra = {warmmod.RESEED: reseed.program(aset.arch)}
        base = initramfs.build_initramfs(aset, modules, pack=pack, extra=extra)
        initrd = str(base)
        if cmd and not warm:
            initrd = str(initramfs.initrd_with_command(base, cmd, workdir / "initrd.cpio.gz"))
    elif initrd and not Path(initrd).is_file():
        _missing(profile, "initrd", initrd)
    if cmd and profile.boot.initrd != "qlaunch":
        raise ProfileError(
            f"profile {profile.name} boots its own initrd, so it cannot run a command",
            hint='use a profile with [boot] initrd = "qlaunch", or run it without -- CMD',
        )
    from qlaunch.boot import dtb

    log.debug("boot files: kernel %s, initrd %s, dtb %s", files.kernel, initrd, files.dtb)
    return BootFiles(files.kernel, initrd, dtb.for_board(profile.board, files.dtb))


def _missing(profile: Profile, what: str, path: str) -> None:
    ref = getattr(profile.boot, what)
    if ref and ref.startswith("asset:"):
        s = ref[len("asset:") :].split("/", 1)[0]
        raise AssetError(
            f"{profile.source}: [boot] {what}: {path} is not there",
            hint=f"run: qlaunch assets fetch --arch {s}",
        )
    there = outfile.kind(path)
    if there not in (None, "missing"):
        raise ProfileError(f"{profile.source}: [boot] {what}: {path} is {there}, not a file")
    raise ProfileError(f"{profile.source}: [boot] {what}: {path} does not exist")
