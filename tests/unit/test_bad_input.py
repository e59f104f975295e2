"""Bad input: a one-line error naming the file and key, exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest


def write(tmp_path: Path, body: str, name: str = "p.toml") -> str:
    p = tmp_path / name
    p.write_text(body)
    return str(p)


BASE = '[boot]\nkernel = "asset:x86_64/kernel"\ninitrd = "qlaunch"\n'

CASES = [
    ("unknown key", BASE + "[machine]\nmemroy = '1G'\n", [], "[machine] unknown key 'memroy'"),
    ("unknown section", BASE + "[machin]\narch = 'x86_64'\n", [], "unknown section 'machin'"),
    ("wrong type", BASE + "[machine]\nsmp = 'two'\n", [], "[machine] smp: expected an integer"),
    ("bad size", BASE + "[machine]\nmemory = '12X'\n", [], "[machine] memory: '12X' is not a size"),
    ("bad choice", BASE + "[machine]\naccel = 'hvf'\n", [], "[machine] accel: 'hvf' is not one of"),
    (
        "arch/machine mismatch",
        BASE + "[machine]\narch = 'x86_64'\nmachine = 'raspi3b'\n",
        [],
        "[machine] machine: 'raspi3b' is not a machine for arch x86_64",
    ),
    ("bad arch", BASE + "[machine]\narch = 'riscv64'\n", [], "[machine] arch: 'riscv64'"),
    ("extends missing", "extends = 'nope-such'\n" + BASE, [], "extends: no profile named"),
    ("not toml", "[machine\n", [], "not valid TOML"),
    ("disk without path", BASE + "[[disk]]\nformat = 'raw'\n", [], "[[disk]] #0 path: required"),
    ("bad forward", BASE + "[[net]]\nforward = ['ssh->22']\n", [], "is not a forward rule"),
    ("bad mac", BASE + "[[net]]\nmac = '01:00:5e:00:00:01'\n", [], "multicast MAC"),
    ("bad --set key", BASE, ["--set", "machine.memroy=1G"], "[machine] unknown key 'memroy'"),
    ("bad --set form", BASE, ["--set", "memory"], "--set 'memory': expected SECTION.KEY=VALUE"),
    ("bad --set value", BASE, ["--set", "machine.smp=0"], "[machine] smp: 0 must be 1 or more"),
    (
        "raspi memory",
        BASE + "[machine]\narch='aarch64'\nmachine='raspi3b'\nmemory='2G'\n",
        [],
        "raspi3b takes exactly 1G of RAM, not 2G",
    ),
    (
        "interface for board",
        BASE + "[[disk]]\npath='x.img'\ninterface='sd'\n",
        [],
        "q35 has no sd storage",
    ),
]


@pytest.mark.parametrize(("what", "body", "extra", "expect"), CASES, ids=[c[0] for c in CASES])
def test_bad_profile(
    run_cli, tmp_path: Path, what: str, body: str, extra: list[str], expect: str
) -> None:
    path = write(tmp_path, body)
    code, out, err = run_cli("cmdline", path, *extra)
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("qlaunch: error: ")
    assert expect in lines[0]
    assert "Traceback" not in err
    # The file is named, except for --set syntax errors that have no file yet.
    if "--set" not in expect:
        assert path in lines[0]


def test_extends_cycle(run_cli, tmp_path: Path) -> None:
    write(tmp_path, "extends = 'b'\n" + BASE, "a.toml")
    write(tmp_path, "extends = 'a'\n", "b.toml")
    code, _, err = run_cli("cmdline", str(tmp_path / "a.toml"))
    assert code == 2
    assert "extends: cycle a -> b -> a" in err


def test_missing_profile_lists_known(run_cli) -> None:
    code, _, err = run_cli("cmdline", "no-such-profile")
    assert code == 2
    assert "no profile named 'no-such-profile'" in err
    assert "default" in err


def test_missing_profile_file(run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("cmdline", str(tmp_path / "gone.toml"))
    assert code == 2
    assert "does not exist" in err


def test_kvm_demanded_on_this_host_fails_clearly(run_cli) -> None:
    from qlaunch.launch.host import probe

    if probe().kvm.usable:
        pytest.skip("this host has usable hardware KVM")
    code, _, err = run_cli("cmdline", "default", "--set", "machine.accel=kvm")
    assert code == 3
    assert "KVM was asked for but is not usable" in err


def test_debug_shows_traceback(run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("--debug", "cmdline", write(tmp_path, "[machine\n"))
    assert code == 2
    assert "Traceback" in err
