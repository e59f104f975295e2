"""Autostart without booting anything: unit names as systemd escapes them, the files enable
writes and disable removes (in a unit directory of the test's own), what is refused and that a
refusal leaves nothing behind, and that the units pass `systemd-analyze verify`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qlaunch.vm import autostart

REAL_QLAUNCH = Path(sys.executable).parent / "qlaunch"


@pytest.fixture
def units(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "units"
    d.mkdir()
    monkeypatch.setenv("QLAUNCH_SYSTEMD_DIR", str(d))
    monkeypatch.setenv("QLAUNCH_STATE", str(tmp_path / "state"))
    return d


def fake_vm(state: Path, name: str, argv: list[str] | None = None) -> None:
    """A stopped VM's state directory, as start leaves it."""
    d = state / name
    d.mkdir(parents=True)
    rec = {"name": name, "uuid": "0" * 8, "profile": "default", "state": "stopped"}
    rec["restart_policy"] = "on-failure"
    (d / "state.json").write_text(json.dumps(rec))
    (d / "argv.json").write_text(json.dumps(argv or ["qemu-system-x86_64", "-m", "256"]))
    prof = {"name": "default", "source": "x.toml", "command": None, "profile": {"x": 1}}
    (d / "profile.json").write_text(json.dumps(prof))


def tree(*roots: Path) -> set[str]:
    out = set()
    for r in roots:
        for dirpath, dirnames, filenames in os.walk(r):
            for n in dirnames + filenames:
                out.add(os.path.join(dirpath, n))
    return out


@pytest.mark.parametrize("name", ["web", "my-vm", "-x-", "a_b", "0abc", "A-B_c-9"])
def test_escape_is_systemd_escapes(name: str) -> None:
    exe = shutil.which("systemd-escape")
    if exe is None:
        pytest.skip("systemd-escape is not installed")
    want = subprocess.run(
        [exe, "--template=qlaunch@.service", "--", name], capture_output=True, text=True
    ).stdout.strip()
    assert autostart.unit_name(name) == want
    # ...and %I gives the VM's name back (an unescaped "my-vm" would come back as "my/vm").
    instance = want[len("qlaunch@") : -len(".service")]
    assert autostart.unescape(instance) == name
    assert autostart.unescape("my-vm") == "my/vm"


def test_names_systemd_cannot_take_are_refused(run_cli, units: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("autostart", "enable", "a" + "-" * 63)
    assert code == 2 and "too long for a systemd unit" in err and len(err.splitlines()) == 1
    code, _, err = run_cli("autostart", "enable", "a/b")
    assert code == 2 and "is not a VM name" in err
    assert tree(units) == set()


def test_unknown_vm_and_not_enabled(run_cli, units: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("autostart", "enable", "nosuch")
    assert code == 5 and "no VM named nosuch" in err and len(err.splitlines()) == 1
    code, _, err = run_cli("autostart", "disable", "nosuch")
    assert code == 5 and "not enabled for autostart" in err
    code, _, err = run_cli("autostart", "start", "nosuch")
    assert code == 5 and "autostart enable nosuch" in err
    assert tree(units) == set()


def test_system_directory_needs_root(
    run_cli,  # type: ignore[no-untyped-def]
    units: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("QLAUNCH_SYSTEMD_DIR")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    fake_vm(Path(os.environ["QLAUNCH_STATE"]), "web")
    code, _, err = run_cli("autostart", "enable", "web")
    assert code == 3, err
    assert "/etc/systemd/system, which needs root" in err and "sudo qlaunch autostart" in err
    assert not autostart.definition_path("web").exists()


def test_enable_writes_what_systemctl_enable_would_and_disable_removes_it(
    run_cli,  # type: ignore[no-untyped-def]
    units: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = Path(os.environ["QLAUNCH_STATE"])
    fake_vm(state, "my-vm", ["qemu-system-x86_64", "-runas", "nobody"])
    fake_vm(state, "other")
    monkeypatch.setattr(sys, "argv", [str(REAL_QLAUNCH)])
    code, out, err = run_cli("autostart", "enable", "my-vm", "--json")
    assert code == 0, err
    shown = json.loads(out)
    unit = "qlaunch@my\\x2dvm.service"
    link = units / "multi-user.target.wants" / unit
    template = units / "qlaunch@.service"
    dropin = units / f"{unit}.d" / "qlaunch.conf"
    assert shown["unit"] == unit and shown["name"] == "my-vm"
    assert shown["unit_files"] == [str(template), str(link), str(dropin)]
    assert os.readlink(link) == str(template)
    text = template.read_text()
    assert f"ExecStart={REAL_QLAUNCH} autostart start -- %I\n" in text
    assert f"ExecStop={REAL_QLAUNCH} stop --timeout 60 -- %I\n" in text
    assert "Type=oneshot\nRemainAfterExit=yes\n" in text
    assert "After=network-online.target" in text and "WantedBy=multi-user.target" in text
    # The directories of this run go with the instance, so the VM comes back where list looks.
    env = dropin.read_text()
    assert f'Environment="QLAUNCH_STATE={state}"' in env
    assert f'Environment="QLAUNCH_DATA={os.environ["QLAUNCH_DATA"]}"' in env
    defn = json.loads(autostart.definition_path("my-vm").read_text())
    assert defn["name"] == "my-vm" and defn["runas"] == "nobody"
    assert defn["restart_policy"] == "on-failure" and defn["cwd"] == os.getcwd()
    assert defn["profile"]["profile"] == {"x": 1}

    # A second VM shares the template; list names each VM's files.
    assert run_cli("autostart", "enable", "other")[0] == 0
    code, out, _ = run_cli("autostart", "list", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == {"my-vm", "other"}
    assert rows["other"]["unit_files"][:2] == [
        str(template),
        str(units / "multi-user.target.wants" / "qlaunch@other.service"),
    ]
    assert rows["my-vm"]["state"] == "stopped" and rows["my-vm"]["profile"] == "default"

    code, out, _ = run_cli("autostart", "disable", "my-vm", "--json")
    assert code == 0
    assert not link.exists() and not dropin.parent.exists()
    assert not autostart.definition_path("my-vm").exists()
    assert template.exists()  # "other" still uses it
    assert run_cli("autostart", "disable", "other")[0] == 0
    assert tree(units) == set()  # the template and the .wants directory went with the last VM


def test_enable_refuses_a_template_it_did_not_write(
    run_cli,  # type: ignore[no-untyped-def]
    units: Path,
) -> None:
    fake_vm(Path(os.environ["QLAUNCH_STATE"]), "web")
    (units / "qlaunch@.service").write_text("[Service]\nExecStart=/bin/true\n")
    code, _, err = run_cli("autostart", "enable", "web")
    assert code == 5 and "qlaunch did not write it" in err
    assert tree(units) == {str(units / "qlaunch@.service")}
    assert not autostart.definition_path("web").exists()


def test_quoting_of_unit_words_and_environment() -> None:
    assert autostart._word("/usr/bin/qlaunch") == "/usr/bin/qlaunch"
    assert autostart._word("/opt/my tools/qlaunch") == '"/opt/my tools/qlaunch"'
    assert autostart._word("/a%b$c") == "/a%%b$$c"
    text = autostart.dropin_text({"QLAUNCH_STATE": '/tmp/a b%"c'}) or ""
    assert 'Environment="QLAUNCH_STATE=/tmp/a b%%\\"c"' in text
    assert autostart.dropin_text({}) is None
    with pytest.raises(Exception, match="control character"):
        autostart.dropin_text({"QLAUNCH_STATE": "/tmp/a\nb"})


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze is missing: .ci/setup-host installs the systemd package")
    d = tmp_path / "units"
    (d / "multi-user.target.wants").mkdir(parents=True)
    (d / "qlaunch@.service").write_text(autostart.template_text([str(REAL_QLAUNCH)]))
    unit = autostart.unit_name("my-vm")
    os.symlink(d / "qlaunch@.service", d / "multi-user.target.wants" / unit)
    (d / f"{unit}.d").mkdir()
    text = autostart.dropin_text({"QLAUNCH_STATE": "/tmp/x y", "QLAUNCH_DATA": "/tmp/d"})
    (d / f"{unit}.d" / "qlaunch.conf").write_text(text or "")

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [exe, "verify", "--man=no", str(d / unit)], capture_output=True, text=True, cwd=d
        )

    r = verify()
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    # The check can fail: a command that is not there is what verify reports.
    (d / "qlaunch@.service").write_text(autostart.template_text(["/nonexistent/qlaunch"]))
    r = verify()
    assert r.returncode != 0 and "/nonexistent/qlaunch" in r.stderr
