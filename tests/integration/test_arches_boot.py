"""All seven guest architectures under TCG, in as few boots as the checks allow.

One `exec --matrix` boots every arch once and writes a JUnit file with seven passing cases:
each run prints `uname -m` on stdout and a line on stderr, and exits 0 only where `uname -m`
is what its arch must say. A second matrix boots each of the four new arches twice: a command's
own exit code comes back, and a sysrq crash is reported as a kernel panic from that arch's
console.
"""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = [pytest.mark.boot, pytest.mark.slow]

# profile -> what `uname -m` says there
ARCHES = {
    "default": "x86_64",
    "aarch64-virt": "aarch64",
    "arm-virt": "armv7l",
    "i386-pc": "i686",
    "ppc64le-pseries": "ppc64le",
    "s390x-ccw": "s390x",
    "mips64el-malta": "mips64",
}
NEW = ("i386-pc", "ppc64le-pseries", "s390x-ccw", "mips64el-malta")


def exec_matrix(
    qlaunch_bin: list[str], tmp_path: Path, path: Path, extra: list[str]
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, QLAUNCH_STATE=str(tmp_path / "state"))
    return subprocess.run(
        [*qlaunch_bin, "exec", "--matrix", str(path), "--jobs", "2", *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_seven_arches_one_matrix(qlaunch_bin: list[str], tmp_path: Path) -> None:
    # A guest of the wrong arch would print something else and exit 3: a failed JUnit case.
    script = (
        'm=$(uname -m); echo "arch $m"; echo "stderr of $m" >&2; '
        'case "$QL_WANT" in "$m") exit 0;; *) exit 3;; esac'
    )
    body = "timeout = 300\n"
    body += "".join(
        f'[[run]]\nprofile = "{p}"\ncmd = ["sh", "-c", {json.dumps(f"QL_WANT={w}; {script}")}]\n'
        for p, w in ARCHES.items()
    )
    path = tmp_path / "seven.toml"
    path.write_text(body)
    junit, report = tmp_path / "junit.xml", tmp_path / "report.json"
    r = exec_matrix(qlaunch_bin, tmp_path, path, ["--junit", str(junit), "--json", str(report)])
    assert r.returncode == 0, r.stdout + r.stderr

    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("7", "0", "0")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == set(ARCHES)
    reports = {run["name"]: run for run in json.loads(report.read_text())["runs"]}
    for name, word in ARCHES.items():
        assert cases[name].find("failure") is None
        assert reports[name]["code"] == 0
        # stdout and stderr apart, each exactly what the guest wrote there
        assert reports[name]["stdout"] == f"arch {word}\n"
        assert reports[name]["stderr"] == f"stderr of {word}\n"


def test_exit_code_and_panic_on_the_new_arches(qlaunch_bin: list[str], tmp_path: Path) -> None:
    """Two boots per new arch in one matrix: a command's own exit code (7) comes back, and a
    sysrq crash is reported as a kernel panic (121), QEMU ended by the kernel's panic=-1."""
    body = "timeout = 300\n"
    for p in NEW:
        body += f'[[run]]\nname = "{p}-code"\nprofile = "{p}"\n'
        body += 'cmd = ["sh", "-c", "echo out; echo err >&2; exit 7"]\n'
        body += f'[[run]]\nname = "{p}-panic"\nprofile = "{p}"\n'
        # The pause lets the guest's framing of "before" reach the console before the crash.
        body += 'cmd = ["sh", "-c", "echo before; sleep 1; echo c > /proc/sysrq-trigger"]\n'
    path = tmp_path / "codes.toml"
    path.write_text(body)
    report = tmp_path / "report.json"
    r = exec_matrix(qlaunch_bin, tmp_path, path, ["--json", str(report)])
    assert r.returncode == 1, r.stdout + r.stderr  # every run "failed": 7 and 121
    runs = {run["name"]: run for run in json.loads(report.read_text())["runs"]}
    for p in NEW:
        code = runs[f"{p}-code"]
        assert (code["code"], code["stdout"], code["stderr"]) == (7, "out\n", "err\n"), code
        panic = runs[f"{p}-panic"]
        assert panic["code"] == 121, panic
        assert panic["stdout"] == "before\n"
        assert "Kernel panic - not syncing: sysrq triggered crash" in json.dumps(panic)
