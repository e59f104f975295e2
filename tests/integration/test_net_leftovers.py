"""Issue 17: `net delete` leaves no `.networks/<netns>` directory holding only a lock."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab import namespace

pytestmark = pytest.mark.net


@pytest.fixture
def ns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    state = tmp_path / "state"
    monkeypatch.setenv("QLAUNCH_STATE", str(state))
    with namespace("qll", state) as name:
        monkeypatch.setenv("QLAUNCH_NETNS", name)
        yield name


def test_delete_leaves_no_namespace_directory(run_cli, ns: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    networks = tmp_path / "state" / ".networks"
    assert run_cli("net", "create", "lan", "--subnet", "10.78.0.0/24")[0] == 0
    assert run_cli("net", "start", "lan")[0] == 0
    assert (networks / ns / "lan").is_dir()
    code, _, err = run_cli("net", "delete", "lan")
    assert code == 0, err
    # Before: .networks/<netns>/ stayed behind with its .lock (and .networks/@host too).
    assert not networks.exists(), sorted(str(p) for p in networks.rglob("*"))
