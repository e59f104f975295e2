from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# A suite started in the background by a non-interactive shell (`make test &`, a CI runner's
# script) inherits SIGINT ignored, and so would every qlaunch the tests start: their Ctrl-C
# tests would send a signal nobody hears. A handled signal goes back to its default in a
# child at exec, an ignored one stays ignored.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """Run `qlaunch ARGS` in-process; returns (exit code, stdout, stderr)."""
    from qlaunch.cli.app import main

    def call(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return call


@pytest.fixture
def qlaunch_bin() -> list[str]:
    """The installed console script when present, so tests exercise it as a user would."""
    exe = Path(sys.executable).parent / "qlaunch"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "qlaunch"]


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    # A user's own ~/.config profiles must not change what tests see; the asset cache is shared.
    monkeypatch.setenv("QLAUNCH_CONFIG", str(tmp_path_factory.mktemp("config")))
    # Persistent VM data (UEFI variables, TPM state, autostart definitions) likewise.
    monkeypatch.setenv("QLAUNCH_DATA", str(tmp_path_factory.mktemp("data")))
    # Autostart writes systemd units: never into the host's /etc/systemd/system from a test.
    monkeypatch.setenv("QLAUNCH_SYSTEMD_DIR", str(tmp_path_factory.mktemp("systemd")))
    os.environ.setdefault("QLAUNCH_TEST", "1")


@pytest.fixture
def run_shell(qlaunch_bin: list[str]):  # type: ignore[no-untyped-def]
    """`qlaunch run PROFILE` with no command: wait for the guest's shell, type `text` into the
    console as a user's terminal would, and return (exit code, all stdout, stderr)."""

    def call(profile: str, text: bytes, timeout: float = 120) -> tuple[int, bytes, bytes]:
        proc = subprocess.Popen(
            [*qlaunch_bin, "run", profile],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None and proc.stdin is not None
            seen = b""
            while b"shell on the console" not in seen:
                chunk = proc.stdout.read1(4096)
                assert chunk, f"QEMU ended before the shell: {seen[-500:]!r}"
                seen += chunk
            proc.stdin.write(text)
            proc.stdin.flush()
            out, err = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return proc.returncode, seen + out, err

    return call
