"""The guest agent client against a real qemu-ga, run on this host over a unix socket, and
against a VM that has the agent's channel but no agent in it.

The host's qemu-ga must never act on this machine: it runs with every command that changes
anything blocked (-b), and the fixture checks through guest-info that the block holds before
any test sends a thing. No test sends guest-shutdown or a freeze to it.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmlab import BOOT_TIMEOUT, BOOTED, jq, ok, ql, row, vmroot  # noqa: F401

from qlaunch.errors import StateError
from qlaunch.vm import agent
from qlaunch.vm.agent import Agent, AgentError, AgentUnavailable
from qlaunch.vm.api import VM

# Everything that would change this host (or read what tests do not need).
BLOCKED = [
    "guest-shutdown",
    "guest-suspend-disk",
    "guest-suspend-ram",
    "guest-suspend-hybrid",
    "guest-exec",
    "guest-file-open",
    "guest-file-write",
    "guest-set-time",
    "guest-fsfreeze-freeze",
    "guest-fsfreeze-freeze-list",
    "guest-fsfreeze-thaw",
    "guest-fstrim",
    "guest-set-user-password",
    "guest-set-vcpus",
    "guest-set-memory-blocks",
    "guest-ssh-add-authorized-keys",
    "guest-ssh-remove-authorized-keys",
    "guest-network-get-interfaces",
    # Harmless, blocked so that a test can see a refusal without touching anything else.
    "guest-get-time",
]
MUST_BE_OFF = {"guest-shutdown", "guest-fsfreeze-freeze", "guest-suspend-ram", "guest-exec"}


@pytest.fixture
def host_agent() -> Iterator[Path]:
    """A qemu-ga on this host, listening on a unix socket, dangerous commands blocked."""
    exe = shutil.which("qemu-ga") or "/usr/sbin/qemu-ga"
    if not Path(exe).exists():
        pytest.fail("qemu-ga is missing: apt-get install qemu-guest-agent (.ci/setup-host)")
    d = Path(tempfile.mkdtemp(prefix="qlga-", dir="/tmp"))
    sock = d / "qga.sock"
    proc = subprocess.Popen(
        [exe, "-m", "unix-listen", "-p", str(sock), "-b", ",".join(BLOCKED)]
        + ["-t", str(d), "-f", str(d / "qga.pid")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "qemu-ga made no socket"
            time.sleep(0.02)
        # Before anything else: the block list holds (guest-info only reads).
        with Agent(sock) as ga:
            enabled = {
                c["name"]: c["enabled"] for c in ga.execute("guest-info")["supported_commands"]
            }
        on = sorted(c for c in MUST_BE_OFF | set(BLOCKED) if enabled.get(c, False))
        assert not on, f"qemu-ga did not block {on}: refusing to test against it"
        yield sock
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)


def test_ping_info_and_round_trip(host_agent: Path) -> None:
    with Agent(host_agent, lock=host_agent.parent / "qga.lock") as ga:
        assert ga.execute("guest-ping") == {}
        info = ga.execute("guest-info")
        assert info["version"] and any(
            c["name"] == "guest-ping" for c in info["supported_commands"]
        )
        t0 = time.perf_counter()
        for _ in range(50):
            ga.execute("guest-ping")
        per = (time.perf_counter() - t0) / 50
    assert per < 0.05, per
    print(f"host qemu-ga round trip: {per * 1000:.2f} ms")


def test_refusals_carry_the_agents_words(host_agent: Path) -> None:
    with Agent(host_agent, what="VM t") as ga:
        with pytest.raises(AgentError) as e:
            ga.execute("guest-get-time")
        assert "disabled" in e.value.desc and e.value.message.startswith("VM t: guest agent:")
        with pytest.raises(AgentError) as e:
            ga.execute("guest-no-such-thing")
        assert e.value.exit_code == 2 and "guest-info" in (e.value.hint or "")
        with pytest.raises(AgentError) as e:
            ga.execute("guest-exec-status", {"pid": "not a number"})
        assert e.value.exit_code == 2
        # The session goes on after refusals.
        assert ga.execute("guest-ping") == {}


def test_sync_recovers_from_half_a_request(host_agent: Path) -> None:
    with Agent(host_agent) as ga:
        # What a client killed mid-write leaves: half an object. 0xFF makes the agent's
        # parser start over, and the sync's id skips anything answered before it.
        ga._send(b'{"execute": "guest-info", "argu', "test")
        ga.sync()
        assert ga.execute("guest-ping") == {}
        # A reply nobody read (a client that timed out) is skipped by the next sync.
        ga._send(b'{"execute": "guest-info"}\n', "test")
        ga.sync()
        assert ga.execute("guest-ping") == {}


def test_one_client_at_a_time_names_the_holder(host_agent: Path) -> None:
    lock = host_agent.parent / "qga.lock"
    with Agent(host_agent, lock=lock, what="VM t", purpose="first"):
        t0 = time.monotonic()
        with pytest.raises(StateError) as e:
            Agent(host_agent, lock=lock, what="VM t", lock_timeout=0.3).connect()
        assert time.monotonic() - t0 < 2
        assert "guest agent of VM t" in e.value.message and "first" in e.value.message


def test_no_socket_and_nobody_listening(tmp_path: Path) -> None:
    with pytest.raises(AgentUnavailable) as e:
        Agent(tmp_path / "none.sock", what="VM t").connect()
    assert "no guest agent channel" in e.value.message and e.value.exit_code == 5
    # A listener that never reads (QEMU, while the guest has not opened the port): told
    # within PORT_CHECK, not after the whole timeout.
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(tmp_path / "deaf.sock"))
    srv.listen(1)
    with srv:
        t0 = time.monotonic()
        with pytest.raises(AgentUnavailable) as e:
            Agent(tmp_path / "deaf.sock").connect(timeout=10)
        assert time.monotonic() - t0 < 2, "waited out the timeout"
        assert "not opened its port" in e.value.message


def test_parse_interfaces_drops_loopback() -> None:
    reply = [
        {"name": "lo", "ip-addresses": [{"ip-address": "127.0.0.1", "prefix": 8}]},
        {
            "name": "enp0s2",
            "hardware-address": "52:54:00:12:34:56",
            "ip-addresses": [
                {"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24},
                {"ip-address-type": "ipv6", "ip-address": "fec0::5054:ff:fe12:3456", "prefix": 64},
            ],
        },
    ]
    rows = agent.parse_interfaces(reply)
    assert [r["address"] for r in rows] == ["10.0.2.15", "fec0::5054:ff:fe12:3456"]
    assert rows[0] == {
        "address": "10.0.2.15",
        "prefix": 24,
        "family": "ipv4",
        "interface": "enp0s2",
        "mac": "52:54:00:12:34:56",
        "source": "agent",
    }


@pytest.mark.boot
def test_vm_without_an_agent_costs_little_and_stops_as_before(vmroot: Path) -> None:  # noqa: F811
    # The busybox guest has the agent's port but nothing opens it.
    ok("start", "default", "--name", "noga")
    VM.get("noga").wait_console(BOOTED, BOOT_TIMEOUT)
    t0 = time.monotonic()
    r = ql("agent", "noga", "guest-ping")
    took = time.monotonic() - t0
    assert r.returncode == 5, r.stderr
    assert "no guest agent" in r.stderr and "install qemu-guest-agent" in r.stderr
    assert took < 3, took  # PORT_CHECK, not a timeout
    st = jq("status", "noga")
    assert st["agent"] is False and st["addresses"] is None
    assert st["sockets"]["agent"].endswith("/noga/qga.sock")
    assert row("noga")["addresses"] is None
    r = ok("stop", "noga", "--json")
    steps = [s["action"] for s in json.loads(r.stdout)["steps"]]
    assert steps[0] == "acpi powerdown", steps  # no agent step at all
    assert "agent shutdown: skipped" in ok("log", "noga", "--lifecycle").stdout


def test_stop_mode_is_checked(vmroot: Path) -> None:  # noqa: F811
    r = ql("stop", "nosuch", "--mode", "agent,bogus")
    assert r.returncode == 2 and "bogus" in r.stderr, r.stderr
