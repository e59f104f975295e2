"""Networking parts that need no root: definitions, the nft ruleset, names, dnsmasq files."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlaunch.errors import StateError, UsageError
from qlaunch.net import definitions, dhcp, links, nat
from qlaunch.net.attach import hostname_of


def test_definition_round_trip_and_defaults() -> None:
    net = definitions.make("lan", subnet="10.77.0.0/24")
    definitions.create(net)
    back = definitions.load("lan")
    assert back == net
    assert (back.mode, back.bridge, str(back.gateway), back.dhcp) == (
        "nat",
        "ql-lan",
        "10.77.0.1",
        True,
    )
    assert [str(a) for a in back.dhcp_range()] == ["10.77.0.128", "10.77.0.254"]
    assert [n.name for n in definitions.all_networks()] == ["lan"]
    definitions.remove("lan")
    with pytest.raises(StateError, match="no network 'lan'"):
        definitions.load("lan")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "bad name", "subnet": "10.0.0.0/24"}, "not a network name"),
        ({"name": "x", "subnet": "10.0.0.1/24"}, "has host bits set"),
        ({"name": "x", "subnet": "8.8.8.0/24"}, "not a private range"),
        ({"name": "x", "subnet": "10.0.0.0/30"}, "too small"),
        ({"name": "x", "subnet": "fd00::/64"}, "only IPv4"),
        ({"name": "x"}, "needs a subnet"),
        ({"name": "x", "mode": "bridge"}, "existing host bridge"),
        ({"name": "x", "mode": "bridge", "bridge": "br0", "subnet": "10.0.0.0/24"}, "no --subnet"),
        ({"name": "x", "mode": "isolated", "subnet": "10.0.0.0/24", "uplink": "eth0"}, "uplink"),
        ({"name": "x", "subnet": "10.0.0.0/24", "bridge": "a-very-long-bridge"}, "15 characters"),
        ({"name": "x", "mode": "wifi", "subnet": "10.0.0.0/24"}, "not one of"),
    ],
)
def test_bad_definitions_are_refused(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        definitions.make(**kwargs)  # type: ignore[arg-type]


def test_clashes_are_refused_and_nothing_is_written() -> None:
    definitions.create(definitions.make("lan", subnet="10.77.0.0/24"))
    with pytest.raises(StateError, match="exists"):
        definitions.create(definitions.make("lan", subnet="10.99.0.0/24"))
    with pytest.raises(StateError, match="overlaps network 'lan'"):
        definitions.create(definitions.make("lan2", subnet="10.77.0.0/16"))
    with pytest.raises(StateError, match="already uses bridge ql-lan"):
        definitions.create(definitions.make("b", subnet="10.78.0.0/24", bridge="ql-lan"))
    assert [n.name for n in definitions.all_networks()] == ["lan"]


def test_long_names_fit_the_kernel_limit() -> None:
    assert definitions.default_bridge("lan") == "ql-lan"
    long_br = definitions.default_bridge("a-rather-long-network")
    assert len(long_br) <= 15
    assert long_br != definitions.default_bridge("a-rather-long-network2")
    assert links.tap_name("web", 0) == "qt-web-0"
    t1, t2 = links.tap_name("webserver-alpha", 3), links.tap_name("webserver-beta", 3)
    assert len(t1) <= 15 and len(t2) <= 15 and t1 != t2
    assert links.parse_alias(links.tap_alias("vm_1", 2)) == ("vm_1", 2)
    assert links.parse_alias("something else") is None
    assert hostname_of("my_vm", 0) == "my-vm"
    assert hostname_of("my_vm", 1) == "my-vm-nic1"


def test_ruleset_has_a_chain_pair_per_network() -> None:
    lan = definitions.make("lan", subnet="10.77.0.0/24")
    lab = definitions.make("lab", mode="route", subnet="10.78.0.0/24", uplink="eth0")
    iso = definitions.make("iso", mode="isolated", subnet="10.79.0.0/24")
    text = nat.ruleset([lan, lab, iso])
    assert text.startswith("table inet qlaunch {}\ndelete table inet qlaunch\n")
    assert "ip saddr 10.77.0.0/24 ip daddr != 10.77.0.0/24 jump nat-lan" in text
    assert "\t\tmasquerade" in text
    # route mode forwards both ways through its uplink without NAT; isolated only rejects.
    assert 'iifname "ql-lab" ip saddr 10.78.0.0/24 oifname "eth0" accept' in text
    assert 'oifname "ql-lab" ip daddr 10.78.0.0/24 iifname "eth0" accept' in text
    assert "nat-lab" not in text and "nat-iso" not in text
    iso_chain = text.split("chain fwd-iso {")[1].split("}")[0]
    assert "accept" in iso_chain.split("\n")[1]  # bridge-internal traffic only
    assert iso_chain.count("reject") == 2
    # No networks: the table goes away.
    assert nat.ruleset([]) == "table inet qlaunch {}\ndelete table inet qlaunch\n"


def test_dnsmasq_argv_is_self_contained(tmp_path: Path) -> None:
    net = definitions.make("lan", subnet="10.77.0.0/24")
    argv = dhcp.argv(net, tmp_path)
    assert argv[:2] == ["dnsmasq", "--conf-file=/dev/null"]
    for opt in (
        f"--pid-file={tmp_path / 'dnsmasq.pid'}",
        f"--dhcp-leasefile={tmp_path / 'leases'}",
        f"--dhcp-hostsfile={tmp_path / 'hosts'}",
        "--bind-interfaces",
        "--interface=ql-lan",
        "--listen-address=10.77.0.1",
        "--dhcp-range=10.77.0.128,10.77.0.254,255.255.255.0,1h",
    ):
        assert opt in argv
    iso = dhcp.argv(definitions.make("iso", mode="isolated", subnet="10.79.0.0/24"), tmp_path)
    assert "--no-resolv" in iso and "--dhcp-option=option:router" in iso


def test_hosts_and_leases_files(tmp_path: Path) -> None:
    hosts = [dhcp.Host("52:54:00:00:00:01", "a", "10.77.0.10"), dhcp.Host("52:54:00:00:00:02", "b")]
    dhcp.write_hosts(tmp_path, hosts)
    assert (
        tmp_path / "hosts"
    ).read_text() == "52:54:00:00:00:01,10.77.0.10,a\n52:54:00:00:00:02,b\n"
    assert dhcp.read_hosts(tmp_path) == hosts
    (tmp_path / "leases").write_text(
        "1795676933 52:54:00:51:BA:A5 10.77.0.10 vma 01:52:54:00:51:ba:a5\n"
        "1795676932 52:54:00:04:5d:20 10.77.0.140 * *\n"
    )
    assert dhcp.leases(tmp_path) == [
        dhcp.Lease(1795676933, "52:54:00:51:ba:a5", "10.77.0.10", "vma"),
        dhcp.Lease(1795676932, "52:54:00:04:5d:20", "10.77.0.140", None),
    ]
    # A pid file naming a process that is not this network's dnsmasq is never trusted.
    (tmp_path / "dnsmasq.pid").write_text("1\n")
    assert dhcp.running_pid(tmp_path) is None
