"""Issue 17 on a running VM: what a VM holds is never overwritten (--force or not), and a
refused command leaves the VM as it was (running, not paused in postmigrate)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from vmlab import ok, ql, vmroot  # noqa: F401

pytestmark = pytest.mark.boot


def digest(p: Path) -> tuple[int, int, str]:
    st = p.stat()
    return st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()


def refused(r: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr


def runstate(name: str) -> str:
    return str(json.loads(ok("qmp", name, "query-status").stdout)["status"])


def test_files_a_running_vm_holds_and_its_run_state(vmroot: Path, tmp_path: Path) -> None:  # noqa: F811
    disk = tmp_path / "raw1.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "16M"], check=True)
    ok("start", "default", "--name", "t1", "--set", f"disk.0.path={disk}")
    before = digest(disk)
    user_data = tmp_path / "user-data"
    user_data.write_text("#cloud-config\n")

    # Before: exit 0, and the disk became the save file (which could not be restored either).
    refused(ql("save", "--force", "t1", str(disk)), 5, f"{disk} is a disk of VM t1")
    refused(ql("seed", str(disk), "--user-data", str(user_data), "--force"), 5, "disk of VM t1")
    assert digest(disk) == before
    assert runstate("t1") == "running"

    # Before: a traceback, and the VM left in postmigrate, neither saved nor running.
    refused(ql("save", "--force", "t1", f"{tmp_path}/"), 2, "is a directory")
    assert runstate("t1") == "running"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw1.img", "user-data"]

    # Before: a traceback (pidfd_send_signal: EINVAL) and exit 4 for the timeout.
    refused(ql("kill", "t1", "--signal", "999"), 2, "not a signal")
    refused(ql("qmp", "t1", "query-status", "--timeout", "0"), 2, "more than 0")
    assert runstate("t1") == "running"

    ok("stop", "--force", "--", "t1")
    ok("rm", "t1")
    assert not (vmroot / "t1").exists()
    assert not (vmroot / ".locks" / "t1.lock").exists()
