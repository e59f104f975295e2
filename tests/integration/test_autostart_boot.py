"""Autostart on a real VM: enable writes the template unit, the enablement link and the
instance's drop-in (in a unit directory of the test's own) that `systemd-analyze verify`
accepts; after a stop, the unit's own ExecStart line, run as systemd would run it at boot (from
/, with only the unit's environment), brings the VM back from its definition; ExecStop stops
it by the ladder; disable removes every file, the template with the last VM."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from vmlab import BOOT_TIMEOUT, BOOTED, QLAUNCH, jq, ok, ql, row, vmroot  # noqa: F401

from qlaunch.vm.api import VM

pytestmark = pytest.mark.boot

NAME = "as-web"  # a '-': the instance is as\x2dweb, and %I must give as-web back
UNIT = "qlaunch@as\\x2dweb.service"


def unit_command(template: Path, key: str, name: str) -> list[str]:
    """The argv systemd makes of the unit's ExecStart= or ExecStop= line for instance NAME:
    words as the shell would split them (qlaunch quotes them so), %I the unescaped instance,
    %% and $$ the characters themselves."""
    line = next(ln for ln in template.read_text().splitlines() if ln.startswith(f"{key}="))
    words = shlex.split(line[len(key) + 1 :])
    return [w.replace("%I", name).replace("%%", "%").replace("$$", "$") for w in words]


def unit_env(dropin: Path) -> dict[str, str]:
    """A system service's environment: PATH, and the drop-in's Environment= lines."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    for ln in dropin.read_text().splitlines():
        if ln.startswith("Environment="):
            key, _, value = shlex.split(ln[len("Environment=") :])[0].partition("=")
            env[key] = value.replace("%%", "%")
    return env


def test_enable_boot_start_stop_disable(
    vmroot: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    units = tmp_path / "units"
    units.mkdir()
    monkeypatch.setenv("QLAUNCH_SYSTEMD_DIR", str(units))
    data = Path(os.environ["QLAUNCH_DATA"])
    ok(
        "start",
        "default",
        "--name",
        NAME,
        "--restart",
        "on-failure",
        "--set",
        "machine.memory=320M",
    )
    vm = VM.get(NAME)
    vm.console.expect(BOOTED, BOOT_TIMEOUT)

    r = ok("autostart", "enable", NAME)
    assert f"starts at boot through {UNIT}" in r.stderr
    template = units / "qlaunch@.service"
    link = units / "multi-user.target.wants" / UNIT
    dropin = units / f"{UNIT}.d" / "qlaunch.conf"
    definition = data / "vms" / NAME / "definition.json"
    assert os.readlink(link) == str(template)
    assert f"ExecStart={QLAUNCH[0]} autostart start -- %I" in template.read_text()
    defn = json.loads(definition.read_text())
    assert defn["restart_policy"] == "on-failure" and defn["profile"]["name"] == "default"
    assert defn["profile"]["profile"]["machine"]["memory"] == "320M"  # the --set, as resolved
    listed = jq("autostart", "list")
    assert listed == [
        {
            "name": NAME,
            "unit": UNIT,
            "unit_files": [str(template), str(link), str(dropin)],
            "definition": str(definition),
            "profile": "default",
            "state": "running",
            "note": None,
        }
    ]

    # systemd itself accepts the unit: the template, the instance and its drop-in.
    analyze = shutil.which("systemd-analyze")
    assert analyze, ".ci/setup-host installs systemd for systemd-analyze"
    v = subprocess.run(
        [analyze, "verify", "--man=no", str(units / UNIT)], capture_output=True, text=True
    )
    assert v.returncode == 0 and not v.stderr.strip(), v.stderr

    # The host goes down: ExecStop. The VM is stopped by the ladder.
    env = unit_env(dropin)
    assert env["QLAUNCH_STATE"] == str(vmroot)
    first_pid = row(NAME)["pid"]
    stop = subprocess.run(
        unit_command(template, "ExecStop", NAME),
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=300,
    )
    assert stop.returncode == 0, stop.stderr
    assert row(NAME)["state"] == "stopped"

    # The host boots: ExecStart, from / with nothing but the unit's environment.
    start = subprocess.run(
        unit_command(template, "ExecStart", NAME),
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=300,
    )
    assert start.returncode == 0, start.stderr
    assert start.stdout.strip() == NAME
    again = row(NAME)
    assert again["state"] == "running" and again["restart_policy"] == "on-failure"
    assert again["pid"] != first_pid
    vm = VM.get(NAME)
    vm.console.expect(BOOTED, BOOT_TIMEOUT)  # a fresh boot of the same VM
    argv = json.loads((vmroot / NAME / "argv.json").read_text())
    assert argv[argv.index("-m") + 1] == "320M"
    # Started again while it runs (systemctl start by hand): left alone, no second QEMU.
    pid = row(NAME)["pid"]
    start2 = subprocess.run(
        unit_command(template, "ExecStart", NAME), capture_output=True, text=True, env=env, cwd="/"
    )
    assert start2.returncode == 0 and "already running" in start2.stderr
    assert row(NAME)["pid"] == pid

    stop = subprocess.run(
        unit_command(template, "ExecStop", NAME), capture_output=True, text=True, env=env, cwd="/"
    )
    assert stop.returncode == 0, stop.stderr
    assert row(NAME)["state"] == "stopped"

    removed = jq("autostart", "disable", NAME)["removed"]
    assert set(removed) == {str(link), str(dropin), str(definition), str(template)}
    assert list(units.iterdir()) == []
    assert jq("autostart", "list") == []
    r = ql("autostart", "start", NAME)
    assert r.returncode == 5 and "not enabled for autostart" in r.stderr
