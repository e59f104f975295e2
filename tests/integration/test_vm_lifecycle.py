"""One background VM through its life as a user sees it: start, list, status, console, QMP,
pause and resume, events, logs, stop by ACPI, stop again, rm."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from vmlab import BOOT_TIMEOUT, BOOTED, jq, ok, ql, row, vmroot  # noqa: F401

from qlaunch.vm import VM

pytestmark = pytest.mark.boot


def test_start_list_status_console_pause_stop(vmroot: Path) -> None:  # noqa: F811
    r = ok("start", "default", "--name", "life")
    assert r.stdout.strip() == "life"

    # The state directory and what is in it are the user's alone.
    d = vmroot / "life"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for f in ("state.json", "argv.json", "profile.json", "qemu.log", "console.log"):
        assert stat.S_IMODE((d / f).stat().st_mode) == 0o600, f

    listed = ok("list").stdout.splitlines()
    assert listed[0].split() == [
        "NAME", "STATE", "PID", "UPTIME", "CPU%", "RSS", "RESTARTS", "PROFILE",
    ]  # fmt: skip
    assert listed[1].split()[:2] == ["life", "running"]
    info = row("life")
    assert info["state"] == "running" and info["restarts"] == 0 and info["profile"] == "default"
    assert isinstance(info["pid"], int) and info["rss"] > 0

    st = jq("status", "life")
    assert st["state"] == "running"
    assert st["qmp"]["status"] == "running"
    assert st["qemu_version"].split(".")[0].isdigit()
    assert Path(st["sockets"]["qmp"]).is_socket() and Path(st["sockets"]["console"]).is_socket()
    assert st["supervisor"]["alive"] is True
    assert "qmp status: running" in ok("status", "life").stdout

    # The console, through the Python API over the same state.
    vm = VM.get("life")
    vm.console.expect(BOOTED, BOOT_TIMEOUT)
    vm.console.sendline("echo answer-$((6 * 7))")
    vm.console.expect(r"answer-42")
    vm.close()
    # ... and through the CLI, with stdin a pipe.
    out = ok("console", "life", input="echo via-cli-$((2 + 3))\n").stdout
    assert "via-cli-5" in out

    ok("pause", "life")
    assert _qmp("life", "query-status")["status"] == "paused"
    assert row("life")["state"] == "paused"
    ok("resume", "life")
    assert _qmp("life", "query-status")["status"] == "running"
    assert row("life")["state"] == "running"
    events = [e["event"] for e in _events("life")]
    last = {e: i for i, e in enumerate(events)}
    assert last["STOP"] < last["RESUME"], events
    assert "STOP" in ok("events", "life").stdout

    # Arguments, errors and the HMP passthrough.
    hmp = _qmp("life", "human-monitor-command", '{"command-line": "info version"}')
    assert hmp.strip().split(".")[0].isdigit()
    bad = ql("qmp", "life", "no-such-command")
    assert bad.returncode == 4 and "CommandNotFound" in bad.stderr
    bad = ql("qmp", "life", "query-status", "[1]")
    assert bad.returncode == 2 and "JSON object" in bad.stderr

    assert "answer-42" in ok("log", "life").stdout
    assert "start: profile default" in ok("log", "life", "--lifecycle").stdout

    # Not while it runs.
    r = ql("rm", "life")
    assert r.returncode == 5 and "is running" in r.stderr

    r = ok("stop", "life")
    assert "acpi powerdown: the guest powered off" in r.stderr
    info = row("life")
    assert info["state"] == "stopped" and info["pid"] is None
    last = jq("status", "life")["exits"][-1]
    assert last["code"] == 0 and last["reason"] == "guest-shutdown"
    assert not (d / "qmp.sock").exists() and not (d / "console.sock").exists()

    r = ok("stop", "life")
    assert "already stopped" in r.stderr

    ok("rm", "life")
    assert jq("list") == []
    r = ql("status", "life")
    assert r.returncode == 5 and "no VM named life" in r.stderr


def test_bad_names_make_nothing(vmroot: Path) -> None:  # noqa: F811
    for bad in ("a b", "x" * 65, "../up", "", "sémaphore"):
        r = ql("start", "default", "--name", bad)
        assert r.returncode == 2, (bad, r.stderr)
        assert "is not a VM name" in r.stderr
    r = ql("start", "no-such-profile", "--name", "fine")
    assert r.returncode == 2
    assert [p.name for p in vmroot.iterdir() if not p.name.startswith(".")] == []


def _qmp(name: str, *args: str) -> object:
    import json

    return json.loads(ok("qmp", name, *args).stdout)


def _events(name: str) -> list[dict[str, object]]:
    import json

    return [json.loads(line) for line in ok("events", name, "--json").stdout.splitlines()]
