"""`qlaunch ssh`'s pure parts: reading forwards, finding the cloud-init key, the ssh argv."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from qlaunch.vm import ssh
from qlaunch.vm.api import VM


def test_forward_rules() -> None:
    assert ssh.parse_forward("tcp:127.0.0.1:2222-:22") == ("tcp", "127.0.0.1", 2222, "", 22)
    assert ssh.parse_forward("tcp::2222-10.0.2.15:22") == ("tcp", "", 2222, "10.0.2.15", 22)
    assert ssh.parse_forward(":2222-:22") == ("tcp", "", 2222, "", 22)
    assert ssh.parse_forward("udp::53-:53") == ("udp", "", 53, "", 53)
    assert ssh.parse_forward("nonsense") is None
    prof = {
        "net": [
            {"mode": "none"},
            {"mode": "user", "forward": ["udp::22-:22", "tcp::8080-:80", "tcp:0.0.0.0:2200-:22"]},
        ]
    }
    way = ssh.forward_way(prof)
    assert way is not None and (way.host, way.port) == ("127.0.0.1", 2200)
    assert ssh.forward_way({"net": [{"mode": "user", "forward": ["tcp::8080-:80"]}]}) is None
    # mode defaults to user, as in profiles.
    assert ssh.forward_way({"net": [{"forward": ["tcp:127.0.0.2:2022-:22"]}]}) == ssh.Way(
        "127.0.0.2", 2022, None, "forward tcp:127.0.0.2:2022-:22"
    )


def _vm_with_profile(tmp_path: Path, profile: dict[str, object], source: str) -> VM:
    root = tmp_path / "state"
    (root / "v").mkdir(parents=True, exist_ok=True)
    (root / "v" / "profile.json").write_text(json.dumps({"source": source, "profile": profile}))
    return VM("v", root)


def _keypair(path: Path, comment: str) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True
    )
    return path.with_suffix(".pub").read_text().strip()


def test_the_cloud_init_key_is_found_beside_the_profile_or_in_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    pdir = tmp_path / "profiles"
    pdir.mkdir()
    other = _keypair(home / ".ssh" / "other", "other")
    mine = _keypair(pdir / "lab", "renamed comment")
    # The comment need not match: type and key do.
    listed = mine.rsplit(" ", 1)[0] + " somebody@else"
    vm = _vm_with_profile(
        tmp_path, {"cloud-init": {"ssh_authorized_keys": [listed]}}, str(pdir / "lab.toml")
    )
    assert ssh.find_key(vm) == pdir / "lab"
    vm = _vm_with_profile(
        tmp_path, {"cloud-init": {"ssh_authorized_keys": [other]}}, str(pdir / "lab.toml")
    )
    assert ssh.find_key(vm) == home / ".ssh" / "other"
    # A .pub without its private key is no use.
    (home / ".ssh" / "other").unlink()
    assert ssh.find_key(vm) is None
    vm = _vm_with_profile(tmp_path, {}, "default")
    assert ssh.find_key(vm) is None


def test_argv_is_words_with_the_vms_own_known_hosts(tmp_path: Path) -> None:
    vm = VM("v", tmp_path)
    way = ssh.Way("127.0.0.1", 2222, None, "forward")
    argv = ssh.argv(
        vm, way, user="debian", key="/k", command=["echo", "a b", ";", "-x"], batch=True
    )
    assert argv[0] == "ssh"
    assert f"UserKnownHostsFile={tmp_path / 'v' / 'known_hosts'}" in argv
    assert "StrictHostKeyChecking=accept-new" in argv and "BatchMode=yes" in argv
    assert argv[argv.index("-i") + 1] == "/k" and "IdentitiesOnly=yes" in argv
    # `--` keeps ssh from reading the host or the command's words as its options.
    tail = argv[argv.index("--") :]
    assert tail == ["--", "127.0.0.1", "echo", "a b", ";", "-x"]
    assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-l") + 1] == "debian"
    assert "BatchMode=yes" not in ssh.argv(vm, way, batch=False)
