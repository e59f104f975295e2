"""`qlaunch exec` on three architectures at once: codes, output, summary, JUnit and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.boot


def test_matrix_over_three_arches_writes_junit_and_json(
    qlaunch_bin: list[str], tmp_path: Path
) -> None:
    # x86_64 (Debian cloud), arm64 and armhf kernels in parallel; each exits with its own code,
    # so 0, 1 and 42 all have to come back, with each run's stdout and stderr kept apart.
    script = (
        'echo "arch $(uname -m)"; echo "stderr of $(uname -m)" >&2; '
        "case $(uname -m) in x86_64) exit 0;; aarch64) exit 1;; *) exit 42;; esac"
    )
    junit, report = tmp_path / "junit.xml", tmp_path / "report.json"
    env = dict(os.environ, QLAUNCH_STATE=str(tmp_path / "state"))
    r = subprocess.run(
        [
            *qlaunch_bin,
            "exec",
            *("--profile", "default", "--profile", "aarch64-virt", "--profile", "arm-virt"),
            *("--junit", str(junit), "--json", str(report), "--timeout", "240"),
            "--",
            *("sh", "-c", script),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 1, r.stderr
    runs = {run["name"]: run for run in json.loads(report.read_text())["runs"]}
    codes = {name: run["code"] for name, run in runs.items()}
    assert codes == {"default": 0, "aarch64-virt": 1, "arm-virt": 42}
    words = {"default": "x86_64", "aarch64-virt": "aarch64", "arm-virt": "armv7l"}
    for name, word in words.items():
        assert runs[name]["stdout"] == f"arch {word}\n"
        assert runs[name]["stderr"] == f"stderr of {word}\n"
        assert f"[{name}] arch {word}" in r.stdout.splitlines()
        assert f"[{name}] stderr of {word}" in r.stderr.splitlines()
    table = [ln.split() for ln in r.stdout.splitlines() if ln.startswith(tuple(words) + ("NAME",))]
    assert ["NAME", "PROFILE", "KERNEL", "RESULT", "CODE", "TIME"] in table
    assert any(row[:5] == ["arm-virt", "arm-virt", "asset:arm", "failed", "42"] for row in table)

    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "2", "0")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == set(words)
    assert cases["default"].find("failure") is None
    failure = cases["arm-virt"].find("failure")
    assert failure is not None and failure.get("message") == "exit status 42"
    assert cases["aarch64-virt"].findtext("system-out") == "arch aarch64\n"
