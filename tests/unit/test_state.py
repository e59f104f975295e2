"""State records, names, identity checks, locks and the restart policy: no QEMU needed."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from qlaunch.errors import StateError, UsageError
from qlaunch.vm import state
from qlaunch.vm.supervisor import Supervisor


@pytest.mark.parametrize("name", ["a", "web-1", "A_b-C", "x" * 64, "0"])
def test_good_names(name: str) -> None:
    assert state.validate_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 65, "a b", "a/b", "..", ".hidden", "é", "a,b", "a\n"])
def test_bad_names(name: str) -> None:
    with pytest.raises(UsageError, match="is not a VM name"):
        state.validate_name(name)


def test_record_round_trip_and_atomic_write(tmp_path: Path) -> None:
    rec = state.Record(name="r", uuid="u", profile="default", restart_policy="always")
    rec.qemu = state.Proc(12, 34, 56.5)
    rec.exits.append(state.Exit(time=1.0, pid=12, signal=9))
    rec.nics = [{"mac": "52:54:00:00:00:01"}]
    state.write_record(tmp_path, rec)
    path = tmp_path / "state.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert state.read_record(tmp_path) == rec
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left
    # Unknown keys from a newer qlaunch are ignored, not fatal.
    data = json.loads(path.read_text())
    data["from_the_future"] = 1
    path.write_text(json.dumps(data))
    assert state.read_record(tmp_path).qemu == state.Proc(12, 34, 56.5)


def test_unreadable_and_missing_records(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="no VM named"):
        state.read_record(tmp_path / "nope")
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(StateError, match="unreadable"):
        state.read_record(tmp_path)


def test_update_is_read_modify_write(tmp_path: Path) -> None:
    state.write_record(tmp_path, state.Record(name="r", uuid="u", profile="p"))

    def bump(r: state.Record) -> None:
        r.restart_count += 1

    for _ in range(3):
        state.update(tmp_path, bump)
    assert state.read_record(tmp_path).restart_count == 3


def test_create_time_is_psutils() -> None:
    st = state.read_stat(os.getpid())
    assert st is not None and not st.zombie
    assert st.create_time == pytest.approx(psutil.Process().create_time(), abs=1.0)
    p = state.proc_of(os.getpid())
    assert p is not None and p.start_ticks == st.start_ticks


def test_identity_needs_pid_start_time_and_marker() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-uuid", "U1"])
    try:
        me = state.proc_of(child.pid)
        assert me is not None
        # Wait until the child has exec'd: its command line is then python's.
        deadline = time.monotonic() + 10
        while "-uuid" not in state.read_cmdline(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state.identify(me, state.qemu_marker("U1")) is not None
        assert state.identify(me, state.qemu_marker("U2")) is None
        older = state.Proc(me.pid, me.start_ticks - 1, me.create_time)
        assert state.identify(older, state.qemu_marker("U1")) is None
        # Nothing is sent to a process that fails the check.
        assert not state.signal_identified(older, state.qemu_marker("U1"), signal.SIGTERM)
        assert not state.signal_identified(me, state.qemu_marker("U2"), signal.SIGTERM)
        assert child.poll() is None
        assert state.signal_identified(me, state.qemu_marker("U1"), signal.SIGTERM)
        assert child.wait(10) == -signal.SIGTERM
        # Once it is gone (or a zombie), it is no longer ours to signal.
        assert state.identify(me, state.qemu_marker("U1")) is None
        assert not state.signal_identified(me, state.qemu_marker("U1"), signal.SIGTERM)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_lock_timeout_names_the_holder(tmp_path: Path) -> None:
    with state.locked("web", "start", 1.0, tmp_path):
        t0 = time.monotonic()
        with (
            pytest.raises(StateError) as e,
            state.locked("web", "stop", 0.2, tmp_path),
        ):
            pass
        assert time.monotonic() - t0 >= 0.2
        msg = e.value.message
        assert msg.startswith("VM web is busy: pid ")
        assert f"pid {os.getpid()} (start:" in msg and "has held its lock for" in msg
        # Another VM's lock is another lock.
        with state.locked("db", "stop", 0.2, tmp_path):
            pass
    with state.locked("web", "stop", 0.2, tmp_path):
        pass


def test_settle_records_an_unsupervised_end_and_runs_cleanup(tmp_path: Path) -> None:
    d = tmp_path / "vm1"
    d.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    rec = state.Record(name="vm1", uuid="u", profile="p", state=state.RUNNING)
    rec.qemu = state.Proc(gone.pid, 1, 1.0)
    marker = tmp_path / "hook-ran"
    rec.cleanup = [
        {"call": "os:mkdir", "args": [str(marker)], "what": "make a marker"},
        {"call": "no.such.module:f", "args": [], "what": "a broken hook"},
    ]
    state.write_record(d, rec)
    (d / "qmp.sock").touch()
    live = state.inspect(d)
    assert live.state == state.STOPPED and "not recorded" in (live.note or "")
    after = state.settle(d)
    assert after.state == state.STOPPED and after.note is None
    assert after.record.exits[-1].reason == "unsupervised"
    assert marker.is_dir()
    assert not (d / "qmp.sock").exists()
    assert "a broken hook" in after.record.cleanup_errors[0]
    assert "cleanup: make a marker: done" in (d / "vm.log").read_text()


def test_exit_failure_and_description() -> None:
    assert state.Exit(0, 1, signal=9).failed
    assert state.Exit(0, 1, code=1).failed
    assert state.Exit(0, 1, code=0, reason="guest-reset").failed
    assert not state.Exit(0, 1, code=0, reason="guest-shutdown").failed
    assert not state.Exit(0, 1, code=0, reason="host-qmp-quit").failed
    assert state.Exit(0, 1, signal=9).describe() == "killed by SIGKILL"
    assert state.Exit(0, 1, code=0, reason="guest-shutdown").describe() == (
        "exit code 0 (guest-shutdown)"
    )


def _sup(tmp_path: Path, policy: str, exits: list[state.Exit], stop: bool = False) -> Supervisor:
    rec = state.Record(name="s", uuid="u", profile="p", restart_policy=policy, exits=exits)
    rec.stop_requested = stop
    state.write_record(tmp_path, rec)
    return Supervisor(tmp_path, -1)


def test_restart_policy_backoff_and_crash_loop(tmp_path: Path) -> None:
    now = 1000.0
    killed = state.Exit(now, 1, signal=9)
    clean = state.Exit(now, 1, code=0, reason="guest-shutdown")
    assert _sup(tmp_path, "no", [killed]).decide(killed)[0] == state.STOPPED
    assert _sup(tmp_path, "on-failure", [clean]).decide(clean)[0] == state.STOPPED
    assert _sup(tmp_path, "always", [clean]).decide(clean)[:2] == ("restart", 0.5)
    assert _sup(tmp_path, "always", [clean], stop=True).decide(clean)[0] == state.STOPPED
    # Backoff doubles with the exits of the last minute; old ones do not count.
    old = [state.Exit(now - 120 - i, 1, signal=9) for i in range(10)]
    history = [*old, state.Exit(now - 20, 1, signal=9), state.Exit(now - 10, 1, signal=9), killed]
    assert _sup(tmp_path, "on-failure", history).decide(killed)[:2] == ("restart", 2.0)
    loop = [state.Exit(now - i, 1, signal=9) for i in range(4, 0, -1)] + [killed]
    verdict, _, why = _sup(tmp_path, "on-failure", loop).decide(killed)
    assert verdict == state.FAILED and "crash loop" in why


def test_a_format_1_record_reads_into_typed_fields() -> None:
    old = {
        "name": "web",
        "uuid": "0f2d7e4c-8a31-4d1b-9a5e-3c2b1a0f9e8d",
        "profile": "default",
        "format": 1,
        "extra": {
            "netns": "lab0",
            "nics": [{"mac": "52:54:00:00:00:01"}],
            "hotplug": [{"id": "hpdisk0", "kind": "disk"}],
            "saved": {"file": "/x.qlsave", "at": 1.0},
        },
    }
    rec = state.Record.from_json(old)
    assert rec.netns == "lab0"
    assert rec.nics == [{"mac": "52:54:00:00:00:01"}]
    assert [d["id"] for d in rec.hotplug] == ["hpdisk0"]
    assert rec.saved == {"file": "/x.qlsave", "at": 1.0}
    assert rec.format == state.FORMAT == 2
    assert "extra" not in rec.to_json()
