"""VMs on qlaunch networks, in namespaces the tests make: real QEMU (TCG), dnsmasq, nftables.

Topology: the VMs' namespace holds the network's bridge, dnsmasq and QEMU; an "upstream"
namespace beyond a veth pair (198.51.100.1 here, .2 there) runs a TCP server that answers with
the source address it sees. No packet leaves the namespaces.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab import Guest, boot, namespace, upstream_of, wait_until

from qlaunch.argv import stable_mac
from qlaunch.net import attach, dhcp, netns, runtime

pytestmark = [pytest.mark.net, pytest.mark.boot]

PROBE = """
ip -4 -o addr show eth0
ping -c 2 -W 2 {gw} >/dev/null && echo GATEWAY_OK
for i in $(seq 60); do ping -c 1 -W 1 {peer} >/dev/null 2>&1 && {{ echo PEER_OK; break; }}; done
nc -w 5 198.51.100.2 7777 </dev/null || echo UPSTREAM_FAILED
sleep {linger}
"""


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces and taps need root")
    state = tmp_path / "state"
    monkeypatch.setenv("QLAUNCH_STATE", str(state))
    with namespace("qlt", state) as ns:
        yield ns, tmp_path


def net_show(run_cli, ns: str, name: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    code, out, err = run_cli("net", "show", name, "--json", "--netns", ns)
    assert code == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


def tap_names(ns: str) -> set[str]:
    from qlaunch.net import links

    with netns.entered(ns), links.iproute() as ipr:
        return runtime.live_taps(ipr)


def test_two_vms_on_a_nat_network(run_cli, lab: tuple[str, Path]) -> None:  # type: ignore[no-untyped-def]
    ns, work = lab
    assert run_cli("net", "create", "lan", "--subnet", "10.77.0.0/24")[0] == 0
    with upstream_of(ns, work / "state") as up:
        # Static leases; b finds a by its name.
        a = boot(
            "vma",
            ns,
            work,
            ["net.0.mode=network", "net.0.network=lan", "net.0.ip=10.77.0.10"],
            PROBE.format(gw="10.77.0.1", peer="10.77.0.11", linger=4),
        )
        b = boot(
            "vmb",
            ns,
            work,
            ["net.0.mode=network", "net.0.network=lan", "net.0.ip=10.77.0.11"],
            # By name: dnsmasq answers for the VMs it knows.
            PROBE.format(gw="10.77.0.1", peer="vma", linger=4),
        )
        macs = {g.name: g.nics.record[0]["mac"] for g in (a, b)}
        assert {g.name: g.nics.record[0]["tap"] for g in (a, b)} == {
            "vma": "qt-vma-0",
            "vmb": "qt-vmb-0",
        }
        assert tap_names(ns) == {"qt-vma-0", "qt-vmb-0"}
        shown = net_show(run_cli, ns, "lan")
        assert shown["vms"] == ["vma", "vmb"]
        consoles = {g.name: g.wait() for g in (a, b)}
    for name, ip in (("vma", "10.77.0.10"), ("vmb", "10.77.0.11")):
        out = consoles[name]
        assert f"inet {ip}/24" in out, out[-2000:]
        assert "GATEWAY_OK" in out and "PEER_OK" in out, out[-2000:]
        # NAT: the upstream host sees the namespace's address, not the VM's.
        assert "seen-as 198.51.100.1" in out, out[-2000:]
        assert "QLAUNCH_EXIT=0" in out
    assert up.seen == ["198.51.100.1", "198.51.100.1"]

    # Both leases were dnsmasq's, for the stable MACs; the taps went with QEMU.
    leases = {x["mac"]: x["ip"] for x in net_show(run_cli, ns, "lan")["leases"]}
    assert leases == {macs["vma"]: "10.77.0.10", macs["vmb"]: "10.77.0.11"}
    assert tap_names(ns) == set()
    assert net_show(run_cli, ns, "lan")["vms"] == []
    # What the supervisor does when a VM ends: nothing of the VM stays with dnsmasq.
    for g in (a, b):
        assert [x["vm"] for x in attach.release_nics(g.name, ns)] == [g.name]
    rundir = runtime.run_dir(ns, "lan")
    try:
        wait_until(lambda: dhcp.leases(rundir) == [], 5, "the leases to be released")
    except AssertionError:
        print((rundir / "dnsmasq.log").read_text())
        raise
    assert dhcp.read_hosts(rundir) == []
    assert net_show(run_cli, ns, "lan")["attachments"] == []


def test_run_with_route_mode_and_an_isolated_nic(  # type: ignore[no-untyped-def]
    run_cli, qlaunch_bin: list[str], lab: tuple[str, Path]
) -> None:
    """`qlaunch run` in a namespace ($QLAUNCH_NETNS), one VM with two NICs: a dynamic lease on
    a routed network and one on an isolated network."""
    ns, work = lab
    assert run_cli("net", "create", "lab", "--subnet", "10.78.0.0/24", "--mode", "route")[0] == 0
    code, _, err = run_cli(
        "net", "create", "quiet", "--subnet", "10.79.0.0/24", "--mode", "isolated"
    )
    assert code == 0, err
    script = """
ip -4 -o addr show eth0; ip -4 -o addr show eth1; ip route
ping -c 1 -W 2 10.79.0.1 >/dev/null && echo ISOLATED_GATEWAY_OK
nc -w 5 198.51.100.2 7777 </dev/null || echo ROUTED_FAILED
ip route add 198.51.100.2/32 via 10.79.0.1 dev eth1
nc -w 5 198.51.100.2 7777 </dev/null || echo ISOLATED_BLOCKED
"""
    sets = ["net.0.mode=network", "net.0.network=lab", "net.1.mode=network", "net.1.network=quiet"]
    argv = [*qlaunch_bin, "run", "default"]
    for s in sets:
        argv += ["--set", s]
    env = {**os.environ, "QLAUNCH_NETNS": ns}
    with upstream_of(ns, work / "state", route_back="10.78.0.0/24") as up:
        r = subprocess.run(
            [*argv, "--", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=180
        )
    out = r.stdout
    assert r.returncode == 0, out[-2000:] + r.stderr[-2000:]
    m = re.search(r"eth0\s+inet (10\.78\.0\.\d+)/24", out)
    assert m, out[-2000:]
    vm_ip = m.group(1)
    assert int(vm_ip.rsplit(".", 1)[1]) >= 128  # from the dynamic pool
    assert re.search(r"eth1\s+inet 10\.79\.0\.\d+/24", out), out[-2000:]
    # Only the routed network offers a default route.
    routes = out.split("ISOLATED_GATEWAY_OK")[0]
    assert "default via 10.78.0.1 dev eth0" in routes and "via 10.79.0.1" not in routes
    assert "ISOLATED_GATEWAY_OK" in out
    # Route mode: no masquerade, the upstream sees the VM's own address.
    assert f"seen-as {vm_ip}" in out and "ROUTED_FAILED" not in out
    assert "ISOLATED_BLOCKED" in out
    assert up.seen == [vm_ip]
    # dnsmasq leased it to the VM's stable MAC; once run is over nothing of the VM stays.
    mac = stable_mac("default", 0)
    log = (runtime.run_dir(ns, "lab") / "dnsmasq.log").read_text()
    assert f"DHCPACK(ql-lab) {vm_ip} {mac}" in log
    shown = net_show(run_cli, ns, "lab")
    assert (shown["leases"], shown["attachments"], shown["vms"]) == ([], [], [])
    assert tap_names(ns) == set()


def test_in_use_network_and_kill_9(run_cli, lab: tuple[str, Path]) -> None:  # type: ignore[no-untyped-def]
    ns, work = lab
    assert run_cli("net", "create", "lan", "--subnet", "10.77.0.0/24")[0] == 0
    g: Guest = boot("vmk", ns, work, ["net.0.mode=network", "net.0.network=lan"], None)
    rundir = runtime.run_dir(ns, "lan")
    mac = g.nics.record[0]["mac"]
    lease = runtime.wait_for_lease(rundir, mac, 90)
    assert lease is not None, g.console()[-2000:]

    code, _, err = run_cli("net", "delete", "lan", "--netns", ns)
    assert code == 5 and "network lan is in use by VMs: vmk" in err
    code, _, err = run_cli("net", "stop", "lan", "--netns", ns)
    assert code == 5 and "in use by vmk" in err
    # A second VM of the same name cannot take its tap.
    code_err = None
    try:
        boot("vmk", ns, work, ["net.0.mode=network", "net.0.network=lan"], None)
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        code_err = str(e)
    assert code_err and "tap qt-vmk-0 exists already (held by VM vmk)" in code_err

    g.kill9()
    # The kernel removed the tap with QEMU's last fd.
    assert tap_names(ns) == set()
    code, out, _ = run_cli("net", "gc", "--json", "--netns", ns)
    assert json.loads(out)["vms_released"] == ["vmk"]
    wait_until(lambda: dhcp.leases(rundir) == [], 5, "the lease to be released")
    assert dhcp.read_hosts(rundir) == []
    assert run_cli("net", "delete", "lan", "--netns", ns)[0] == 0
    assert not rundir.exists()
