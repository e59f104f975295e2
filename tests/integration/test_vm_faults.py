"""Fault injection: a killed supervisor, a stale pidfile naming someone else's process, stale
socket files, and two starts of one name at once."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from vmlab import QLAUNCH, alive, jq, ok, ql, row, vmroot  # noqa: F401

from qlaunch.errors import StateError
from qlaunch.vm import state
from qlaunch.vm.api import VM

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


def _holds_open(pid: int, path: Path) -> bool:
    """Whether process pid has path open (a start waiting for the VM's lock has)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return True
    return False


def _qemus_of(name: str) -> list[str]:
    """The QEMU processes (by executable: not a wrapper holding QEMU's arguments) of VM name."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or f"guest={name}," not in " ".join(state.read_cmdline(int(p))):
            continue
        with contextlib.suppress(OSError):
            if os.path.basename(os.readlink(f"/proc/{p}/exe")).startswith("qemu-system"):
                out.append(p)
    return out


def test_double_start_exactly_one_wins(vmroot: Path) -> None:  # noqa: F811
    """Two starts of one name, made to meet at the VM's lock: the test holds it until both
    wait there, then lets go. One starts the VM; the other gets the lock after and is
    refused, naming the live VM."""
    lock = vmroot / ".locks" / "twin.lock"
    with state.locked("twin", "test: hold both starts", base=vmroot):
        procs = [
            subprocess.Popen(
                [*QLAUNCH, "start", "default", "--name", "twin", "--paused"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=dict(os.environ),
            )
            for _ in range(2)
        ]
        deadline = time.monotonic() + 60
        while not all(_holds_open(p.pid, lock) for p in procs):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "the starts never reached the lock"
            time.sleep(0.02)
    results = [(p.wait(120), *p.communicate()) for p in procs]
    assert sorted(r[0] for r in results) == [0, 5], results
    loser = next(r for r in results if r[0] == 5)
    qemus = _qemus_of("twin")
    assert len(qemus) == 1, qemus  # one VM, one QEMU
    assert f"VM twin is already paused (pid {qemus[0]})" in loser[2], loser
    assert [r["name"] for r in jq("list")] == ["twin"]
    ok("stop", "twin", "--force")


def test_a_start_that_meets_the_lock_names_its_holder(vmroot: Path, tmp_path: Path) -> None:  # noqa: F811
    """A start that finds another start of the same name holding the VM's lock gives up after
    its lock timeout, naming that start (pid, purpose, command), and disturbs nothing. The
    first start is held inside its lock deterministically: its QEMU binary is a wrapper that
    waits for the test's word before it execs the real QEMU."""
    go = tmp_path / "go"
    wrapper = tmp_path / "slow-qemu"
    real = shutil.which("qemu-system-x86_64")
    assert real is not None
    wrapper.write_text(
        "#!/bin/sh\n"
        f"i=0; while [ ! -e {go} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i + 1)); done\n"
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    first = subprocess.Popen(
        [*QLAUNCH, "start", "default", "--name", "twin", "--paused"]
        + ["--set", f"qemu.binary={wrapper}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        lock = vmroot / ".locks" / "twin.lock"
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError, ValueError):
                holder = json.loads(lock.read_text() or "{}")
                if holder.get("pid") == first.pid:
                    break
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first start never took the lock"
            time.sleep(0.02)
        assert holder["purpose"] == "start"

        with pytest.raises(StateError) as e:
            VM.start("default", name="twin", paused=True, lock_timeout=1.0)
        msg = e.value.message
        assert msg.startswith(f"VM twin is busy: pid {first.pid} (start: "), msg
        assert "start default --name twin --paused" in msg and "has held its lock for" in msg
        assert first.poll() is None and _qemus_of("twin") == []
    finally:
        go.touch()
    out, err = first.communicate(timeout=120)
    assert (first.returncode, out.strip()) == (0, "twin"), err
    assert len(_qemus_of("twin")) == 1
    assert row("twin")["state"] == "paused"
    ok("stop", "twin", "--force")
