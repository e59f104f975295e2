"""What users do that the feature tests did not: kill a foreground qlaunch, interrupt a
matrix, stop a VM they have only just started. Each must end its QEMUs and leave no files."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmlab import QLAUNCH, ok, ql, vmroot, wait_until  # noqa: F401

from qlaunch.vm import state

pytestmark = pytest.mark.boot

GUEST_WAIT = 180.0  # for QEMU to appear or go: TCG on two shared cores; never asserted on


@pytest.fixture
def scratch(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """TMPDIR and QLAUNCH_STATE of the test's own: qlaunch's per-run files land in TMPDIR,
    so QEMUs are found by it on their command lines, and an empty TMPDIR means no leftovers."""
    d = Path(tempfile.mkdtemp(prefix="qlup-", dir="/tmp"))
    (d / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(d / "tmp"))
    monkeypatch.setenv("QLAUNCH_STATE", str(d / "state"))
    try:
        yield d
    finally:
        for pid in qemus_of(d):
            with_pid_kill(pid)
        subprocess.run(["rm", "-rf", str(d)], check=False)


def qemus_of(d: Path) -> list[int]:
    """QEMU processes whose command line mentions d (their initramfs is in d/tmp)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        st = state.read_stat(int(entry))
        if st is None or st.zombie:
            continue
        if argv and b"qemu-system" in argv[0] and any(str(d).encode() in a for a in argv):
            found.append(int(entry))
    return found


def with_pid_kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*QLAUNCH, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigterm_to_run_ends_qemu_and_removes_its_files(scratch: Path) -> None:
    p = start("run", "default", "--", "sleep", "600")
    try:
        wait_until(lambda: qemus_of(scratch), GUEST_WAIT, "the guest's QEMU")
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)  # the guest's sleep would take 600 s
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGTERM
    assert err.rstrip().splitlines()[-1] == "qlaunch: terminated by SIGTERM"
    assert "Traceback" not in err
    wait_until(lambda: not qemus_of(scratch), GUEST_WAIT, "QEMU to end")
    assert list((scratch / "tmp").iterdir()) == []


def test_sigkill_to_exec_takes_its_qemu_along(scratch: Path) -> None:
    p = start("exec", "--", "sleep", "600")
    try:
        pids = wait_until(lambda: qemus_of(scratch), GUEST_WAIT, "the guest's QEMU")
        p.kill()
        p.wait(timeout=60)
    finally:
        p.kill()
    # Nothing can clean up after SIGKILL but the kernel: QEMU gets its parent-death signal.
    wait_until(lambda: not any(state.read_stat(pid) for pid in pids), GUEST_WAIT, "QEMU to end")


def test_sigterm_to_a_matrix_ends_every_run_now(scratch: Path) -> None:
    p = start("exec", "--profile", "default", "--profile", "x86_64-microvm", "--", "sleep", "600")
    try:
        wait_until(lambda: len(qemus_of(scratch)) == 2, GUEST_WAIT, "both runs' QEMUs")
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)  # waiting for the guests would take 600 s
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGTERM
    assert err.rstrip().splitlines()[-1] == "qlaunch: terminated by SIGTERM"
    # Runs we ended are not reported as guests that failed on their own.
    assert "without reporting" not in err and "Traceback" not in err
    wait_until(lambda: not qemus_of(scratch), GUEST_WAIT, "QEMUs to end")
    assert list((scratch / "tmp").iterdir()) == []


def test_stop_right_after_start_powers_off_by_acpi(vmroot: Path) -> None:  # noqa: F811
    # The guest is still booting when the first power button press comes; a second one, later,
    # finds it listening. Without it the stop waited out --timeout and then quit QEMU.
    ok("start", "default", "--name", "hasty")
    r = ql("stop", "hasty", "--timeout", "170")
    assert r.returncode == 0, r.stderr
    assert "qlaunch: hasty: acpi powerdown: the guest powered off" in r.stderr
    assert "qmp quit" not in r.stderr
    ok("rm", "hasty")


def test_modules_for_another_kernel_are_named(tmp_path: Path) -> None:
    # A stale `make modules_install` tree: its one version is still used, and the user is told
    # why each insmod in the guest will then fail with "invalid module format".
    from qlaunch.boot import assets
    from qlaunch.testloop import driver as testloop

    mods = tmp_path / "mods" / "lib" / "modules" / "0.0-other"
    (mods / "kernel").mkdir(parents=True)
    (mods / "modules.dep").write_text("")
    (tmp_path / "work").mkdir()
    spec = testloop.ExecSpec(cmd=("true",), kernel="asset:x86_64", modules=str(tmp_path / "mods"))
    plan = testloop.prepare(spec, tmp_path / "work")
    release = assets.require("x86_64").version
    assert (
        f"--modules {tmp_path / 'mods'} holds modules for 0.0-other, but the kernel is {release}: "
        "they will not load (make modules_install for this kernel?)"
    ) in plan.notes


def test_make_demo_runs_its_guest_command() -> None:
    # README's first command: `make demo` runs this line (the guest's command from the
    # Makefile, with the venv's qlaunch); a command that fails in the guest fails the demo.
    import re
    import shlex

    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    line = re.search(r"^demo:.*\n\t(.+)$", makefile, re.M)
    assert line, "the Makefile has a demo target with one command"
    argv = shlex.split(line.group(1))
    assert argv[0] == "$(BIN)/qlaunch"
    r = subprocess.run([*QLAUNCH, *argv[1:]], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.stdout.startswith("Linux qlaunch ") and "model name" in r.stdout, r.stdout
