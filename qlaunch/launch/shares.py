"""Host directories shared with a guest: virtiofs where it can be had, 9p otherwise.

virtiofs needs the host's virtiofsd (Debian 12: /usr/lib/qemu/virtiofsd, the C one of QEMU
7.2, which needs root for its sandbox), guest RAM on a shared memory backend (argv gives one
whenever a share is virtiofs; memfd works under TCG too), and a kernel with FUSE_FS and
VIRTIO_FS. It is far faster than 9p for many small files (virtme-ng's users: `git diff` in a
kernel tree 1.2 s against 284 s). virtiofsd 7.2 cannot export a directory read-only, so a
read-only share stays 9p, where QEMU itself refuses the guest's writes.

Pure: the choice and the helper's argv from host facts; exec adds what the kernel has (and
a note when the descriptor limit virtiofsd inherits, read by fd_limit, is low).
"""

from __future__ import annotations

import os
import resource

from qlaunch.config.profile import Profile
from qlaunch.errors import UsageError
from qlaunch.launch.argv import Share
from qlaunch.launch.host import HostFacts

KINDS = ("auto", "virtiofs", "9p")
READONLY_WHY = "virtiofsd cannot export a directory read-only (9p can)"


def virtiofs_unusable(host: HostFacts) -> str | None:
    """Why this host cannot serve virtiofs, or None when it can."""
    if host.virtiofsd is None:
        return (
            "virtiofsd is not installed (/usr/lib/qemu/virtiofsd: apt-get install "
            "qemu-system-common)"
        )
    if not host.root:
        return "virtiofsd needs root (QEMU 7.2's C virtiofsd sets up its sandbox as root)"
    return None


def choose(want: str, readonly: bool, host: HostFacts) -> tuple[str, str | None]:
    """(kind, why not virtiofs) for one share: want is auto, virtiofs or 9p. Only an explicit
    virtiofs that cannot be had is an error; auto falls back to 9p and says why."""
    if want == "9p":
        return "9p", None
    why = READONLY_WHY if readonly else virtiofs_unusable(host)
    if why is None:
        return "virtiofs", None
    if want == "virtiofs":
        raise UsageError(
            f"a virtiofs share cannot be had here: {why}",
            hint="leave the share type at auto (9p then), or set it to 9p",
        )
    return "9p", why


# virtiofsd (QEMU 7.2's) keeps an O_PATH descriptor open for every inode the guest holds,
# and a guest holds every inode it walked until memory runs short: `git status` in a kernel
# tree holds about 80,000. virtiofsd raises its soft limit as far as the hard one allows.
FD_WANTED = 100_000


def fd_limit() -> int:
    """The hard RLIMIT_NOFILE virtiofsd inherits (only CAP_SYS_RESOURCE raises it)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return FD_WANTED if hard == resource.RLIM_INFINITY else hard


def fd_limit_note(hard: int) -> str | None:
    """One line when virtiofsd could not keep a large tree open, else None."""
    if hard >= FD_WANTED:
        return None
    return (
        f"virtiofsd may have at most {hard} files open (RLIMIT_NOFILE hard limit here): a "
        f"guest that walks more files than that (git status in a large tree) gets EMFILE; "
        f"raise the hard limit (ulimit -Hn, as root) or pick the other type (--share-type)"
    )


def socket_path(sockdir: str, index: int) -> str:
    return f"{sockdir}/virtiofs{index}.sock"


def from_profile(profile: Profile, host: HostFacts, sockdir: str) -> tuple[list[Share], list[str]]:
    """The profile's [[share]] entries as the launch wires them, and a note for each that
    falls back to 9p."""
    out: list[Share] = []
    notes: list[str] = []
    for i, s in enumerate(profile.shares):
        kind, why = choose(s.type, s.readonly, host)
        if why and s.type == "auto" and not s.readonly:
            notes.append(f"[[share]] {s.tag} ({s.path}) over 9p, not virtiofs: {why}")
        sock = socket_path(sockdir, i) if kind == "virtiofs" else None
        out.append(Share(s.tag, s.path, s.readonly, kind=kind, socket=sock, guest=s.guest))
    return out, notes


def virtiofsd_argv(host: HostFacts, share: Share) -> tuple[str, ...]:
    """virtiofsd for one share: it ends when QEMU's vhost-user connection closes."""
    assert host.virtiofsd is not None and share.socket is not None
    if "," in share.path:
        # -o takes FUSE's comma-separated options; virtiofsd would read the rest as options.
        raise UsageError(
            f"virtiofsd cannot share a path with a comma: {share.path}",
            hint="share it over 9p (type 9p, or --share-type 9p)",
        )
    return (
        host.virtiofsd,
        f"--socket-path={share.socket}",
        "-o",
        f"source={share.path}",
        # The guest keeps what it read for a second: fast, and a host's change shows soon.
        "-o",
        "cache=auto",
        "-o",
        "log_level=warn",
    )


def helper_log(share: Share) -> str:
    assert share.socket is not None
    return os.path.splitext(share.socket)[0] + ".log"
