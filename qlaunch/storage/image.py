"""A thin, typed face over qemu-img: create, info, convert, resize, check, overlays.

Every path handed to qemu-img is made absolute first: qemu treats `name:rest` as a protocol
prefix (`nbd:`, `ssh:`, ...) unless the path has a `/` before the colon, so an image called
`disk:1.qcow2` in the working directory would otherwise be opened as something else entirely.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from qlaunch.errors import HostError, QemuError, StateError, UsageError
from qlaunch.spawn import spawn, stop_child
from qlaunch.storage.holders import ImageInUse, describe, locked_path
from qlaunch.storage.outfile import kind
from qlaunch.units import MAX_SIZE, format_size, is_power_of_two, parse_size, round_up_pow2

FORMATS = ("qcow2", "raw", "vdi", "vmdk")
# Formats whose header can name a backing file; the others cannot be overlays.
BACKING_FORMATS = ("qcow2",)
INSTALL_HINT = "install it with: apt-get install -y qemu-utils"
_IMAGE_MODE = 0o644  # what qemu-img gives the files it creates itself (before the umask)

_PROGRESS_RE = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


@dataclass(frozen=True)
class ImageInfo:
    """One image as qemu-img sees it; `backing` is the next image down the chain."""

    path: str
    format: str
    virtual_size: int
    actual_size: int | None
    dirty: bool
    backing_file: str | None = None
    backing_format: str | None = None
    cluster_size: int | None = None
    corrupt: bool = False
    backing: ImageInfo | None = None

    @property
    def chain(self) -> tuple[ImageInfo, ...]:
        """This image, then every backing image below it, top first."""
        out: list[ImageInfo] = []
        node: ImageInfo | None = self
        while node is not None:
            out.append(node)
            node = node.backing
        return tuple(out)

    def _own_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "virtual_size": self.virtual_size,
            "actual_size": self.actual_size,
            "dirty": self.dirty,
            "corrupt": self.corrupt,
            "cluster_size": self.cluster_size,
            "backing_file": self.backing_file,
            "backing_format": self.backing_format,
        }

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; the backing chain comes flat, top first, below this image."""
        d = self._own_dict()
        d["backing_chain"] = [b._own_dict() for b in self.chain[1:]]
        return d


@dataclass(frozen=True)
class CheckResult:
    """`qemu-img check` as data. `supported` is False for formats with nothing to check (raw)."""

    path: str
    format: str
    supported: bool
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    total_clusters: int | None = None
    allocated_clusters: int | None = None
    fragmented_clusters: int | None = None
    image_end_offset: int | None = None
    message: str = ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def clean(self) -> bool:
        return self.supported and not (self.corruptions or self.leaks or self.check_errors)

    @property
    def status(self) -> str:
        """One word for tables and scripts: clean, corrupt, leaks, errors or unsupported."""
        if not self.supported:
            return "unsupported"
        if self.corruptions:
            return "corrupt"
        if self.check_errors:
            return "errors"
        if self.leaks:
            return "leaks"
        return "clean"

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "status": self.status,
            "supported": self.supported,
            "corruptions": self.corruptions,
            "leaks": self.leaks,
            "check_errors": self.check_errors,
            "corruptions_fixed": self.corruptions_fixed,
            "leaks_fixed": self.leaks_fixed,
            "total_clusters": self.total_clusters,
            "allocated_clusters": self.allocated_clusters,
            "fragmented_clusters": self.fragmented_clusters,
            "image_end_offset": self.image_end_offset,
            "message": self.message,
        }


# --- running qemu-img -------------------------------------------------------------------------


def qemu_img() -> str:
    """The qemu-img binary, or a HostError saying how to get it."""
    found = shutil.which("qemu-img")
    if not found:
        raise HostError("qemu-img not found on PATH", hint=INSTALL_HINT)
    return found


def _abs(path: str | os.PathLike[str]) -> str:
    return os.path.abspath(os.fspath(path))


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UsageError(f"unknown image format {fmt!r}", hint=f"one of: {', '.join(FORMATS)}")


def _error(subcommand: str, stderr: str, path: str | None = None) -> QemuError | StateError:
    """qemu-img's own words, with the lock failure turned into what it means and who holds it."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    locked = locked_path(stderr)
    if locked is not None:
        locked = locked or path or "the image"
        return ImageInUse(
            f"{locked} is in use by {describe(locked)} (qemu-img could not get its lock)",
            hint="stop it first; `qlaunch image info` still works on images in use",
        )
    # error_report() lines start with "qemu-img: "; later lines are appended hints.
    reports = [ln for ln in lines if ln.startswith("qemu-img: ")]
    chosen = (reports or lines or ["exited without a message"])[-1]
    others = [ln for ln in lines if ln != chosen]
    message = chosen.removeprefix("qemu-img: ")
    return QemuError(f"qemu-img {subcommand} failed: {message}", hint=" ".join(others) or None)


def _run_status(args: Sequence[str]) -> tuple[int, str, str]:
    """Run `qemu-img ARGS` to completion: (exit code, stdout, stderr)."""
    argv = [qemu_img(), *args]
    try:
        proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError as e:  # removed between which() and exec
        raise HostError("qemu-img not found", hint=INSTALL_HINT) from e
    out, err = proc.communicate()
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def _run(args: Sequence[str], *, path: str | None = None) -> str:
    """Run `qemu-img ARGS` and return its stdout; a failure becomes a QemuError."""
    rc, out, err = _run_status(args)
    if rc != 0:
        raise _error(args[0], err, path)
    return out


# --- info ------------------------------------------------------------------------------------


def _int_or_none(v: Any) -> int | None:
    return int(v) if isinstance(v, int) else None


def _from_json(node: dict[str, Any], below: ImageInfo | None) -> ImageInfo:
    specific = node.get("format-specific", {}).get("data", {})
    return ImageInfo(
        path=str(node.get("filename", "")),
        format=str(node.get("format", "")),
        virtual_size=int(node.get("virtual-size", 0)),
        actual_size=_int_or_none(node.get("actual-size")),
        dirty=bool(node.get("dirty-flag", False)),
        backing_file=node.get("full-backing-filename") or node.get("backing-filename"),
        backing_format=node.get("backing-filename-format"),
        cluster_size=_int_or_none(node.get("cluster-size")),
        corrupt=bool(specific.get("corrupt", False)) if isinstance(specific, dict) else False,
        backing=below,
    )


def parse_info_json(text: str) -> ImageInfo:
    """ImageInfo from `qemu-img info --output=json` with or without --backing-chain."""
    data = json.loads(text)
    nodes: list[dict[str, Any]] = data if isinstance(data, list) else [data]
    if not nodes:
        raise QemuError("qemu-img info printed an empty backing chain")
    below: ImageInfo | None = None
    for node in reversed(nodes):
        below = _from_json(node, below)
    assert below is not None
    return below


def _require_image(p: str, shown: str | os.PathLike[str]) -> None:
    what = kind(p)
    if what == "missing":
        raise UsageError(f"{shown}: no such image")
    if what not in (None, "a block device"):
        # qemu-img would wait forever on a FIFO, and calls a directory a failure of its own.
        raise UsageError(f"{shown} is {what}, not an image")


def info(path: str | os.PathLike[str], *, fmt: str | None = None) -> ImageInfo:
    """What qemu-img knows about an image and its backing chain.

    -U (force-share) because the point of `info` is often to look at the disk of a running VM;
    it only reads headers, so a torn read costs a wrong number, never data.
    """
    p = _abs(path)
    _require_image(p, path)
    args = ["info", "--output=json", "--backing-chain", "-U"]
    if fmt:
        _check_format(fmt)
        args += ["-f", fmt]
    return parse_info_json(_run([*args, p], path=p))


# --- create, overlay -------------------------------------------------------------------------


@contextlib.contextmanager
def _claim(path: str) -> Iterator[None]:
    """Create `path` exclusively, and remove it again unless the block succeeds.

    O_EXCL closes the window between "does it exist?" and qemu-img's O_TRUNC open, which would
    otherwise overwrite an image another process created in between.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _IMAGE_MODE)
    except FileExistsError as e:
        raise UsageError(
            f"{path} already exists; refusing to overwrite it",
            hint="remove it first, or pick another name",
        ) from e
    except FileNotFoundError as e:
        raise UsageError(f"{os.path.dirname(path)}: no such directory") from e
    os.close(fd)
    try:
        yield
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise


def _refuse_written(base: str, fmt: str) -> None:
    """Refuse a base that a running VM is writing: an overlay's view of it would rot.

    qemu-img create itself opens the backing file without taking a lock, so ask with a plain
    (lock-taking) read-only open. VMs that merely read the base, through their own overlays,
    share it and do not trip this.
    """
    try:
        _run(["info", "--output=json", "-f", fmt, base], path=base)
    except ImageInUse as e:
        raise ImageInUse(
            f"{base} is in use by {describe(base)}, which may still write to it; "
            "an overlay on it would go inconsistent",
            hint="stop it first: an overlay needs a base that nobody writes",
        ) from e


def create(
    path: str | os.PathLike[str],
    size: int | None,
    *,
    fmt: str = "qcow2",
    backing: str | os.PathLike[str] | None = None,
    backing_fmt: str | None = None,
) -> ImageInfo:
    """A new image; never overwrites. size=None takes the backing image's size."""
    _check_format(fmt)
    p = _abs(path)
    if size is not None and (size <= 0 or size > MAX_SIZE):
        raise UsageError(f"bad image size {size}", hint="more than 0 bytes, e.g. 1G")
    args = ["create", "-q", "-f", fmt]
    if backing is not None:
        if fmt not in BACKING_FORMATS:
            raise UsageError(f"a {fmt} image cannot have a backing file", hint="use --format qcow2")
        b = _abs(backing)
        if b == p:
            raise UsageError(f"{path} cannot be its own backing file")
        if backing_fmt is None:
            backing_fmt = info(b).format
        _check_format(backing_fmt)
        _refuse_written(b, backing_fmt)
        # Absolute: a relative backing name resolves against the overlay's directory, which
        # silently breaks when either file moves; an absolute one fails loudly instead.
        args += ["-b", b, "-F", backing_fmt]
    elif size is None:
        raise UsageError("an image without a backing file needs a size")
    args.append(p)
    if size is not None:
        args.append(str(size))
    with _claim(p):
        _run(args, path=p)
    return info(p, fmt=fmt)


def overlay(base: str | os.PathLike[str], new: str | os.PathLike[str]) -> ImageInfo:
    """A qcow2 image whose reads fall through to `base` and whose writes stay in `new`."""
    base_info = info(base)
    return create(new, None, fmt="qcow2", backing=base, backing_fmt=base_info.format)


# --- convert ---------------------------------------------------------------------------------


class _ProgressParser:
    """Turns the `    (12.34/100%)\\r` stream of `qemu-img -p` into calls, each value once.

    Fed arbitrary chunks: a report may be split across two reads, so the unmatched tail is kept.
    """

    def __init__(self, callback: Callable[[float], None]) -> None:
        self._callback = callback
        self._buf = b""
        self.last = -1.0

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        end = 0
        for m in _PROGRESS_RE.finditer(self._buf):
            end = m.end()
            self._emit(float(m.group(1)))
        # Keep only what could still be the start of a report.
        tail = self._buf[end:]
        start = tail.rfind(b"(")
        self._buf = tail[start:] if start >= 0 else b""
        if len(self._buf) > 64:
            self._buf = b""

    def _emit(self, pct: float) -> None:
        pct = min(max(pct, 0.0), 100.0)
        if pct > self.last:
            self.last = pct
            self._callback(pct)

    def finish(self) -> None:
        self._emit(100.0)


def _publish(tmp: str, dst: str) -> None:
    """Move the finished temporary image to its name, never replacing a file made meanwhile."""
    try:
        os.link(tmp, dst)
    except FileExistsError as e:
        raise UsageError(f"{dst} appeared during the conversion; left it alone") from e
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # A filesystem without hard links: the check-then-rename window is the best it allows.
        if os.path.exists(dst):
            raise UsageError(f"{dst} appeared during the conversion; left it alone") from e
        os.rename(tmp, dst)
        return
    os.unlink(tmp)


def _temp_beside(directory: str, name: str) -> str:
    """An empty new file next to `name`, created with the mode qemu-img would have used.

    Not mkstemp: its 0600 would stick to the finished image, since qemu-img reopens the file
    instead of creating it.
    """
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.partial")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _IMAGE_MODE)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise HostError(f"{directory}: cannot create a temporary file")  # pragma: no cover


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    fmt: str,
    *,
    progress: Callable[[float], None] | None = None,
    src_fmt: str | None = None,
) -> None:
    """Copy `src` into a new image `dst` of format `fmt`, flattening any backing chain.

    qemu-img writes into a hidden temporary file beside `dst`, which takes `dst`'s name only
    when complete: an interrupted conversion never leaves a plausible-looking truncated image.
    """
    _check_format(fmt)
    if src_fmt is not None:
        _check_format(src_fmt)
    s, d = _abs(src), _abs(dst)
    _require_image(s, src)
    if os.path.lexists(d):
        raise UsageError(
            f"{dst} already exists; refusing to overwrite it",
            hint="remove it first, or pick another name",
        )
    ddir, dname = os.path.split(d)
    if not os.path.isdir(ddir):
        raise UsageError(f"{ddir}: no such directory")
    tmp = _temp_beside(ddir, dname)
    args = [qemu_img(), "convert", "-p", "-O", fmt]
    if src_fmt:
        args += ["-f", src_fmt]
    args += [s, tmp]
    try:
        rc, err = _convert_process(args, progress)
        if rc != 0:
            raise _error("convert", err.replace(tmp, d), s)
        _publish(tmp, d)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _convert_process(argv: list[str], progress: Callable[[float], None] | None) -> tuple[int, str]:
    parser = _ProgressParser(progress) if progress else None
    # stderr to a file, not a pipe: reading two pipes from one thread can deadlock when the
    # unread one fills, and qemu-img's stderr is only a few lines read once at the end.
    with tempfile.TemporaryFile() as errfile:
        proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errfile)
        assert proc.stdout is not None
        try:
            fd = proc.stdout.fileno()
            # Chunks, not lines: the reports end in \r, so a line reader would see them all
            # only at the very end.
            while chunk := os.read(fd, 4096):
                if parser:
                    parser.feed(chunk)
            rc = proc.wait()
        except BaseException:
            stop_child(proc, grace=2.0)
            raise
        finally:
            proc.stdout.close()
        errfile.seek(0)
        err = errfile.read().decode(errors="replace")
    if rc == 0 and parser:
        parser.finish()
    return rc, err


# --- resize, check ---------------------------------------------------------------------------


def resize(path: str | os.PathLike[str], size: int, *, shrink: bool = False) -> ImageInfo:
    """Set the virtual size. Shrinking cuts off guest data, so it needs shrink=True."""
    if size <= 0 or size > MAX_SIZE:
        raise UsageError(f"bad image size {size}")
    p = _abs(path)
    current = info(p)
    if current.backing is not None and size < current.virtual_size:
        # Shrinking an overlay would hide data of the base that the guest still expects.
        raise UsageError(f"{path} is an overlay; shrink its base or a flattened copy instead")
    args = ["resize", "-q", "-f", current.format]
    if size < current.virtual_size:
        if not shrink:
            raise UsageError(
                f"{path}: new size {format_size(size)} ({size} bytes) is smaller than the "
                f"current {format_size(current.virtual_size)} ({current.virtual_size} bytes); "
                "shrinking destroys data at the end of the disk",
                hint="shrink the guest filesystem first, then pass --shrink",
            )
        args.append("--shrink")
    try:
        _run([*args, p, str(size)], path=p)
    except QemuError as e:
        if "does not support resize" in e.message:
            e.hint = (
                f"convert the {current.format} image to qcow2 or raw, resize that, convert back"
            )
        raise
    return info(p, fmt=current.format)


def resize_to_pow2(path: str | os.PathLike[str]) -> ImageInfo:
    """Grow an image to the next power of two (SD cards of ARM boards demand it)."""
    current = info(path)
    if is_power_of_two(current.virtual_size):
        return current
    return resize(path, round_up_pow2(current.virtual_size))


def _count(data: dict[str, Any], key: str) -> int:
    v = data.get(key, 0)
    return int(v) if isinstance(v, int) else 0


def parse_check_json(text: str, path: str, fmt: str) -> CheckResult:
    data: dict[str, Any] = json.loads(text)
    return CheckResult(
        path=str(data.get("filename", path)),
        format=str(data.get("format", fmt)),
        supported=True,
        corruptions=_count(data, "corruptions"),
        leaks=_count(data, "leaks"),
        check_errors=_count(data, "check-errors"),
        corruptions_fixed=_count(data, "corruptions-fixed"),
        leaks_fixed=_count(data, "leaks-fixed"),
        total_clusters=_int_or_none(data.get("total-clusters")),
        allocated_clusters=_int_or_none(data.get("allocated-clusters")),
        fragmented_clusters=_int_or_none(data.get("fragmented-clusters")),
        image_end_offset=_int_or_none(data.get("image-end-offset")),
        raw=data,
    )


# qemu-img check's documented exit codes.
_CHECK_CLEAN, _CHECK_FAILED, _CHECK_CORRUPT, _CHECK_LEAKS, _CHECK_UNSUPPORTED = 0, 1, 2, 3, 63


def check(path: str | os.PathLike[str]) -> CheckResult:
    """Consistency of an image's metadata. Raw images have none: supported=False says so."""
    p = _abs(path)
    fmt = info(p).format
    rc, out, err = _run_status(["check", "--output=json", "-f", fmt, p])
    if rc == _CHECK_UNSUPPORTED:
        return CheckResult(
            path=p,
            format=fmt,
            supported=False,
            message=f"{fmt} images have no metadata that qemu-img check could verify",
        )
    if rc in (_CHECK_CLEAN, _CHECK_CORRUPT, _CHECK_LEAKS) and out.strip():
        return parse_check_json(out, p, fmt)
    raise _error("check", err, p)


__all__ = [
    "BACKING_FORMATS",
    "FORMATS",
    "CheckResult",
    "ImageInfo",
    "check",
    "convert",
    "create",
    "format_size",
    "info",
    "is_power_of_two",
    "overlay",
    "parse_size",
    "qemu_img",
    "resize",
    "resize_to_pow2",
    "round_up_pow2",
]
