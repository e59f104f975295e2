from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """Run `qlaunch ARGS` in-process; returns (exit code, stdout, stderr)."""
    from qlaunch.cli import main

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
    os.environ.setdefault("QLAUNCH_TEST", "1")
