"""`qlaunch --connect ssh://...`: the commands of background VMs on another host, through a real
sshd in a network namespace with its own qlaunch state (sshlab); the errors of ssh itself as
one line and exit 3; and the Python API's Host. One VM for the module."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sshlab import Host, Lab, close_masters
from vmlab import BOOT_TIMEOUT, BOOTED, QLAUNCH

import qlaunch
from qlaunch.errors import StateError
from qlaunch.vm.api import VM

pytestmark = pytest.mark.boot


def ql(
    *args: str, input: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*QLAUNCH, *args], capture_output=True, text=True, input=input, timeout=timeout
    )


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qlaunch: error: "), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    return lines[0]


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Lab, Host, Path]]:
    """Host a, and this side's own state root (where the ssh control sockets live)."""
    local = Path(tempfile.mkdtemp(prefix="qlvm-", dir="/tmp"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLAUNCH_STATE", str(local))
        mp.delenv("QLAUNCH_CONNECT", raising=False)
        try:
            with Lab() as lab:
                yield lab, lab.host("a"), local
        finally:
            close_masters(local)
            shutil.rmtree(local, ignore_errors=True)


def master_pid(local: Path) -> int:
    (sock,) = [p for p in (local / ".ssh").iterdir() if p.is_socket()]
    r = subprocess.run(
        ["ssh", "-o", f"ControlPath={sock}", "-O", "check", "x"], capture_output=True, text=True
    )
    m = re.search(r"pid=(\d+)", r.stderr)
    assert m, r.stderr
    return int(m.group(1))


def test_ssh_failures_are_one_line_and_exit_3(lab: tuple[Lab, Host, Path]) -> None:
    lb, a, local = lab
    other = lb.root / "other-key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    empty = lb.root / "empty-known-hosts"
    empty.touch()
    cases = {
        "refused the key": a.uri_at(a.address, keyfile=str(other)),
        "is not known here": a.uri_at(a.address, known_hosts=str(empty)),
        "cannot reach": a.uri_at(f"{a.address}:2"),
        "has no qlaunch: qlaunch is not on its PATH": a.uri_at(a.address, command=None),
        "has no qlaunch: /nonexistent/qlaunch is not an executable there": a.uri_at(
            a.address, command="/nonexistent/qlaunch"
        ),
    }
    for needle, uri in cases.items():
        r = ql("--connect", uri, "list")
        line = one_error_line(r)
        assert r.returncode == 3 and needle in line, (needle, r.stderr)
        assert "(hint: " in line
    # The same from the environment; a bad URI is bad input.
    env = dict(os.environ, QLAUNCH_CONNECT=a.uri_at(f"{a.address}:2"))
    r = subprocess.run([*QLAUNCH, "list"], capture_output=True, text=True, env=env)
    assert r.returncode == 3 and "cannot reach" in one_error_line(r)
    for bad in ("http://host", "ssh://", f"ssh://{a.address}?colour=red", "ssh://-oProxyCommand=x"):
        r = ql("--connect", bad, "list")
        assert r.returncode == 2, (bad, r.stderr)
        one_error_line(r)
    assert not any((a.state).iterdir()), "nothing may have been made there"


@pytest.fixture(scope="module")
def web(lab: tuple[Lab, Host, Path]) -> Iterator[VM]:
    """VM web on host a, started from a profile of this side (--local-profile)."""
    lb, a, _ = lab
    prof = lb.root / "here" / "web.toml"
    prof.parent.mkdir()
    prof.write_text('extends = "default"\ndescription = "sent along"\n[machine]\nmemory = "200M"\n')
    cwd = os.getcwd()
    os.chdir(prof.parent)
    try:
        r = ql(
            "--connect", a.uri, "--local-profile", "web.toml", "start", "web.toml", "--name", "web"
        )
    finally:
        os.chdir(cwd)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "web\n"
    vm = VM("web", a.state)  # host a's state directory, as its own qlaunch keeps it
    vm.console.expect(BOOTED, BOOT_TIMEOUT)
    vm.close()
    yield vm


def test_commands_run_there_with_their_output_and_codes(
    lab: tuple[Lab, Host, Path], web: VM
) -> None:
    _, a, local = lab
    rows = json.loads(ql("--connect", a.uri, "list", "--json").stdout)
    assert [(r["name"], r["state"], r["profile"]) for r in rows] == [("web", "running", "web")]
    assert not (local / "web").exists(), "the VM is there, not here"
    # The same answer as ssh and qlaunch there give (the remote qlaunch's output is the output).
    direct = subprocess.run(
        [
            "ssh",
            "-i",
            str(lab[0].key),
            "-o",
            f"UserKnownHostsFile={lab[0].known_hosts}",
            "-o",
            "BatchMode=yes",
            f"root@{a.address}",
            QLAUNCH[0],
            "list",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert [r["name"] for r in json.loads(direct.stdout)] == ["web"]
    st = json.loads(ql("--connect", a.uri, "status", "web", "--json").stdout)
    assert st["state"] == "running" and st["uuid"] == web.record().uuid
    assert st["dir"] == str(a.state / "web")
    reply = json.loads(ql("--connect", a.uri, "qmp", "web", "query-status").stdout)
    assert reply["status"] == "running"
    # Errors and exit codes are the remote qlaunch's own, one line as here.
    r = ql("--connect", a.uri, "status", "nosuch")
    assert r.returncode == 5 and "no VM named nosuch" in one_error_line(r)
    r = ql("--connect", a.uri, "start", "no-such-profile")
    assert r.returncode == 2
    # A second command within the minute goes through the same ssh connection.
    pid = master_pid(local)
    t0 = time.monotonic()
    assert ql("--connect", a.uri, "list").returncode == 0
    warm = time.monotonic() - t0
    assert master_pid(local) == pid
    print(f"warm list over the master: {warm:.3f} s")
    # The log, and the console with stdin from a pipe.
    assert BOOTED in ql("--connect", a.uri, "log", "web").stdout
    r = ql("--connect", a.uri, "console", "web", "--linger", "2", input="echo over-$((6*7))-ssh\n")
    assert r.returncode == 0 and "over-42-ssh" in r.stdout, r.stdout[-500:]


def test_console_on_a_terminal_detaches_with_ctrl_bracket(
    lab: tuple[Lab, Host, Path], web: VM
) -> None:
    _, a, _ = lab
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(QLAUNCH[0], [*QLAUNCH, "--connect", a.uri, "console", "web"])
    seen = b""

    def until(pattern: bytes, timeout: float = 60) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while pattern not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{pattern!r} not seen: {seen[-800:]!r}"
            r, _, _ = select.select([fd], [], [], left)
            if r:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break

    try:
        until(b"Ctrl-] detaches")
        # ~. is ssh's escape to hang up; with qlaunch it reaches the guest like any text.
        os.write(fd, b"echo tty-$((6*7)) ~.\r")
        until(b"tty-42 ~.")
        os.write(fd, b"\x1d")
        until(b"detached from web")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        with_suppress_kill(pid)
        os.close(fd)
    assert web.live().alive


def with_suppress_kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def test_events_follow_streams_through_ssh(lab: tuple[Lab, Host, Path], web: VM) -> None:
    _, a, _ = lab
    proc = subprocess.Popen(
        [*QLAUNCH, "--connect", a.uri, "events", "web", "--follow", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        time.sleep(1.0)  # it has printed the recorded events and follows
        assert ql("--connect", a.uri, "pause", "web").returncode == 0
        assert ql("--connect", a.uri, "resume", "web").returncode == 0
        names: list[str] = []
        deadline = time.monotonic() + 30

        def seen() -> bool:
            return "STOP" in names and "RESUME" in names[names.index("STOP") :]

        buf = b""
        while not seen() and time.monotonic() < deadline:
            r, _, _ = select.select([proc.stdout], [], [], 1.0)
            if r:
                chunk = os.read(proc.stdout.fileno(), 65536)
                assert chunk, proc.stderr.read() if proc.stderr else ""
                *lines, buf = (buf + chunk).split(b"\n")
                names += [json.loads(line)["event"] for line in lines]
        assert seen(), names
    finally:
        proc.terminate()
        proc.wait(10)


def test_python_host_api(lab: tuple[Lab, Host, Path], web: VM) -> None:
    _, a, _ = lab
    host = qlaunch.Host(a.uri)
    assert [r["name"] for r in host.list()] == ["web"]
    vm = host.vm("web")
    assert vm.state == "running"
    assert vm.qmp("query-status")["status"] == "running"
    assert vm.qmp("qom-get", path="/machine", property="type").startswith("pc-q35")
    with pytest.raises(StateError, match="no VM named nosuch"):
        host.vm("nosuch").status()
    assert any(e["event"] == "RESUME" for e in vm.events())
    report = vm.stop(force=True)
    assert report["state"] == "stopped"
    vm.remove()
    assert host.list() == []
    assert not (a.state / "web").exists()
