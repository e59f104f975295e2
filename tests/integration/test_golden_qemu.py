"""QEMU is the judge: every golden case's plan, with real files, fds and sockets in place of its
placeholders, is started on the installed qemu-system-*, paused, asked `query-status` and
`query-block` over QMP, and quit. A device, bus or option QEMU rejects fails here.

Only what this host cannot have is changed: cases written for a host with hardware KVM run
under TCG (the golden test pins their `-accel kvm -cpu host`), and paths that name files on
another machine (/images/..., /boot/...) become small real files of the same kind.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from goldens import NO_KVM, Case, cases, render

from qlaunch import paths
from qlaunch.boot import firmware
from qlaunch.config import profile
from qlaunch.launch import extras, resolve
from qlaunch.launch.argv import firmware_for
from qlaunch.vm.qmp import Monitor

CASES = cases()
START_TIMEOUT = 30.0


def _make_disk(path: Path, fmt: str, interface: str | None, media: str) -> None:
    if media == "cdrom" or fmt == "raw":
        with open(path, "wb") as f:
            f.truncate(16 << 20)  # a power of two, as an SD card must be
        return
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), "16M"], check=True)


def _real_sets(case: Case, work: Path) -> list[str]:
    """--set lines that point a case's foreign paths at real files here."""
    raw = profile.load(str(case.path))
    sets = []
    cache = paths.cache_dir() / "assets"
    arch_set = resolve.DEFAULT_SET[raw.machine.arch]
    if raw.boot.kernel and not raw.boot.kernel.startswith("asset:"):
        sets.append(f"boot.kernel={cache / arch_set / 'kernel'}")
    if raw.boot.initrd and raw.boot.initrd != "qlaunch":
        sets.append(f"boot.initrd={work / 'initrd.img'}")
    if raw.boot.dtb and not raw.boot.dtb.startswith("asset:"):
        sets.append(f"boot.dtb={cache / arch_set / 'dtbs' / Path(raw.boot.dtb).name}")
    for i, n in enumerate(raw.nets):
        if n.smb:
            d = work / "share,with,commas"
            d.mkdir(exist_ok=True)
            sets.append(f"net.{i}.smb={d}")
    for i, s in enumerate(raw.shares):
        # A comma is escaped for QEMU's 9p; virtiofsd takes none (a profile error then).
        d = work / (f"share{i},with,commas" if s.readonly else f"share{i}")
        d.mkdir(exist_ok=True)
        sets.append(f"share.{i}.path={d}")
    return sets


@pytest.mark.boot
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_qemu_accepts_golden_case(case: Case) -> None:
    with tempfile.TemporaryDirectory(prefix="qlg-", dir="/tmp") as tmp:
        work = Path(tmp)
        (work / "initrd.img").write_bytes(b"\x00" * 4096)
        sets = _real_sets(case, work)
        prof = profile.load(str(case.path), sets)
        disks = []
        for i, d in enumerate(prof.disks):
            p = work / f"disk{i},x.{d.format}"
            _make_disk(p, d.format, d.interface, d.media)
            disks.append(str(p))
        fds: dict[str, int] = {}
        keep: list[int] = []
        sup = None
        if case.entry in ("start", "restore"):
            sup, qemu_end = socket.socketpair()
            fds["monitor"] = qemu_end.detach()
            keep.append(fds["monitor"])
        if case.entry.startswith("exec"):
            for port in ("stdout", "stderr", "status"):
                r, w = os.pipe()
                fds[port] = w
                keep += [r, w]
        if case.entry == "warm-run":
            # An image that never comes: QEMU waits for it (inmigrate) until quit.
            r, w = os.pipe()
            fds["warm"] = r
            keep += [r, w]
        share = work / "share"
        share.mkdir()
        # The golden renderer with real things in place of the placeholders.
        _, plan = render(
            case,
            cache=paths.cache_dir(),
            initrd=str(work / "initrd.img"),
            disk_paths=tuple(disks),
            statedir=str(work) if case.entry in ("start", "restore") else None,
            host=NO_KVM,
            fds=fds,
            share_dir=str(share),
            sets=sets,
            data=str(work),
        )
        argv = list(plan.argv)
        qmp = work / "qmp.sock"
        if case.entry in ("start", "restore"):
            assert "-S" in argv
        elif case.entry == "warm-build":
            # The build's own monitor is the one this test talks to.
            assert f"path={qmp}," in " ".join(argv)
            argv.append("-S")
        else:
            argv += ["-S", "-qmp", f"unix:{qmp},server=on,wait=off"]
        if prof.resources.hugepages:
            # The plan's memory backend, on a tmpfs here: hugepages are a host's, not argv's.
            argv = [a.replace("mem-path=/dev/hugepages", f"mem-path={work}") for a in argv]
        # What the launch makes beside QEMU: the UEFI variable store, swtpm.
        rt_vars = next((a.split("file=")[1] for a in argv if "unit=1,file=" in a), None)
        if rt_vars:
            choice = firmware_for(prof, NO_KVM)
            assert choice is not None
            firmware.ensure_vars(choice, rt_vars.replace(",,", ","))
        helpers = contextlib.ExitStack()
        helpers.enter_context(extras.running(plan.helpers))
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=keep,
            cwd=work,
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not qmp.exists():
                if proc.poll() is not None:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    pytest.fail(f"QEMU refused {case.name}: {err.strip()}")
                assert time.monotonic() < deadline, f"no QMP socket from QEMU for {case.name}"
                time.sleep(0.05)
            with Monitor(qmp, what=case.name).connect() as mon:
                status = mon.execute("query-status")
                want = "inmigrate" if case.entry in ("restore", "warm-run") else "prelaunch"
                assert status["status"] == want, status
                blocks = mon.execute("query-block")
                assert len([b for b in blocks if b.get("inserted")]) >= len(prof.disks)
                mon.quit()
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            helpers.close()
            for fd in keep:
                os.close(fd)
            if sup is not None:
                sup.close()
