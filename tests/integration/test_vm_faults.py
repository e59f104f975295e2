"""Fault injection: a killed supervisor, a stale pidfile naming someone else's process, stale
socket files, and two starts of one name at once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from vmlab import QLAUNCH, alive, jq, ok, ql, row, vmroot  # noqa: F401

from qlaunch.vm import state

pytestmark = pytest.mark.boot


def test_supervisor_killed_leaves_qemu_controllable(vmroot: Path) -> None:  # noqa: F811
    ok("start", "default", "--name", "orphan", "--paused")
    before = row("orphan")
    qemu, sup = before["pid"], before["supervisor_pid"]
    sup_proc = state.proc_of(sup)
    assert sup_proc is not None
    os.kill(sup, signal.SIGKILL)
    assert state.wait_gone(sup, sup_proc.start_ticks, 10)

    r = ok("list")
    assert "its supervisor is gone" in r.stderr
    after = row("orphan")
    assert after["pid"] == qemu and after["state"] == "paused" and after["supervisor_pid"] is None
    assert alive(qemu)
    st = jq("status", "orphan")
    assert st["supervisor"] == {"pid": sup, "alive": False}
    assert st["qmp"]["status"] == "prelaunch"
    ok("resume", "orphan")
    assert row("orphan")["state"] == "running"
    assert jq("status", "orphan")["qmp"]["status"] == "running"

    r = ok("stop", "orphan", "--force")
    assert "qmp quit: QEMU quit" in r.stderr
    assert "recorded the exit from /proc" in r.stderr
    assert not alive(qemu)
    st = jq("status", "orphan")
    assert st["state"] == "stopped"
    assert st["exits"][-1]["pid"] == qemu and st["exits"][-1]["reason"] == "unsupervised"
    assert not (vmroot / "orphan" / "qmp.sock").exists()


def _fake_vm(root: Path, name: str, qemu: state.Proc | None, sup: state.Proc | None) -> None:
    d = root / name
    d.mkdir(mode=0o700)
    rec = state.Record(
        name=name, uuid=str(uuid.uuid4()), profile="default", state="running", qemu=qemu
    )
    rec.supervisor = sup
    state.write_record(d, rec)


def test_stale_pidfile_never_signals_a_stranger(vmroot: Path) -> None:  # noqa: F811
    stranger = subprocess.Popen(["sleep", "300"])
    try:
        me = state.proc_of(stranger.pid)
        assert me is not None
        # Right pid, right start time, but not our QEMU (no uuid): as after a reboot and reuse.
        _fake_vm(vmroot, "ghost", me, me)
        # Right pid, wrong start time.
        wrong = state.Proc(stranger.pid, me.start_ticks - 1, me.create_time - 0.01)
        _fake_vm(vmroot, "ghost2", wrong, None)
        for name in ("ghost", "ghost2"):
            info = row(name)
            assert info["state"] == "stopped" and info["pid"] is None
            r = ql("kill", name, "--signal", "TERM")
            assert r.returncode == 5 and "is not running" in r.stderr
            assert "already stopped" in ok("stop", name, "--force").stderr
            assert jq("status", name)["state"] == "stopped"
            ok("rm", name)
        time.sleep(0.2)
        assert stranger.poll() is None, "the unrelated process was signalled"
    finally:
        stranger.kill()
        stranger.wait()


def test_stale_sockets_do_not_block_a_start(vmroot: Path) -> None:  # noqa: F811
    # What a VM whose QEMU and supervisor were SIGKILLed leaves: a record that says running,
    # a dead pid, and socket files nobody listens on.
    dead = subprocess.Popen(["true"])
    dead.wait()
    _fake_vm(vmroot, "phoenix", state.Proc(dead.pid, 1, 1.0), None)
    for name in ("qmp.sock", "console.sock"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(vmroot / "phoenix" / name))
        s.close()
    assert row("phoenix")["state"] == "stopped"
    ok("start", "default", "--name", "phoenix", "--paused")
    assert jq("status", "phoenix")["qmp"]["status"] == "prelaunch"
    ok("stop", "phoenix", "--force")


def test_double_start_exactly_one_wins(vmroot: Path) -> None:  # noqa: F811
    env = dict(os.environ)
    procs = [
        subprocess.Popen(
            [*QLAUNCH, "start", "default", "--name", "twin", "--paused"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    results = [(p.wait(120), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 5], results
    loser = next(r for r in results if r[0] == 5)
    assert "VM twin is already paused" in loser[2] or "VM twin is busy" in loser[2], loser
    # One VM, one QEMU, one supervisor.
    assert [r["name"] for r in jq("list")] == ["twin"]
    qemus = [
        p
        for p in os.listdir("/proc")
        if p.isdigit() and "guest=twin," in " ".join(state.read_cmdline(int(p)))
    ]
    assert len(qemus) == 1
    ok("stop", "twin", "--force")
