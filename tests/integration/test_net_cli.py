"""`qlaunch net ...` inside namespaces the tests make: no QEMU, real nft and dnsmasq."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab import ip, namespace, nft_rules, rules_naming

from qlaunch.net import netns

pytestmark = pytest.mark.net


@pytest.fixture
def ns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    state = tmp_path / "state"
    monkeypatch.setenv("QLAUNCH_STATE", str(state))
    with namespace("qlt", state) as name:
        monkeypatch.setenv("QLAUNCH_NETNS", name)
        yield name


def in_ns(name: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", name, *argv], capture_output=True, text=True, check=True
    ).stdout


def links_of(name: str) -> list[str]:
    out = in_ns(name, "ip", "-o", "link", "show")
    return [line.split(": ")[1].split("@")[0] for line in out.splitlines()]


def dnsmasq_pids(state: Path) -> list[int]:
    import psutil

    return [
        p.pid
        for p in psutil.process_iter(["name", "cmdline"])
        if p.info["name"] == "dnsmasq" and any(str(state) in a for a in p.info["cmdline"] or [])
    ]


def test_lifecycle_in_a_namespace(run_cli, ns: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "state"
    # An uplink that need not exist: rules name interfaces, and these must all go.
    code, out, err = run_cli("net", "create", "lan", "--subnet", "10.77.0.0/24", "--uplink", "eth9")
    assert (code, out) == (0, "lan\n"), err
    assert run_cli("net", "create", "iso", "--subnet", "10.79.0.0/24", "--mode", "isolated")[0] == 0
    code, out, _ = run_cli("net", "list", "--json")
    assert [(r["name"], r["state"]) for r in json.loads(out)] == [("iso", "down"), ("lan", "down")]

    code, _, err = run_cli("net", "start", "lan")
    assert code == 0 and "network lan is up" in err
    code, _, err = run_cli("net", "start", "lan")
    assert code == 0 and "was already up" in err
    assert run_cli("net", "start", "iso", "--netns", ns)[0] == 0

    assert {"ql-lan", "ql-iso"} <= set(links_of(ns))
    assert "10.77.0.1/24" in in_ns(ns, "ip", "-o", "addr", "show", "ql-lan")
    assert in_ns(ns, "sysctl", "-n", "net.ipv4.ip_forward").strip() == "1"
    rules = in_ns(ns, "nft", "list", "table", "inet", "qlaunch")
    assert "chain fwd-lan" in rules and "chain nat-lan" in rules and "chain fwd-iso" in rules
    assert len(rules_naming(ns, "ql-lan")) == 7  # 2 jumps, 5 in fwd-lan
    assert len(rules_naming(ns, "eth9")) == 2  # out through the uplink only, and masquerade
    assert len(dnsmasq_pids(state)) == 2
    # Nothing of this leaked into the caller's own namespace.
    assert (
        "ql-lan" not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    )

    code, out, _ = run_cli("net", "show", "lan", "--json")
    shown = json.loads(out)
    assert shown["state"] == "up" and shown["netns"] == ns
    assert shown["gateway"] == "10.77.0.1" and shown["dnsmasq_pid"] in dnsmasq_pids(state)

    # A dead dnsmasq makes the network "broken"; gc takes it down the rest of the way.
    os.kill(shown["dnsmasq_pid"], 9)
    code, out, _ = run_cli("net", "list", "--json")
    assert {r["name"]: r["state"] for r in json.loads(out)}["lan"] == "broken"
    code, out, _ = run_cli("net", "gc", "--json")
    assert json.loads(out)["networks_taken_down"] == ["lan"]
    assert "ql-lan" not in links_of(ns)
    assert rules_naming(ns, "ql-lan", "eth9") == [] and rules_naming(ns, "ql-iso")

    # start after stop: a fresh dnsmasq, and the old one is never left running.
    assert run_cli("net", "start", "lan")[0] == 0
    first = dnsmasq_pids(state)
    assert run_cli("net", "stop", "lan")[0] == 0
    assert run_cli("net", "start", "lan")[0] == 0
    assert len(dnsmasq_pids(state)) == 2 and set(first) != set(dnsmasq_pids(state))

    # Runtime state lost (a wiped state directory): gc finds our dnsmasq and bridge anyway.
    import shutil

    shutil.rmtree(state / ".networks" / ns / "lan")
    code, out, _ = run_cli("net", "gc", "--json")
    report = json.loads(out)
    assert report["networks_taken_down"] == ["lan"] and len(report["dnsmasq_killed"]) == 1
    assert "ql-lan" not in links_of(ns)
    assert rules_naming(ns, "ql-lan", "eth9") == [] and rules_naming(ns, "ql-iso")
    assert len(dnsmasq_pids(state)) == 1  # iso's

    assert run_cli("net", "start", "lan")[0] == 0
    assert run_cli("net", "stop", "lan")[0] == 0
    code, _, err = run_cli("net", "stop", "lan")
    assert code == 0 and "was not up" in err
    assert run_cli("net", "delete", "iso")[0] == 0
    assert "ql-iso" not in links_of(ns)
    assert dnsmasq_pids(state) == []
    assert nft_rules(ns) == []  # the last network gone: so is the table
    code, out, _ = run_cli("net", "list", "--json")
    assert [r["name"] for r in json.loads(out)] == ["lan"]


def assert_nothing_left(ns: str, state: Path) -> None:
    assert links_of(ns) == ["lo"]
    assert dnsmasq_pids(state) == []
    assert nft_rules(ns) == []
    assert not (state / ".networks" / ns / "lan").exists()


def test_failures_halfway_roll_back(run_cli, ns: str, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "state"
    assert run_cli("net", "create", "lan", "--subnet", "10.77.0.0/24")[0] == 0

    # dnsmasq missing: bridge and rules were made, and are undone.
    from qlaunch.net import dhcp

    monkeypatch.setattr(dhcp, "DNSMASQ", "/nonexistent/dnsmasq")
    code, _, err = run_cli("net", "start", "lan")
    assert code == 3
    assert "dnsmasq is not installed" in err and "nothing of network lan was left behind" in err
    assert_nothing_left(ns, state)
    monkeypatch.setattr(dhcp, "DNSMASQ", "dnsmasq")

    # dnsmasq cannot bind: something else has the gateway's DNS port.
    ip("-n", ns, "link", "add", "squat0", "type", "bridge")
    ip("-n", ns, "addr", "add", "10.77.0.1/32", "dev", "squat0")
    code, _, err = run_cli("net", "start", "lan")
    assert code == 5 and "address 10.77.0.1 is in use on squat0" in err
    ip("-n", ns, "link", "del", "squat0")
    assert_nothing_left(ns, state)

    with netns.entered(ns):
        squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        squatter.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: the address is not there yet
        squatter.bind(("10.77.0.1", 53))
        squatter.listen()
    try:
        code, _, err = run_cli("net", "start", "lan")
    finally:
        squatter.close()
    assert code == 3 and "dnsmasq for network lan did not start" in err
    assert "Address already in use" in err
    assert_nothing_left(ns, state)

    # Name clash: an interface of someone else's has the bridge's name.
    ip("-n", ns, "link", "add", "ql-lan", "type", "bridge")
    code, _, err = run_cli("net", "start", "lan")
    assert code == 5 and "interface ql-lan exists" in err
    assert links_of(ns) == ["lo", "ql-lan"]  # theirs, untouched
    ip("-n", ns, "link", "del", "ql-lan")

    # And after all that, it starts.
    assert run_cli("net", "start", "lan")[0] == 0
    assert run_cli("net", "delete", "lan")[0] == 0
    assert_nothing_left(ns, state)


def test_bad_input_is_refused(run_cli, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("QLAUNCH_STATE", str(tmp_path / "state"))
    code, _, err = run_cli("net", "create", "lan", "--subnet", "10.77.0.0/33")
    assert code == 2 and "--subnet '10.77.0.0/33'" in err
    code, _, err = run_cli("net", "start", "nope")
    assert code == 5 and "no network 'nope'" in err
    code, _, err = run_cli("net", "list", "--netns", "no/such")
    assert code == 2 and "not a network namespace name" in err
    code, _, err = run_cli("net", "list", "--netns", "qlaunch-no-such-ns")
    assert code == 3 and "no network namespace 'qlaunch-no-such-ns'" in err
    assert not (tmp_path / "config" / "networks" / "lan.toml").exists()
    # A start in a namespace that does not exist makes nothing.
    code, _, err = run_cli("start", "default", "--name", "x", "--netns", "qlaunch-no-such-ns")
    assert code == 3 and "no network namespace 'qlaunch-no-such-ns'" in err
    assert not (tmp_path / "state" / "x").exists()
    code, _, err = run_cli("start", "default", "--name", "x", "--netns", "no/such")
    assert code == 2 and "not a network namespace name" in err


def test_taps_on_a_host_bridge_and_their_rollback(run_cli, ns: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Bridge mode: taps join an existing bridge; the fd is the tap's life; a failure on the
    second NIC leaves nothing of the first."""
    from qlaunch.config import profile
    from qlaunch.errors import StateError
    from qlaunch.net import attach

    ip("-n", ns, "link", "add", "br0", "type", "bridge")
    assert run_cli("net", "create", "hostlan", "--mode", "bridge", "--bridge", "br0")[0] == 0
    prof = profile.load("default", ["net.0.mode=network", "net.0.network=hostlan"])
    nics = attach.prepare_nics(prof, "vm_b", ns)
    try:
        assert nics.taps == (f"fd={nics.fds[0]}",)
        assert nics.append == ("qlaunch.dhcp",)
        rec = nics.record[0]
        assert (rec["tap"], rec["bridge"], rec["mac"]) == ("qt-vm_b-0", "br0", rec["mac"])
        assert rec["mac"].startswith("52:54:00:")
        shown = in_ns(ns, "ip", "-d", "link", "show", "qt-vm_b-0")
        assert "master br0" in shown and "alias qlaunch vm=vm_b nic=0" in shown
        assert "fe:" + rec["mac"][3:] in shown
    finally:
        nics.close_fds()
    assert "qt-vm_b-0" not in links_of(ns)
    # Our own bridge network was never made: br0 is the user's and stays.
    assert "br0" in links_of(ns)

    prof = profile.load(
        "default",
        ["net.0.mode=bridge", "net.0.bridge=br0", "net.1.mode=bridge", "net.1.bridge=nobr"],
    )
    with pytest.raises(StateError, match="bridge nobr does not exist here"):
        attach.prepare_nics(prof, "vm_c", ns)
    assert sorted(links_of(ns)) == ["br0", "lo"]


def test_gc_after_the_namespace_was_deleted(run_cli, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`ip netns del` takes the bridge along but not dnsmasq, which keeps the namespace alive,
    unnamed: `net gc` ends it and forgets the namespace's state."""
    import uuid

    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    state = tmp_path / "state"
    monkeypatch.setenv("QLAUNCH_STATE", str(state))
    name = f"qlt-{uuid.uuid4().hex[:6]}"
    ip("netns", "add", name)
    try:
        assert run_cli("net", "create", "lan", "--subnet", "10.77.0.0/24")[0] == 0
        assert run_cli("net", "start", "lan", "--netns", name)[0] == 0
        pids = dnsmasq_pids(state)
        assert len(pids) == 1
    finally:
        ip("netns", "del", name)
    try:
        code, out, err = run_cli("net", "gc", "--json")
        assert code == 0, err
        report = json.loads(out)
        assert report["networks_taken_down"] == [f"lan (deleted netns {name})"]
        assert report["dnsmasq_killed"] == pids
        assert dnsmasq_pids(state) == []
        assert not (state / ".networks" / name).exists()
        code, out, _ = run_cli("net", "gc")
        assert (code, out) == (0, "nothing to collect\n")
    finally:
        for pid in dnsmasq_pids(state):
            os.kill(pid, 9)
