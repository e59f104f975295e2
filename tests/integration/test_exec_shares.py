"""Shares over virtiofs on real kernels under TCG: writes seen both ways while the guest runs,
through the guest's sync; virtiofsd gone with the run, also when qlaunch is killed with
SIGKILL; a background VM's [[share]] through its supervisor. The Debian cloud kernel has
virtiofs (as a module) and no 9p, so a share that works on it is virtiofs.

The fallback to 9p, with the line that says why, is in test_exec_boot.py (its kernel tree
has 9p and no virtiofs)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from vmlab import BOOT_TIMEOUT, QLAUNCH, jq, ok, vmroot  # noqa: F401

from qlaunch.vm.api import VM

pytestmark = pytest.mark.boot

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
needs_virtiofs = pytest.mark.skipif(
    not os.access(VIRTIOFSD, os.X_OK) or os.geteuid() != 0,
    reason="virtiofs needs /usr/lib/qemu/virtiofsd and root",
)


def processes_naming(text: str) -> list[str]:
    """The command lines of the live processes whose arguments mention text."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        line = " ".join(a.decode(errors="replace") for a in args if a)
        if text in line and Path(f"/proc/{pid}/stat").exists():
            try:
                if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                    continue
            except OSError:
                continue
            found.append(line)
    return found


def wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# The guest's half of the conversation: read what the host wrote before the boot, write, tell
# the host it may answer, wait for the answer (a file the host writes while the guest runs),
# sync, write once more after the sync, and show how the share is mounted.
GUEST = """
cat before.txt
echo written-by-the-guest > from-guest.txt
echo ready > ready.txt
n=0
until [ -e answer.txt ]; do
    n=$((n + 1)); [ $n -lt 1200 ] || { echo no answer >&2; exit 9; }
    sleep 0.1
done
cat answer.txt
sync
echo after-sync > after-sync.txt
grep " $PWD " /proc/mounts | cut -d' ' -f3
"""


@needs_virtiofs
def test_virtiofs_share_sees_writes_both_ways_and_survives_sync(
    qlaunch_bin: list[str], tmp_path: Path
) -> None:
    share = tmp_path / "share dir"  # a space: the path goes to virtiofsd and the kernel intact
    share.mkdir()
    (share / "before.txt").write_text("written-by-the-host\n")
    proc = subprocess.Popen(
        [*qlaunch_bin, "exec", "--kernel", "asset:x86_64", "--share", f"{share}:/work", "--"]
        + ["sh", "-c", GUEST],
        cwd=share,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: (share / "ready.txt").exists() or proc.poll() is not None, 240, "ready")
        assert (share / "from-guest.txt").read_text() == "written-by-the-guest\n"
        (share / "answer.txt").write_text("written-by-the-host-while-the-guest-runs\n")
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.splitlines() == [
        "written-by-the-host",
        "written-by-the-host-while-the-guest-runs",
        "virtiofs",
    ]
    assert (share / "after-sync.txt").read_text() == "after-sync\n"
    assert "9p" not in err  # no fallback note
    assert processes_naming(str(share)) == []


@needs_virtiofs
def test_sigkill_of_qlaunch_leaves_no_virtiofsd(qlaunch_bin: list[str], tmp_path: Path) -> None:
    share = tmp_path / "killed"
    share.mkdir()
    proc = subprocess.Popen(
        [*qlaunch_bin, "exec", "--kernel", "asset:x86_64", "--share", str(share), "--"]
        + ["sh", "-c", "echo up > up.txt; sleep 600"],
        cwd=share,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: (share / "up.txt").exists() or proc.poll() is not None, 240, "the guest")
        helpers = [p for p in processes_naming(str(share)) if p.startswith(VIRTIOFSD)]
        assert helpers, "no virtiofsd while the guest runs"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # QEMU goes (its parent-death signal), and virtiofsd with it and with its own.
        wait_for(lambda: processes_naming(str(share)) == [], 20, "virtiofsd and QEMU to end")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_virtiofs
def test_background_vm_mounts_its_profile_share(vmroot: Path, tmp_path: Path) -> None:  # noqa: F811
    share = tmp_path / "bg"
    share.mkdir()
    (share / "in.txt").write_text("from-the-host\n")
    prof = tmp_path / "shared.toml"
    prof.write_text(f'extends = "default"\n[[share]]\npath = "{share}"\nguest = "/data"\n')
    cmd = "cat /data/in.txt; echo from-the-guest > /data/out.txt; grep ' /data ' /proc/mounts"
    ok("start", str(prof), "--name", "sh1", "--", "sh", "-c", cmd)
    assert VM.get("sh1").wait(BOOT_TIMEOUT).state == "stopped"
    st = jq("status", "sh1")
    assert st["command_status"] == 0
    log = ok("log", "sh1").stdout
    assert "from-the-host" in log and "virtiofs" in log
    assert (share / "out.txt").read_text() == "from-the-guest\n"
    # The supervisor started virtiofsd before QEMU and reaped it after.
    assert processes_naming(str(share)) == []
    ok("rm", "sh1")
    assert QLAUNCH  # the CLI the helpers above run
