"""`qlaunch ssh` to a VM on a qlaunch network inside a namespace: the way in is its DHCP lease
(the busybox guest has no agent), and ssh runs in the VM's namespace, where that address is
reachable at all. The guest runs no sshd, so what proves the way is ssh's own error: the
guest's kernel refused the connection (from outside the namespace there is no route)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab import namespace, wait_until
from vmlab import BOOT_TIMEOUT, BOOTED, jq, ok, ql, reap_all

pytestmark = [pytest.mark.net, pytest.mark.boot]

LAN = ["--set", "net.0.mode=network", "--set", "net.0.network=lan"]


@pytest.fixture
def bglab(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces and taps need root")
    root = Path(tempfile.mkdtemp(prefix="qlssh-", dir="/tmp"))
    monkeypatch.setenv("QLAUNCH_STATE", str(root))
    try:
        with namespace("qls", root) as ns:
            try:
                yield ns, root
            finally:
                reap_all(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_ssh_goes_to_the_lease_inside_the_namespace(bglab: tuple[str, Path]) -> None:
    ns, _ = bglab
    ok("net", "create", "lan", "--subnet", "10.77.0.0/24", "--netns", ns)
    ok("start", "default", "--name", "sv", "--netns", ns, *LAN, "--set", "net.0.ip=10.77.0.10")
    wait_until(lambda: BOOTED in ok("log", "sv").stdout, BOOT_TIMEOUT, "the guest to boot")
    wait_until(lambda: jq("status", "sv")["nics"][0].get("lease") == "10.77.0.10", 60, "its lease")
    st = jq("status", "sv")
    assert {"address": "10.77.0.10", "source": "lease"}.items() <= st["addresses"][0].items()
    row = next(r for r in json.loads(ok("list", "--json").stdout) if r["name"] == "sv")
    assert row["addresses"][0]["address"] == "10.77.0.10"

    t0 = time.monotonic()
    r = ql("ssh", "sv", "--connect-timeout", "5", "--", "true")
    assert r.returncode == 255, r
    assert "10.77.0.10 port 22: Connection refused" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 5  # refused by the guest, not timed out

    r = ql("ssh", "sv", "--wait", "3", "--", "true")
    assert r.returncode == 5, r
    assert "no ssh server answers at 10.77.0.10 port 22" in r.stderr, r.stderr


def test_no_way_in_is_said(bglab: tuple[str, Path]) -> None:
    ok("start", "default", "--name", "closed")  # [[net]] mode = "none"
    r = ql("ssh", "closed", "--", "true")
    assert r.returncode == 5 and "no way in for ssh" in r.stderr, r.stderr
    assert "forward" in r.stderr  # the hint says how to make one
    r = ql("ssh", "nosuchvm")
    assert r.returncode == 5 and "no VM named nosuchvm" in r.stderr, r.stderr
