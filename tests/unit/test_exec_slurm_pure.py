"""`exec --on slurm` without Slurm or QEMU: the matrix file the tasks read, what each run asks
Slurm for, which paths the nodes see, the options that go together, a task's result when its
run cannot even start, and `matrix collect` over a job directory whose results are all in."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from qlaunch.errors import UsageError
from qlaunch.testloop import driver as testloop
from qlaunch.testloop import matrix, slurm


def test_matrix_file_for_the_nodes_reads_back_as_the_same_runs(tmp_path: Path) -> None:
    shares = (testloop.parse_share(f"{tmp_path}:/in:ro"), testloop.parse_share(str(tmp_path)))
    specs = [
        testloop.ExecSpec(
            cmd=("sh", "-c", "echo \"a\\\\b\" 'c'\n\t\x01\x7f é 🙂"),
            name="odd.name_1-x",  # as unique_names leaves names
            kernel="/k/bzImage",
            modules="/m",
            module=("dummy",),
            shares=shares,
            sets=("machine.memory=1G",),
            cpus=2,
            memory="512M",
            append="a=b c",
            timeout=12.5,
            watchdog=3.0,
            fail_on_warn=True,
            boot_failure_exit=125,
        ),
        testloop.ExecSpec(cmd=("true",), name="plain", profile="aarch64-virt"),
    ]
    path = tmp_path / "m.toml"
    path.write_bytes(matrix.matrix_toml(specs, "a header\nof two lines"))
    assert path.read_text().startswith("# a header\n# of two lines\n")
    back = matrix.load_matrix(str(path), testloop.ExecSpec(cmd=()))
    assert back == specs
    assert matrix.unique_names(back) == specs


def test_text_that_is_not_utf8_cannot_go_into_a_matrix_file() -> None:
    spec = testloop.ExecSpec(cmd=("echo", "bad \udcff byte"), name="x")
    with pytest.raises(UsageError, match="not valid text"):
        matrix.matrix_toml([spec])


def _plan(smp: int, mib: int, timeout: float | None, limit: int | None = None) -> Any:
    machine = SimpleNamespace(smp=smp, memory_mib=mib)
    profile = SimpleNamespace(machine=machine, resources=SimpleNamespace(memory_limit=limit))
    return SimpleNamespace(profile=profile, timeout=timeout)


def test_what_a_run_asks_slurm_for() -> None:
    # Guest RAM plus QEMU's own plus qlaunch's; timeout plus a minute, in whole minutes.
    assert slurm.request_for(_plan(1, 256, 30)) == slurm.Request(1, 512, 2)
    assert slurm.request_for(_plan(2, 1024, 600)) == slurm.Request(2, 1280, 11)
    assert slurm.request_for(_plan(1, 256, None)).minutes is None
    # memory_limit is QEMU's whole: only qlaunch's own comes on top.
    assert slurm.request_for(_plan(1, 256, 60, limit=1 << 30)).mem_mib == 1024 + 64
    reqs = [slurm.Request(1, 512, 2), slurm.Request(4, 256, 9)]
    assert slurm._largest(reqs) == slurm.Request(4, 512, 9)
    assert slurm._largest([*reqs, slurm.Request(1, 1, None)]).minutes is None
    assert slurm.Request(2, 700, 3).sbatch() == [
        "--ntasks=1",
        "--cpus-per-task=2",
        "--mem=700M",
        "--time=3",
    ]
    assert "TimeLimit=3" in slurm.Request(2, 700, 3).scontrol()
    assert slurm._ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert slurm._ranges([3]) == "3"


def test_paths_the_nodes_see(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(slurm.SHARED_ENV, raising=False)
    if slurm.mount_of("/dev/shm")[1] != "tmpfs":
        pytest.skip("/dev/shm is not a tmpfs here")
    why = slurm.unseen("/dev/shm/some/kernel", single_host=True)
    assert why is not None and why.startswith("is on tmpfs (/dev/shm)")
    here_fs = slurm.mount_of(tmp_path)[1]
    if here_fs not in slurm.NETWORK_FS | slurm.MEMORY_FS:
        assert slurm.unseen(tmp_path, single_host=True) is None  # the one node is this host
        why = slurm.unseen(tmp_path, single_host=False)
        assert why is not None and "not on storage every node mounts" in why
    monkeypatch.setenv(slurm.SHARED_ENV, f"/nonexistent:{tmp_path}:/dev/shm")
    assert slurm.unseen(tmp_path / "deeper", single_host=False) is None
    assert slurm.unseen("/dev/shm/x", single_host=False) is None  # the site says so


def test_sbatch_options_qlaunch_sets_are_refused_in_slurm_arg() -> None:
    slurm.check_slurm_args(["--account=kernel", "--qos=low", "--constraint=avx2", "-A", "x"])
    for arg, own in (
        ("-c4", "--cpus-per-task"),
        ("--mem=1G", "--mem"),
        ("--array=0-3", "--array"),
        ("-pdebug", "--partition"),
        ("--time=5", "--time"),
        ("--output=x", "--output"),
    ):
        with pytest.raises(UsageError, match=f"qlaunch sets {own} itself"):
            slurm.check_slurm_args([arg])


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--partition", "p", "--", "true"], "--partition is for --on slurm"),
        (["--no-wait", "--", "true"], "--no-wait is for --on slurm"),
        (["--stage-dir", ".", "--", "true"], "--stage-dir is for --on slurm"),
        (["--on", "slurm", "--", "true"], "--on slurm runs several runs"),
        (["--cell", "0", "--", "true"], "--cell N picks a run of --matrix FILE"),
        (["--matrix", "M", "--on", "slurm", "--cell", "0"], "does not go with --on slurm"),
        (["--matrix", "M", "--on", "slurm", "--console"], "--console shows a local run"),
        (["--matrix", "M", "--on", "slurm", "--slurm-arg=--mem=1G"], "sets --mem itself"),
        (["--matrix", "M", "--cell", "2"], "--cell 2: M has runs 0 to 1"),
    ],
)
def test_options_that_do_not_go_together(
    run_cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], says: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "M").write_text('cmd = ["true"]\n[[run]]\nname = "a"\n[[run]]\nname = "b"\n')
    code, _, err = run_cli("exec", *args)
    assert code == 2, err
    assert err.count("\n") == 1 and says in err, err


def test_a_cell_that_cannot_start_leaves_its_result(
    run_cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a Slurm task does when its node lacks the kernel: the error is the run's result.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.toml").write_text(
        'cmd = ["true"]\n[[run]]\nname = "ok"\n[[run]]\nname = "gone"\nkernel = "/nonexistent/k"\n'
    )
    code, _, err = run_cli("exec", "--matrix", "m.toml", "--cell", "1", "--json", "r.json")
    assert code == 2, err
    assert err.startswith("qlaunch: error: --kernel /nonexistent/k: No such file or directory")
    (run,) = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert (run["name"], run["code"], run["verdict"]) == ("gone", 2, "error")
    assert run["kernel"] == "/nonexistent/k" and run["node"] == matrix.this_node()
    assert run["message"].startswith("--kernel /nonexistent/k: No such file")


def _result(name: str, code: int, verdict: str = "exit", **kw: Any) -> dict[str, Any]:
    r = testloop.Result(
        name=name,
        code=code,
        stdout=f"out of {name}\n",
        stderr="",
        console="",
        verdict=verdict,
        message=kw.pop("message", ""),
        duration=1.5,
        profile="default",
        kernel="/abs/staged/bzImage",
        **kw,
    )
    return {**r.as_dict(), "node": f"node-{name}"}


def test_collect_reads_a_job_directory(
    run_cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = tmp_path / "qlaunch-matrix-20260101-000000-abc"
    cells = [
        {"name": n, "profile": "default", "kernel": "bzImage", "cpus": 1, "mem_mib": 512}
        for n in ("a", "b")
    ]
    for c in cells:
        c["minutes"] = None
    (job / "0").mkdir(parents=True)
    (job / "1").mkdir()
    (job / "job.json").write_text(json.dumps({"job_id": "77", "cells": cells}))
    (job / "0" / "result.json").write_text(json.dumps({"ok": True, "runs": [_result("a", 0)]}))
    failed = _result("b", 121, "panic", message="Kernel panic on the console: exit 121")
    (job / "1" / "result.json").write_text(json.dumps({"ok": False, "runs": [failed]}))

    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("matrix", "collect", "77", "--json", "c.json", "--junit", "c.xml")
    assert code == 1, err
    assert "[a] out of a" in out.splitlines() and "[b] out of b" in out.splitlines()
    assert "qlaunch: [b] Kernel panic on the console: exit 121" in err
    rows = [ln.split() for ln in out.splitlines() if ln.startswith(("NAME", "a ", "b "))]
    assert rows[0] == ["NAME", "PROFILE", "KERNEL", "RESULT", "CODE", "TIME", "NODE"]
    assert rows[2] == ["b", "default", "bzImage", "panic", "121", "1.5s", "node-b"]
    runs = json.loads((tmp_path / "c.json").read_text())["runs"]
    # The kernel as the matrix named it (job.json), not the path the node opened.
    assert [(r["name"], r["kernel"], r["node"]) for r in runs] == [
        ("a", "bzImage", "node-a"),
        ("b", "bzImage", "node-b"),
    ]
    suite = ET.parse(tmp_path / "c.xml").getroot()
    props = [p.get("value") for p in suite.iter("property") if p.get("name") == "node"]
    assert props == ["node-a", "node-b"]

    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    code, _, err = run_cli("matrix", "collect", "77")
    assert code == 2 and err.startswith("qlaunch: error: no matrix job 77"), err
    code, out, _ = run_cli("matrix", "collect", str(job))
    assert code == 1 and "[a] out of a" in out.splitlines()


def test_local_reports_name_this_host_as_the_node(tmp_path: Path) -> None:
    r = testloop.Result("a", 0, "", "", "", "exit", "")
    matrix.write_json(str(tmp_path / "j.json"), [r])
    assert (
        json.loads((tmp_path / "j.json").read_text())["runs"][0]["node"]
        == os.uname()[1].split(".")[0]
    )
