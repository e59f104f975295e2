"""Real boots under TCG: `qlaunch run PROFILE -- CMD` shows the guest's output and its status."""

from __future__ import annotations

import subprocess

import pytest

pytestmark = pytest.mark.boot


@pytest.mark.parametrize(
    ("profile", "arch_word"),
    [("default", "x86_64"), ("aarch64-virt", "aarch64"), ("arm-virt", "armv7l")],
)
def test_run_command_shows_output_and_status(
    qlaunch_bin: list[str], profile: str, arch_word: str
) -> None:
    r = subprocess.run(
        [*qlaunch_bin, "run", profile, "--", "sh", "-c", 'uname -m; echo "two  words"; exit 42'],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 42, r.stderr
    lines = [line.strip() for line in r.stdout.splitlines()]
    assert arch_word in lines
    assert "two  words" in lines
    assert "QLAUNCH_EXIT" not in r.stdout
    # Said once, on one line (it was said twice): the accelerator and nothing else.
    assert r.stderr.count("using TCG") == 1 and len(r.stderr.splitlines()) == 1, r.stderr


def test_run_without_command_powers_off_cleanly(run_shell) -> None:  # type: ignore[no-untyped-def]
    # No command: the init gives a shell on the console, fed here through a pipe as a user's
    # terminal would; typing poweroff ends the run with 0.
    code, out, _ = run_shell("default", b"echo shell-is-$((40+2))\npoweroff\n", timeout=60)
    assert code == 0
    assert b"shell-is-42" in out


def test_qemu_failure_is_reported(qlaunch_bin: list[str]) -> None:
    r = subprocess.run(
        [*qlaunch_bin, "run", "default", "--set", 'qemu.extra=["-bogus-option"]', "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 4
    assert "QEMU failed" in r.stderr
    assert "-bogus-option" in r.stderr
    assert "Traceback" not in r.stderr
