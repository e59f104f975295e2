"""Files qlaunch writes for a user: seed ISOs, save files, reports, console logs.

The rules every command that writes a file keeps:

- never over something qlaunch did not make, unless the user forces it: a file counts as
  qlaunch's when its content says so (`ours`, e.g. a seed ISO's application id) or when it is
  still the very file qlaunch wrote (same device, inode, size and modification time as
  recorded in the cache's `written.json` at the time);
- never into a directory, a device or a FIFO where a file belongs, never into a directory
  that does not exist (none is made);
- through a temporary file beside the target and a rename, so a failure leaves the old file
  whole (`write_bytes`).

Files a VM or network holds are refused by the callers above this layer (qlaunch.vm.state
knows the VMs); this module only knows files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

from qlaunch import paths
from qlaunch.errors import UsageError

KEEP = 200  # entries in written.json: enough for any working set of outputs
_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def kind(path: str | os.PathLike[str]) -> str | None:
    """What is at path, in words, when it is not a regular file: "missing", "a directory",
    "a FIFO (named pipe)"...; None for a regular file (or a symlink to one)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except NotADirectoryError:
        return "missing"
    if stat.S_ISREG(st.st_mode):
        return None
    return _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")


def require_file(path: str | os.PathLike[str], what: str) -> Path:
    """path names a regular file that can be read; else a UsageError that says what is
    there instead (a directory given as a file is not "missing", and a FIFO would hang)."""
    k = kind(path)
    if k == "missing":
        raise UsageError(f"{what} {path}: {os.strerror(errno.ENOENT)}")
    if k is not None:
        raise UsageError(f"{what} {path} is {k}, not a file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{what} {path}: permission denied")
    return Path(path)


def check_target(
    path: str | os.PathLike[str],
    what: str,
    *,
    force: bool = False,
    ours: Callable[[Path], bool] | None = None,
    stream: bool = False,
    own: bool = True,
) -> Path:
    """Check that `path` may be written as `what`; returns it absolute. `ours` recognises
    a file of this kind that qlaunch made; own=False: even those need force. `stream`: a FIFO
    or character device (a pipe, /dev/null) is fine, written in place."""
    p = Path(os.path.abspath(path))
    parent = p.parent
    pk = kind(parent)
    if pk == "missing":
        raise UsageError(
            f"{what} {path}: directory {parent} does not exist",
            hint="create it first; qlaunch makes no directories for its output",
        )
    if pk != "a directory":
        raise UsageError(f"{what} {path}: {parent} is {pk or 'a file'}, not a directory")
    k = kind(p)
    if k == "missing" and not os.path.lexists(p):
        return p
    if k == "a directory":
        raise UsageError(
            f"{what} {path} is a directory", hint="give a file name, e.g. inside that directory"
        )
    if k is not None and k != "missing":
        if stream and k in (_KINDS[stat.S_IFIFO], _KINDS[stat.S_IFCHR]):
            return p
        raise UsageError(f"{what} {path} is {k}, not a file")
    if force or (own and k is None and (made_here(p) or (ours is not None and _safe(ours, p)))):
        return p
    raise UsageError(
        f"{what} {path} exists and qlaunch did not write it; refusing to overwrite it",
        hint="choose another name, or --force to replace it",
    )


def _safe(ours: Callable[[Path], bool], p: Path) -> bool:
    try:
        return ours(p)
    except (OSError, ValueError):
        return False


def write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> Path:
    """data into path through a temporary file beside it and a rename: readers see the old
    file or the new one, and a failure leaves the old one whole. Remembered as written here."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.partial")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UsageError(f"cannot write {path}: {e.strerror}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    remember(p)
    return p


# ---- what qlaunch wrote ----------------------------------------------------------------------


def _registry() -> Path:
    return paths.cache_dir() / "written.json"


def _identity(p: Path) -> list[object] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return [os.path.abspath(p), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def _read() -> list[list[object]]:
    try:
        data = json.loads(_registry().read_bytes())
    except (OSError, ValueError):
        return []
    return [e for e in data if isinstance(e, list)] if isinstance(data, list) else []


def made_here(p: Path) -> bool:
    """Whether p is a file qlaunch wrote and nobody changed since."""
    ident = _identity(p)
    return ident is not None and ident in _read()


def remember(p: Path) -> None:
    """Record p, as it is now, as a file qlaunch wrote. Best effort: a cache that cannot be
    written only means the next overwrite needs --force."""
    ident = _identity(p)
    if ident is None:
        return
    reg = _registry()
    with contextlib.suppress(OSError):
        reg.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(reg.with_name(".written.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            entries = [e for e in _read() if e[:1] != ident[:1]]
            entries = (entries + [ident])[-KEEP:]
            tmp = reg.with_name(f".written.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entries))
            os.replace(tmp, reg)
        finally:
            os.close(fd)


__all__ = ["check_target", "kind", "made_here", "remember", "require_file", "write_bytes"]
