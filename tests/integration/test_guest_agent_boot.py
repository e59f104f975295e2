"""A real Debian 12 guest (qlaunch image build: qemu-guest-agent, cloud-init, openssh-server),
booted once under TCG for the whole module: the guest agent, its addresses in status and
list, `qlaunch ssh`, snapshots frozen and thawed, a stop through the agent that keeps what
was written, and a second boot on the same disk.

The ssh key is found the way users rely on: its .pub is in the profile's [cloud-init]
ssh_authorized_keys, and the key pair sits beside the profile (no -i).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from debimage import debian_image, overlay
from vmlab import QLAUNCH, jq, ok, ql, reap_all, row

from qlaunch.vm.agent import Agent

pytestmark = [pytest.mark.boot, pytest.mark.slow]

SSH_WAIT = "600"  # TCG on two shared cores: a full Debian boot takes 20-90 s here


@dataclass
class Guest:
    name: str
    profile: Path
    dir: Path
    port: int  # the host end of the forward to guest port 22
    booted_in: float  # seconds from `qlaunch start` to the first ssh command that worked


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _boot(g: Guest) -> float:
    t0 = time.monotonic()
    ok("start", str(g.profile), "--name", g.name)
    r = ql("ssh", g.name, "--wait", SSH_WAIT, "--", "uname", "-m", timeout=900)
    assert r.returncode == 0, (
        f"ssh -> {r.returncode}: {r.stderr}\n{ok('log', g.name).stdout[-3000:]}"
    )
    assert r.stdout.strip() == "x86_64"
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    base = debian_image("x86_64", "bios")
    work = Path(tempfile.mkdtemp(prefix="qlga-", dir="/tmp"))
    root = work / "state"
    # Module scope runs before the per-test environment (conftest): set all of it here.
    env = {"QLAUNCH_STATE": root, "QLAUNCH_DATA": work / "data", "QLAUNCH_CONFIG": work / "config"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        disk = overlay(base, work / "disk.qcow2")
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "qlaunch-test",
                "-f",
                str(work / "id"),
            ],
            check=True,
        )
        pub = (work / "id.pub").read_text().strip()
        port = _free_port()
        profile = work / "deb.toml"
        profile.write_text(
            f"""\
[machine]
arch = "x86_64"
memory = "1G"
smp = 2
[[disk]]
path = "{disk}"
[[net]]
mode = "user"
forward = ["tcp:127.0.0.1:{port}-:22"]
[cloud-init]
hostname = "agenttest"
ssh_authorized_keys = [{json.dumps(pub)}]
"""
        )
        g = Guest("deb", profile, root / "deb", port, 0.0)
        g.booted_in = _boot(g)
        print(f"\nboot to ssh: {g.booted_in:.1f} s")
        yield g
    finally:
        reap_all(root)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(work, ignore_errors=True)


def _agent_up(name: str, timeout: float = 120) -> None:
    """qemu-guest-agent starts with the port's device, around when sshd does."""
    deadline = time.monotonic() + timeout
    while True:
        r = ql("agent", name, "guest-ping")
        if r.returncode == 0:
            return
        assert r.returncode == 5, r.stderr
        assert time.monotonic() < deadline, f"no agent within {timeout} s: {r.stderr}"
        time.sleep(1)


def test_agent_answers(guest: Guest) -> None:
    _agent_up(guest.name)
    assert json.loads(ok("agent", guest.name, "guest-ping").stdout) == {}
    info = json.loads(ok("agent", guest.name, "guest-info").stdout)
    assert any(c["name"] == "guest-shutdown" and c["enabled"] for c in info["supported_commands"])
    host = json.loads(ok("agent", guest.name, "guest-get-host-name").stdout)
    assert host == {"host-name": "agenttest"}
    r = ql("agent", guest.name, "guest-no-such-command")
    assert r.returncode == 2 and "has not been found" in r.stderr, r.stderr
    # Round trips over one session, for the record.
    with Agent(guest.dir / "qga.sock", lock=guest.dir / "qga.lock") as ga:
        t0 = time.perf_counter()
        for _ in range(20):
            assert ga.execute("guest-ping") == {}
        print(f"\nguest agent round trip (TCG): {(time.perf_counter() - t0) / 20 * 1000:.1f} ms")


def test_stale_client_leaves_nothing_behind(guest: Guest) -> None:
    _agent_up(guest.name)
    # A client that sent a command and half of another, then went away without reading:
    # the agent answers into the channel and waits for the rest of the half object.
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(guest.dir / "qga.sock"))
    s.sendall(b'{"execute": "guest-info"}\n{"execute": "guest-get-osinfo", "argu')
    time.sleep(1)
    s.close()
    assert json.loads(ok("agent", guest.name, "guest-ping").stdout) == {}
    os_info = json.loads(ok("agent", guest.name, "guest-get-osinfo").stdout)
    assert os_info["id"] == "debian"


def test_addresses_in_status_and_list(guest: Guest) -> None:
    _agent_up(guest.name)
    deadline = time.monotonic() + 60
    while True:
        st = jq("status", guest.name)
        if st["addresses"]:
            break
        assert time.monotonic() < deadline, st
        time.sleep(2)
    assert st["agent"] is True
    found = {a["address"]: a for a in st["addresses"]}
    assert "10.0.2.15" in found, found  # QEMU's user network gives the first guest this one
    a = found["10.0.2.15"]
    assert a["prefix"] == 24 and a["family"] == "ipv4" and a["source"] == "agent"
    assert not any(x.startswith("127.") or x == "::1" for x in found)
    text = ok("status", guest.name).stdout
    assert re.search(r"^agent: +answering$", text, re.M) and "10.0.2.15/24" in text
    # list asks the agent it has seen (cached for a few seconds).
    assert "10.0.2.15" in {a["address"] for a in row(guest.name)["addresses"]}
    t0 = time.perf_counter()
    ok("list", "--json")
    print(f"\nlist --json with one agent VM (cached): {(time.perf_counter() - t0) * 1000:.0f} ms")
    time.sleep(6)  # past the cache: list asks the agent again
    t0 = time.perf_counter()
    assert "10.0.2.15" in {a["address"] for a in row(guest.name)["addresses"]}
    print(f"list --json asking the agent: {(time.perf_counter() - t0) * 1000:.0f} ms")


def test_ssh_passes_the_exit_status_and_runs_through_the_remote_shell(guest: Guest) -> None:
    r = ql("ssh", guest.name, "--", "exit", "7")
    assert r.returncode == 7, r.stderr
    r = ql("ssh", guest.name, "--", "echo $((6 * 7)) | tr 4 x")
    assert r.returncode == 0 and r.stdout.strip() == "x2", (r.stdout, r.stderr)
    # Host keys went to the VM's own known_hosts (hashed or not, as ssh_config says).
    r = subprocess.run(
        ["ssh-keygen", "-F", f"[127.0.0.1]:{guest.port}", "-f", str(guest.dir / "known_hosts")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "ssh-ed25519" in r.stdout, r
    r = ql("ssh", guest.name, "--user", "nobody-here", "--", "true")
    assert r.returncode == 255 and "Permission denied" in r.stderr, r.stderr


def test_interactive_shell_on_a_terminal(guest: Guest) -> None:
    # script(1) gives qlaunch a terminal: ssh gets one too and runs a login shell.
    r = subprocess.run(
        ["script", "-qec", f"{QLAUNCH[0]} ssh {guest.name}", "/dev/null"],
        input="tty; echo shell-$((40 + 2)); exit 3\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "shell-42" in r.stdout and "/dev/pts/" in r.stdout, r.stdout


def test_snapshot_freezes_and_thaws(guest: Guest) -> None:
    _agent_up(guest.name)
    r = ok("snapshot", guest.name, "create", "frozen1")
    assert "guest file systems frozen (" in r.stderr and "guest file systems thawed (" in r.stderr
    status = json.loads(ok("agent", guest.name, "guest-fsfreeze-status").stdout)
    assert status == "thawed"
    ok("ssh", guest.name, "--", "touch", "/home/debian/after-snapshot")  # writes work
    r = ok("snapshot", guest.name, "revert", "frozen1")
    assert "thawed" in r.stderr and "taken frozen" in r.stderr, r.stderr
    assert json.loads(ok("agent", guest.name, "guest-fsfreeze-status").stdout) == "thawed"
    r = ql(
        "ssh",
        guest.name,
        "--wait",
        "60",
        "--",
        "test ! -e /home/debian/after-snapshot && touch /home/debian/x",
    )
    assert r.returncode == 0, r.stderr
    ok("snapshot", guest.name, "delete", "frozen1")


def test_stop_goes_through_the_agent_and_keeps_what_was_written(guest: Guest) -> None:
    _agent_up(guest.name)
    # No sync: a clean shutdown writes it; pulling the plug right away might not.
    ok("ssh", guest.name, "--", "echo written-before-stop > /home/debian/mark")
    r = ok("stop", guest.name, "--json")
    report = json.loads(r.stdout)
    assert report["steps"][0]["action"] == "agent shutdown", report
    assert report["steps"][0]["result"] == "the guest powered off", report
    assert "qlaunch: deb: agent shutdown: the guest powered off" in r.stderr
    assert report["exit"]["reason"] == "guest-shutdown", report
    assert row(guest.name)["state"] == "stopped"
    # The next boot on the same disk, a new state directory (so a new known_hosts).
    secs = _boot(guest)
    print(f"\nsecond boot to ssh: {secs:.1f} s")
    r = ok("ssh", guest.name, "--", "cat", "/home/debian/mark")
    assert r.stdout.strip() == "written-before-stop"
    r = ok("stop", guest.name)
    assert "agent shutdown: the guest powered off" in r.stderr
