"""Bad input: a one-line error naming the file and key, exit code 2, no traceback."""

from __future__ import annotations

import os
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
    ("bad size", BASE + "[machine]\nmemory = '12X'\n", [], "[machine] memory:"),
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


# ---- issue 17: the error contract everywhere ---------------------------------------------------
# Each test below failed on the code before the fix (a traceback, a wrong exit code, a file
# overwritten or left behind).


@pytest.fixture
def state_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "state"
    monkeypatch.setenv("QLAUNCH_STATE", str(root))
    return root


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of the test's own: where qlaunch records the files it wrote."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("QLAUNCH_CACHE", str(cache))
    return cache


@pytest.fixture
def no_boot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Anything that would start QEMU fails the test: these mistakes must be refused before."""
    from qlaunch.testloop import driver
    from qlaunch.vm import api

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("booted")

    monkeypatch.setattr(driver, "execute", boom)
    monkeypatch.setattr(api, "_launch", boom)


def one_error(code: int, err: str, want: int, *words: str) -> str:
    assert code == want, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qlaunch: error: "), err
    for w in words:
        assert w in lines[0], err
    return lines[0]


def fails(result: tuple[int, str, str], want: int, *words: str) -> str:
    code, out, err = result
    return one_error(code, err, want, *words)


def user_data(tmp_path: Path) -> str:
    p = tmp_path / "user-data"
    p.write_text("#cloud-config\n")
    return str(p)


def test_seed_refuses_to_overwrite_a_file_it_did_not_write(
    run_cli, tmp_path: Path, state_root: Path, own_cache: Path
) -> None:
    disk = tmp_path / "disk.qcow2"
    disk.write_bytes(b"QFI\xfb" + b"\0" * 508)
    code, _, err = run_cli("seed", str(disk), "--user-data", user_data(tmp_path))
    one_error(code, err, 2, "did not write it", "--force")
    assert disk.read_bytes()[:4] == b"QFI\xfb"
    # Its own seed it may replace; with --force anything but an input or a VM's file.
    seed = tmp_path / "seed.iso"
    for _ in range(2):
        assert run_cli("seed", str(seed), "--user-data", user_data(tmp_path))[0] == 0
    assert run_cli("seed", str(disk), "--user-data", user_data(tmp_path), "--force")[0] == 0


def test_seed_never_overwrites_its_own_input(run_cli, tmp_path: Path, state_root: Path) -> None:
    ud = user_data(tmp_path)
    code, _, err = run_cli("seed", ud, "--user-data", ud, "--force")
    one_error(code, err, 2, "also the --user-data file")
    assert Path(ud).read_text() == "#cloud-config\n"


def test_seed_into_a_directory(run_cli, tmp_path: Path, state_root: Path) -> None:
    code, _, err = run_cli("seed", str(tmp_path) + "/", "--user-data", user_data(tmp_path))
    one_error(code, err, 2, "is a directory")


def test_seed_checks_ssh_keys(run_cli, tmp_path: Path, state_root: Path) -> None:
    out = tmp_path / "s.iso"
    code, _, err = run_cli(
        "seed", str(out), "--user-data", user_data(tmp_path), "--ssh-key", "not a key"
    )
    one_error(code, err, 2, "not a public key")
    assert not out.exists()


def test_restore_of_a_directory(run_cli, tmp_path: Path, state_root: Path) -> None:
    code, _, err = run_cli("restore", str(tmp_path))
    one_error(code, err, 2, "is a directory")


def test_kill_with_a_signal_out_of_range(run_cli, state_root: Path) -> None:
    for sig in ("999", "0", "64000000000000000000"):
        code, _, err = run_cli("kill", "web", "--signal", sig)
        one_error(code, err, 2, "not a signal")


def test_state_root_that_is_a_file(
    run_cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    for root in (f, f / "below"):
        monkeypatch.setenv("QLAUNCH_STATE", str(root))
        for args in (["list"], ["rm", "web"], ["status", "web"], ["save", "web", "x"]):
            code, _, err = run_cli(*args)
            one_error(code, err, 2, "is not a directory")


def test_profile_and_matrix_that_are_not_utf8(
    run_cli, tmp_path: Path, state_root: Path, no_boot: None
) -> None:
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(BASE.encode() + b"description = 'caf\xe9'\n")
    fails(run_cli("cmdline", str(bad)), 2, "not UTF-8")
    code, _, err = run_cli("exec", "--matrix", str(bad), "--", "true")
    one_error(code, err, 2, "not UTF-8")


def test_directory_or_fifo_as_profile_or_kernel(run_cli, tmp_path: Path, state_root: Path) -> None:
    d = tmp_path / "d.toml"
    d.mkdir()
    fifo = tmp_path / "f.toml"
    os.mkfifo(fifo)
    fails(run_cli("cmdline", str(d)), 2, "is a directory")
    fails(run_cli("cmdline", str(fifo)), 2, "FIFO")
    fails(run_cli("exec", "--kernel", str(tmp_path), "--", "true"), 2, "is a directory")
    fails(run_cli("exec", "--kernel", str(fifo), "--", "true"), 2, "FIFO")


def test_several_sets_name_the_bad_one(run_cli) -> None:
    code, _, err = run_cli(
        "cmdline", "default", "--set", "machine.memory=1G", "--set", "machine.smp=0"
    )
    one_error(code, err, 2, "--set machine.smp=0 on")


def test_image_create_of_size_zero(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "x.qcow2"
    fails(run_cli("image", "create", str(out), "0"), 2, "zero")
    assert not out.exists()


def test_qmp_timeout_zero(run_cli, state_root: Path) -> None:
    fails(run_cli("qmp", "web", "query-status", "--timeout", "0"), 2, "more than 0")


MATRIX_CASES = {
    "missing profile": '[[run]]\nprofile = "default"\n[[run]]\nprofile = "nosuch"\n',
    "bad set": '[[run]]\nprofile = "default"\nset = ["machine.smp=0"]\n',
    "cpus 0": '[[run]]\nprofile = "default"\ncpus = 0\n',
    "timeout -1": 'timeout = -1\n[[run]]\nprofile = "default"\n',
}


@pytest.mark.parametrize("body", MATRIX_CASES.values(), ids=list(MATRIX_CASES))
def test_matrix_cells_are_checked_before_any_boot(
    run_cli, tmp_path: Path, state_root: Path, no_boot: None, body: str
) -> None:
    m = tmp_path / "m.toml"
    m.write_text(body)
    code, out, err = run_cli("exec", "--matrix", str(m), "--", "true")
    one_error(code, err, 2)
    assert out == ""  # no result table


def test_exec_with_a_missing_second_profile_boots_nothing(
    run_cli, state_root: Path, no_boot: None
) -> None:
    code, _, err = run_cli("exec", "--profile", "default", "--profile", "nosuch", "--", "true")
    one_error(code, err, 2, "nosuch")


def test_exec_console_log_into_a_missing_directory(
    run_cli, tmp_path: Path, state_root: Path, no_boot: None
) -> None:
    log = tmp_path / "missing" / "x.log"
    code, _, err = run_cli("exec", "--console-log", str(log), "--", "true")
    one_error(code, err, 2, "does not exist")
    assert not log.parent.exists()


def test_exec_reports_do_not_overwrite_foreign_files(
    run_cli, tmp_path: Path, state_root: Path, own_cache: Path, no_boot: None
) -> None:
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    for flag in ("--console-log", "--junit", "--json"):
        code, _, err = run_cli("exec", flag, str(mine), "--", "true")
        one_error(code, err, 2, "did not write it")
    assert mine.read_text() == "mine"


def test_rm_of_no_vm_leaves_no_lock(run_cli, state_root: Path) -> None:
    fails(run_cli("rm", "nosuchvm"), 5, "no VM named nosuchvm")
    assert not (state_root / ".locks" / "nosuchvm.lock").exists()


def test_net_lock_leaves_no_namespace_directory(state_root: Path) -> None:
    from qlaunch.net import runtime

    with runtime.locked("lab0"):
        assert runtime.ns_dir("lab0").is_dir()
    assert not runtime.ns_dir("lab0").exists()
    assert not (state_root / ".networks").exists()


def test_leftover_of_a_killed_start_is_cleared(run_cli, state_root: Path) -> None:
    # What a start killed (SIGKILL) between making the VM's directory and its record leaves.
    (state_root / ".locks").mkdir(parents=True)
    (state_root / "web").mkdir()
    (state_root / ".locks" / "web.lock").write_text("")
    code, out, _ = run_cli("list")
    assert code == 0
    assert not (state_root / "web").exists()
    assert not (state_root / ".locks" / "web.lock").exists()


def test_double_dash_ends_options_for_commands_without_a_guest_command(
    run_cli, state_root: Path
) -> None:
    # Before: "`qlaunch stop` takes no command after --", so a VM named -x was out of reach.
    fails(run_cli("stop", "--", "-x"), 5, "no VM named -x")
    fails(run_cli("rm", "--", "-x"), 5, "no VM named -x")
    fails(run_cli("status", "--", "web"), 5, "no VM named web")
    fails(run_cli("stop", "web", "--", "ls"), 2, "unrecognized arguments: ls")


def test_names_that_cannot_be_typed_back_are_refused(run_cli, state_root: Path, no_boot) -> None:
    fails(run_cli("start", "default", "--name=-x"), 2, "'-x' is not a VM name")
    fails(run_cli("start", "default", "--name=exec-logs"), 2, "not a VM name")


def test_what_a_saved_vm_holds_is_never_written(
    run_cli, tmp_path: Path, state_root: Path, own_cache: Path
) -> None:
    import json
    import subprocess

    disk = tmp_path / "disk.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "1M"], check=True)
    saved = tmp_path / "vm.qlsave"
    saved.write_bytes(b"QLSAVE\x00\x01")
    d = state_root / "web"
    d.mkdir(parents=True)
    (d / "state.json").write_text(
        json.dumps(
            {
                "name": "web",
                "uuid": "u",
                "profile": "default",
                "state": "stopped",
                "saved": {"file": str(saved), "at": 0},
            }
        )
    )
    (d / "argv.json").write_text(json.dumps(["qemu", "-drive", f"file.filename={disk},if=none"]))
    before = disk.read_bytes(), saved.read_bytes()
    ud = user_data(tmp_path)
    fails(run_cli("image", "resize", str(disk), "2M"), 5, "the disk of VM web")
    fails(run_cli("seed", str(disk), "--user-data", ud, "--force"), 5, "the disk of VM web")
    fails(run_cli("seed", str(saved), "--user-data", ud, "--force"), 5, "save file of VM web")
    fails(run_cli("image", "create", str(d / "new.img"), "1M"), 5, "qlaunch's own state")
    assert (disk.read_bytes(), saved.read_bytes()) == before
    assert sorted(p.name for p in d.iterdir()) == ["argv.json", "state.json"]
