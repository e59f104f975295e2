"""Warm images: built once per key, restored for each `qlaunch run --warm` (the pure part,
refusals, key and payload, is qlaunch.launch.warm).

    CACHE/warm/KEY/state       QEMU's migration stream, the guest waiting in qlaunch's init
    CACHE/warm/KEY/meta.json   what it is (profile, QEMU, argv, size, build time)
    CACHE/warm/KEY.lock        held while KEY is built: a concurrent caller waits, then uses it
    CACHE/warm/.build-KEY-*    a build in progress; renamed to KEY once whole

A build is published by one rename of its directory, so an image is either whole or absent:
a build killed halfway leaves a .build- directory that no run reads (the next build of that
key, holding its lock, removes it). Each use touches meta.json; past the size cap
($QLAUNCH_WARM_MAX, default 4G) the least recently used images go.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from qlaunch import paths
from qlaunch.boot import initramfs
from qlaunch.config.profile import Profile
from qlaunch.errors import QemuError, UsageError
from qlaunch.launch import argv as argvmod
from qlaunch.launch import plan as planmod
from qlaunch.launch import run as runmod
from qlaunch.launch import warm as warmmod
from qlaunch.launch.host import HostFacts
from qlaunch.spawn import spawn, stop_child

log = logging.getLogger(__name__)

STATE = "state"
META = "meta.json"
BUILD_TIMEOUT = 300.0
LOCK_TIMEOUT = BUILD_TIMEOUT + 60.0
DEFAULT_MAX = 4 << 30
HASHES = "hashes.json"  # content hashes of boot files, memoized by their stat


def root() -> Path:
    """$QLAUNCH_WARM_DIR, or warm/ in qlaunch's cache."""
    env = os.environ.get("QLAUNCH_WARM_DIR")
    return Path(env) if env else paths.cache_dir() / "warm"


def max_bytes() -> int:
    from qlaunch import units

    v = os.environ.get("QLAUNCH_WARM_MAX")
    if not v:
        return DEFAULT_MAX
    try:
        return units.parse_size(v)
    except ValueError as e:
        raise UsageError(f"QLAUNCH_WARM_MAX={v!r}: {e}") from None


def run_warm(
    profile: Profile,
    host: HostFacts,
    cmd: list[str],
    *,
    out: BinaryIO | None = None,
    note: Callable[[str], None] | None = None,
) -> runmod.RunResult:
    """`qlaunch run PROFILE --warm -- CMD`: restore the profile's warm image (built first
    when there is none for these inputs) and send it the command."""
    import sys

    warmmod.check(profile, bool(cmd))
    _, accel_note = argvmod.choose_accel(profile, host)
    out = out or sys.stdout.buffer
    with tempfile.TemporaryDirectory(prefix="qlaunch-warm-") as tmp:
        shown = runmod.plan_warm(profile, host, "warm-run", cmd, Path(tmp))
        key = image_key(shown)
        image = root() / key
        if not (image / STATE).is_file():
            build(profile, host, cmd, key, Path(tmp), key_argv=shared_argv(shown), note=note)
        elif note:
            log.debug("warm: image %s", image)
        fd = os.open(image / STATE, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):
                os.utime(image / META)
            launch = _with_fd(shown, fd)
            if accel_note and note:
                note(accel_note)
            script = initramfs.command_script(cmd)
            # The clock is set when the guest reads this, a restore later: about that late.
            feed = warmmod.payload(script, epoch=time.time() + 0.2, seed=os.urandom(32))
            return runmod._drive(profile, list(launch.argv), out, True, [fd], feed=feed)
        finally:
            os.close(fd)


def _with_fd(p: planmod.LaunchPlan, fd: int) -> planmod.LaunchPlan:
    """The warm-run plan with the image's descriptor where it showed a placeholder."""
    placeholder = "fd:<fd: warm image>"
    argv = tuple(f"fd:{fd}" if a == placeholder else a for a in p.argv)
    fds = tuple(planmod.PassFd(fd, f.what) if f.what.startswith("warm image") else f for f in p.fds)
    return dataclasses.replace(p, argv=argv, fds=fds)


def shared_argv(p: planmod.LaunchPlan) -> list[str]:
    """What the build and every restore have in common: the argv without -incoming."""
    argv = list(p.argv)
    if "-incoming" in argv:
        i = argv.index("-incoming")
        del argv[i : i + 2]
    return argv


def image_key(p: planmod.LaunchPlan) -> str:
    argv = shared_argv(p)
    binary = shutil.which(argv[0]) or argv[0]
    st = os.stat(binary)
    identity = f"{binary} {st.st_size} {st.st_mtime_ns}"
    hashes = {f: file_hash(f) for f in warmmod.named_files(argv) if os.path.isfile(f)}
    return warmmod.key(identity, argv, hashes)[:32]


def file_hash(path: str) -> str:
    """sha256 of a file's content, remembered by its (device, inode, size, mtime): a kernel is
    hashed once, not on every warm run."""
    st = os.stat(path)
    stamp = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    memo_path = root() / HASHES
    try:
        memo: dict[str, Any] = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    got = memo.get(path)
    if isinstance(got, list) and len(got) == 2 and got[0] == stamp:
        return str(got[1])
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    memo[path] = [stamp, h.hexdigest()]
    with contextlib.suppress(OSError):
        root().mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_name(f".{HASHES}.{os.getpid()}")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
    return h.hexdigest()


def build(
    profile: Profile,
    host: HostFacts,
    cmd: list[str],
    key: str,
    workdir: Path,
    *,
    key_argv: list[str],
    note: Callable[[str], None] | None = None,
) -> Path:
    """Boot to the init's wait, save there, publish CACHE/warm/KEY. Concurrent callers: one
    builds, the others wait on the key's lock and find the image made."""
    from qlaunch.vm.state import FileLock

    r = root()
    r.mkdir(parents=True, exist_ok=True)
    final = r / key
    with FileLock(r / f"{key}.lock", f"warm image {key}", "warm build", LOCK_TIMEOUT) as lock:
        try:
            if (final / STATE).is_file():
                return final
            _build_locked(
                profile, host, cmd, key, workdir, tmp_root=r, key_argv=key_argv, note=note
            )
        finally:
            # Waiters notice and look again (they find the image, or build it after a failed
            # build); no lock file piles up.
            lock.unlink_locked()
    evict(keep=key)
    return final


def _build_locked(
    profile: Profile,
    host: HostFacts,
    cmd: list[str],
    key: str,
    workdir: Path,
    *,
    tmp_root: Path,
    key_argv: list[str],
    note: Callable[[str], None] | None,
) -> None:
    r = tmp_root
    for stale in r.glob(f".build-{key}-*"):
        # A build of this key that died (we hold its lock): nothing reads it.
        shutil.rmtree(stale, ignore_errors=True)
    if note:
        note(f"warm: building the warm image of {profile.name} (a boot, once)")
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=r))
    try:
        p = runmod.plan_warm(profile, host, "warm-build", cmd, workdir)
        size = _boot_and_save(p, tmp)
        meta = {
            "key": key,
            "profile": profile.name,
            "source": profile.source,
            "arch": profile.machine.arch,
            "machine": profile.board.machine,
            # What the key hashed: the argv a restore shares with the build.
            "argv": key_argv,
            "bytes": size,
            "built": time.time(),
            "build_seconds": round(time.monotonic() - t0, 2),
        }
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        os.rename(tmp, r / key)
    except BaseException as e:
        # The boot's console and QEMU's stderr outlive a failed build, for its error's hint.
        for name in ("console.log", "qemu.log"):
            with contextlib.suppress(OSError):
                os.replace(tmp / name, r / f"failed-build.{name}")
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, QemuError):
            e.hint = f"the failed boot's console: {r / 'failed-build.console.log'}"
        raise
    if note:
        note(f"warm: image built in {time.monotonic() - t0:.1f} s ({size >> 20} MiB)")


def _boot_and_save(p: planmod.LaunchPlan, tmp: Path) -> int:
    from qlaunch.vm import migrate
    from qlaunch.vm.qmp import Monitor

    assert p.sockets and p.sockets[0].what == "QMP"
    qmp_path = p.sockets[0].path
    console = open(tmp / "console.log", "wb")  # noqa: SIM115 - closed in finally
    err = open(tmp / "qemu.log", "wb")  # noqa: SIM115
    proc = spawn(
        list(p.argv),
        # A pipe that stays open: the guest's console input, empty until a restore.
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=err,
        die_with_parent=True,
    )
    try:
        _wait_ready(proc, console)
        with Monitor(qmp_path, what="warm build") as mon:
            fd = os.open(tmp / STATE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                # Live, not stopped first: the stream then says the guest was running, so a
                # restore resumes it by itself (-incoming without -S, no monitor needed). The
                # guest is blocked in a read, so the dirty rounds are few.
                migrate._migrate_out(mon, fd, was_running=False)
                os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            mon.quit()
        proc.wait(timeout=30)
        return size
    finally:
        if proc.poll() is None:
            stop_child(proc)
        if proc.stdin:
            proc.stdin.close()
        if proc.stdout:
            proc.stdout.close()
        console.close()
        err.close()


def _wait_ready(proc: subprocess.Popen[bytes], console: BinaryIO) -> None:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + BUILD_TIMEOUT
    seen = b""
    ready = warmmod.READY.encode()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise QemuError(f"warm build: no {warmmod.READY} from the guest in {BUILD_TIMEOUT} s")
        r, _, _ = select.select([fd], [], [], min(left, 1.0))
        if not r:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            tail = seen.decode(errors="replace").strip().splitlines()[-1:] or ["none"]
            raise QemuError(
                f"warm build: QEMU ended before the guest was ready (last console line: "
                f"{tail[0]!r})",
            )
        console.write(chunk)
        seen = (seen + chunk)[-4096:]
        if ready in seen:
            return


# ---- listing and eviction ---------------------------------------------------------------


def images() -> list[dict[str, Any]]:
    """Every whole warm image, newest use first."""
    out = []
    r = root()
    if not r.is_dir():
        return []
    for d in r.iterdir():
        if d.name.startswith(".") or not d.is_dir():
            continue
        try:
            meta = json.loads((d / META).read_text())
            st = (d / META).stat()
            size = (d / STATE).stat().st_size
        except (OSError, ValueError):
            continue
        out.append(
            {
                "key": d.name,
                "profile": meta.get("profile"),
                "arch": meta.get("arch"),
                "machine": meta.get("machine"),
                "bytes": size,
                "built": meta.get("built"),
                "used": st.st_mtime,
                "path": str(d),
            }
        )
    out.sort(key=lambda m: -float(m["used"]))
    return out


def remove(key: str) -> None:
    """Remove one image: renamed away first, so a run never restores half of one."""
    d = root() / key
    gone = root() / f".gone-{key}-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.rename(d, gone)
        shutil.rmtree(gone, ignore_errors=True)


def evict(keep: str | None = None, cap: int | None = None) -> list[str]:
    """Remove least recently used images until the rest fit the cap; returns their keys."""
    cap = max_bytes() if cap is None else cap
    imgs = images()
    total = sum(int(m["bytes"]) for m in imgs)
    gone = []
    for m in reversed(imgs):
        if total <= cap:
            break
        if m["key"] == keep:
            continue
        remove(str(m["key"]))
        total -= int(m["bytes"])
        gone.append(str(m["key"]))
    return gone


def clean(everything: bool = False) -> list[str]:
    """Leftovers of builds that died (and of removals); with everything, every image too."""
    from qlaunch.vm.state import held_by_other

    r = root()
    gone: list[str] = []
    if not r.is_dir():
        return gone
    for d in r.iterdir():
        if d.name.endswith(".lock") and not held_by_other(d):
            d.unlink(missing_ok=True)  # a build's that died
            continue
        if d.name.startswith((".build-", ".gone-")):
            key = d.name.split("-")[1] if d.name.startswith(".build-") else ""
            if key and held_by_other(r / f"{key}.lock"):
                continue  # being built right now
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d.name)
    if everything:
        for m in images():
            remove(str(m["key"]))
            gone.append(str(m["key"]))
        for f in [r / HASHES, *r.glob("failed-build.*")]:
            f.unlink(missing_ok=True)
    else:
        gone += evict()
    return gone
