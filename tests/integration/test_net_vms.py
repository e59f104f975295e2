"""VMs on qlaunch networks, in namespaces the tests make: real QEMU (TCG), dnsmasq, nftables.

Topology: the VMs' namespace holds the network's bridge, dnsmasq and QEMU; an "upstream"
namespace beyond a veth pair (198.51.100.1 here, .2 there) runs a TCP server that answers with
the source address it sees. No packet leaves the namespaces.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab import Guest, boot, namespace, nft_rules, rules_naming, upstream_of, wait_until
from vmlab import BOOT_TIMEOUT, BOOTED, QLAUNCH, jq, ok, reap_all, row

from qlaunch.names import stable_mac
from qlaunch.net import dhcp, netns, runtime
from qlaunch.vm import state

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


@pytest.fixture
def bglab(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A namespace and a state root (short: socket paths) for background VMs; every
    supervisor and QEMU recorded there is ended before the namespace goes."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces and taps need root")
    root = Path(tempfile.mkdtemp(prefix="qlnet-", dir="/tmp"))
    monkeypatch.setenv("QLAUNCH_STATE", str(root))
    try:
        with namespace("qlt", root) as ns:
            try:
                yield ns, root
            finally:
                reap_all(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# Typed on a VM's console. The quotes keep the echo of the typed line from matching.
CONSOLE_PROBE = (
    "ping -c 2 -W 2 10.77.0.1 >/dev/null && echo GW_'OK'; "
    "for i in 1 2 3 4 5; do ping -c 1 -W 2 {peer} >/dev/null && break; done && echo PEER_'OK'; "
    "nc -w 5 198.51.100.2 7777 </dev/null; echo PROBE_'DONE'\n"
)
LAN = ["--set", "net.0.mode=network", "--set", "net.0.network=lan"]


def leftovers(ns: str, vm: str, mac: str, tap: str) -> list[str]:
    """What of VM is still on network lan in NS: its tap, dnsmasq's static lease, name or
    lease for its MAC, its record. (nftables rules belong to the network, not the VM: they
    name its bridge and uplink, and go with the network.)"""
    rundir = runtime.run_dir(ns, "lan")
    found = []
    if tap in tap_names(ns):
        found.append(f"tap {tap}")
    found += [f"hosts entry {h.line()}" for h in dhcp.read_hosts(rundir) if h.mac == mac]
    found += [f"lease {x.ip}" for x in dhcp.leases(rundir) if x.mac == mac]
    if runtime.vm_record(rundir, vm).exists():
        found.append("attachment record")
    return found


def booted(name: str) -> bool:
    return BOOTED in ok("log", name).stdout


def test_background_vms_on_a_nat_network(run_cli, bglab: tuple[str, Path]) -> None:  # type: ignore[no-untyped-def]
    """`qlaunch start --netns` (and $QLAUNCH_NETNS): two VMs get leases and reach each other,
    the gateway and, through NAT, an upstream host; every later command finds them without
    the flag; and after kill -9 of QEMU, kill -9 of the supervisor, and `stop`, nothing of
    the VM stays with the network."""
    ns, root = bglab
    assert run_cli("net", "create", "lan", "--subnet", "10.77.0.0/24")[0] == 0
    with upstream_of(ns, root) as up:
        ok("start", "default", "--name", "vma", "--netns", ns, *LAN, "--set", "net.0.ip=10.77.0.10")
        r = subprocess.run(
            [*QLAUNCH, "start", "default", "--name", "vmb", *LAN],
            env={**os.environ, "QLAUNCH_NETNS": ns},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        wait_until(lambda: booted("vma") and booted("vmb"), BOOT_TIMEOUT, "both VMs to boot")

        # Taps in the namespace only, named per VM; status shows namespace and lease.
        assert tap_names(ns) == {"qt-vma-0", "qt-vmb-0"}
        assert (
            "qt-vma-0"
            not in subprocess.run(["ip", "-o", "link"], capture_output=True).stdout.decode()
        )
        st = {n: jq("status", n) for n in ("vma", "vmb")}
        for n in ("vma", "vmb"):
            assert st[n]["state"] == "running" and st[n]["netns"] == ns
            nic = st[n]["nics"][0]
            assert (nic["network"], nic["tap"], nic["mac"]) == (
                "lan",
                f"qt-{n}-0",
                stable_mac(n, 0),
            )
        assert st["vma"]["nics"][0]["lease"] == "10.77.0.10"
        b_ip = st["vmb"]["nics"][0]["lease"]
        assert b_ip and int(b_ip.rsplit(".", 1)[1]) >= 128  # from the dynamic pool
        assert "nic 0:      network lan, tap qt-vma-0" in ok("status", "vma").stdout
        assert {r["name"]: r["state"] for r in jq("list")} == {"vma": "running", "vmb": "running"}
        # QMP sees the NIC with the MAC qlaunch recorded.
        filt = json.loads(ok("qmp", "vma", "query-rx-filter").stdout)
        assert [f["main-mac"] for f in filt] == [stable_mac("vma", 0)]

        # Through the console: gateway, the peer (b finds a by name), and the upstream host.
        ok("console", "vma", input=CONSOLE_PROBE.format(peer=b_ip))
        ok("console", "vmb", input=CONSOLE_PROBE.format(peer="vma"))
        wait_until(
            lambda: all("PROBE_DONE" in ok("log", n).stdout for n in ("vma", "vmb")),
            90,
            "the console probes",
        )
        for n in ("vma", "vmb"):
            out = ok("log", n).stdout
            assert "GW_OK" in out and "PEER_OK" in out, out[-2000:]
            # NAT: the upstream host sees the namespace's address, not the VM's.
            assert "seen-as 198.51.100.1" in out, out[-2000:]
        assert up.seen == ["198.51.100.1", "198.51.100.1"]

    code, _, err = run_cli("net", "delete", "lan")
    assert code == 5 and f"network lan is in use by VMs: vma, vmb (netns {ns})" in err
    mac_a = stable_mac("vma", 0)
    assert leftovers(ns, "vma", mac_a, "qt-vma-0") == [
        "tap qt-vma-0",
        f"hosts entry {mac_a},10.77.0.10,vma",
        "lease 10.77.0.10",
        "attachment record",
    ]

    # 1. kill -9 of QEMU: its supervisor cleans up.
    ok("kill", "vma")
    wait_until(lambda: row("vma")["state"] == "stopped", 30, "vma to stop")
    wait_until(
        lambda: not leftovers(ns, "vma", stable_mac("vma", 0), "qt-vma-0"), 10, "vma's cleanup"
    )
    life = ok("log", "vma", "--lifecycle").stdout
    assert re.search(r"supervisor\[\d+\]: cleanup: release the VM's NICs: done", life), life

    # 2. kill -9 of the supervisor: QEMU runs on with its tap; `stop` cleans up.
    sup = row("vmb")["supervisor_pid"]
    sup_proc = state.proc_of(sup)
    assert sup_proc is not None
    os.kill(sup, signal.SIGKILL)
    assert state.wait_gone(sup, sup_proc.start_ticks, 10)
    assert row("vmb")["state"] == "running" and "qt-vmb-0" in tap_names(ns)
    r = ok("stop", "vmb", "--force")
    assert "recorded the exit from /proc" in r.stderr
    wait_until(
        lambda: not leftovers(ns, "vmb", stable_mac("vmb", 0), "qt-vmb-0"), 10, "vmb's cleanup"
    )
    life = ok("log", "vmb", "--lifecycle").stdout
    assert re.search(r"qlaunch\[\d+\]: cleanup: release the VM's NICs: done", life), life

    # 3. `qlaunch stop`: the same name, tap and address again, then an ACPI stop.
    ok("rm", "vma", "vmb")
    ok("start", "default", "--name", "vma", "--netns", ns, *LAN, "--set", "net.0.ip=10.77.0.10")
    wait_until(lambda: booted("vma"), BOOT_TIMEOUT, "vma to boot again")
    assert jq("status", "vma")["nics"][0]["lease"] == "10.77.0.10"
    r = ok("stop", "vma")
    assert "acpi powerdown: the guest powered off" in r.stderr
    wait_until(
        lambda: not leftovers(ns, "vma", stable_mac("vma", 0), "qt-vma-0"), 10, "vma's cleanup"
    )
    assert tap_names(ns) == set()
    ok("rm", "vma")

    # Nothing for gc; the network is free to go.
    code, out, _ = run_cli("net", "gc", "--json", "--netns", ns)
    assert code == 0 and json.loads(out)["vms_released"] == []
    assert len(rules_naming(ns, "ql-lan")) >= 4  # forward jumps and the bridge's own rules
    assert run_cli("net", "delete", "lan")[0] == 0
    assert not runtime.run_dir(ns, "lan").exists()
    assert nft_rules(ns) == []  # the NAT chain's rules too, which name no interface


def test_run_with_route_mode_and_an_isolated_nic(  # type: ignore[no-untyped-def]
    run_cli, qlaunch_bin: list[str], lab: tuple[str, Path]
) -> None:
    """`qlaunch run` in a namespace ($QLAUNCH_NETNS), one VM with two NICs: a dynamic lease on
    a routed network and one on an isolated network."""
    ns, work = lab
    code, _, err = run_cli(
        "net", "create", "lab", "--subnet", "10.78.0.0/24", "--mode", "route", "--uplink", "up0"
    )
    assert code == 0, err
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
    # Route mode forwards only between the bridge and the uplink, both ways.
    uplink = rules_naming(ns, "up0")
    assert len(uplink) == 2 and all('"ql-lab"' in r for r in uplink), uplink
    assert rules_naming(ns, "ql-quiet")
    for net in ("lab", "quiet"):
        assert run_cli("net", "delete", net, "--netns", ns)[0] == 0
    assert nft_rules(ns) == []


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
    assert rules_naming(ns, "ql-lan")
    assert run_cli("net", "delete", "lan", "--netns", ns)[0] == 0
    assert not rundir.exists()
    assert nft_rules(ns) == []
