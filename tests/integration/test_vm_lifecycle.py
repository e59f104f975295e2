"""One background VM through its life as a user sees it: start, list, status, console, QMP,
pause and resume, events, logs, stop by ACPI, stop again, rm."""

from __future__ import annotations

import os
import select
import stat
import subprocess
import time
from pathlib import Path

import pytest
from vmlab import BOOT_TIMEOUT, BOOTED, QLAUNCH, jq, ok, ql, row, vmroot  # noqa: F401

from qlaunch.vm.api import VM

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
    # ... and on a terminal, where Ctrl-] detaches.
    _console_on_a_terminal("life")

    follower = subprocess.Popen(
        [*QLAUNCH, "events", "life", "--follow", "--json"], stdout=subprocess.PIPE, text=True
    )
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
    seen = _lines_until(follower, '"event":"RESUME"', count=2)  # the first, and after pause
    assert any('"event":"STOP"' in x for x in seen), seen

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

    log_follower = subprocess.Popen(
        [*QLAUNCH, "log", "life", "--follow"], stdout=subprocess.PIPE, text=True
    )
    r = ok("stop", "life")
    assert "acpi powerdown: the guest powered off" in r.stderr
    # Followers end by themselves once the VM has.
    assert follower.wait(30) == 0 and log_follower.wait(30) == 0
    assert log_follower.stdout is not None and "answer-42" in log_follower.stdout.read()
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


def test_bad_input_makes_nothing(vmroot: Path) -> None:  # noqa: F811
    for bad in ("a b", "x" * 65, "../up", "", "sémaphore"):
        r = ql("start", "default", "--name", bad)
        assert r.returncode == 2, (bad, r.stderr)
        assert "is not a VM name" in r.stderr
    r = ql("start", "no-such-profile", "--name", "fine")
    assert r.returncode == 2
    # QEMU itself refuses: its own words and exit code 4. Its log and argv stay where the
    # error says, beside a `failed` record, with nothing running; `rm` takes them away.
    r = ql("start", "default", "--name", "fine", "--set", 'qemu.extra=["-nosuchoption"]')
    assert r.returncode == 4
    assert "VM fine: qemu-system-x86_64: -nosuchoption: invalid option" in r.stderr
    assert str(vmroot / "fine") in r.stderr
    kept = {p.name for p in (vmroot / "fine").iterdir()}
    assert {"argv.json", "qemu.log", "state.json"} <= kept, kept
    assert not [k for k in kept if k.endswith(".sock")], kept
    assert "-nosuchoption" in (vmroot / "fine" / "qemu.log").read_text()
    assert [v["state"] for v in jq("list")] == ["failed"]
    ok("rm", "fine")
    # The root's vm.log keeps the line that says it was removed.
    assert [p.name for p in vmroot.iterdir() if not p.name.startswith(".")] == ["vm.log"]
    assert jq("list") == []


def test_start_with_a_command_runs_it_and_ends(vmroot: Path) -> None:  # noqa: F811
    ok("start", "default", "--name", "job", "--", "sh", "-c", "echo out-$((1 + 1)); exit 3")
    live = VM.get("job").wait(BOOT_TIMEOUT)
    assert live.state == "stopped"
    st = jq("status", "job")
    assert st["command_status"] == 3
    assert st["exits"][-1]["reason"] == "guest-shutdown"
    assert "out-2" in ok("log", "job").stdout


def _console_on_a_terminal(name: str) -> None:
    import pty

    master, slave = pty.openpty()
    p = subprocess.Popen(
        [*QLAUNCH, "console", name], stdin=slave, stdout=slave, stderr=subprocess.PIPE, text=True
    )
    os.close(slave)
    try:
        # Typing before it has put the terminal in raw mode would be flushed away.
        assert p.stderr is not None
        assert select.select([p.stderr], [], [], 30)[0]
        assert "Ctrl-] detaches" in p.stderr.readline()
        os.write(master, b"echo tty-$((3 * 3))\r")
        got = b""
        deadline = time.monotonic() + 60
        while b"tty-9" not in got and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                got += os.read(master, 4096)
        assert b"tty-9" in got, got
        os.write(master, b"\x1d")
        assert p.wait(10) == 0
        assert "detached from life" in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)


def _lines_until(p: subprocess.Popen[str], marker: str, count: int) -> list[str]:
    assert p.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    while sum(marker in x for x in lines) < count:
        assert time.monotonic() < deadline, lines
        lines.append(p.stdout.readline())
    return lines


def _qmp(name: str, *args: str) -> object:
    import json

    return json.loads(ok("qmp", name, *args).stdout)


def _events(name: str) -> list[dict[str, object]]:
    import json

    return [json.loads(line) for line in ok("events", name, "--json").stdout.splitlines()]
