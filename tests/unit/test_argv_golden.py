"""Golden launch plans: one file per case and entry, one option per line.
QLAUNCH_REGEN_GOLDEN=1 (`make golden`) rewrites them; review the diff."""

from __future__ import annotations

import os

import pytest
from goldens import GOLDEN, Case, cases, one_option_per_line, render

REGEN = os.environ.get("QLAUNCH_REGEN_GOLDEN") == "1"
CASES = cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden(case: Case) -> None:
    got = one_option_per_line(render(case)[1].argv)
    golden = GOLDEN / f"{case.name}.argv"
    if REGEN:
        golden.write_text(got)
    assert golden.exists(), f"no golden file {golden}: run `make golden` and review the diff"
    assert got == golden.read_text()


def test_no_unused_golden_files() -> None:
    names = {c.name for c in CASES}
    unused = sorted(p.name for p in GOLDEN.glob("*.argv") if p.stem not in names)
    if REGEN:
        for n in unused:
            (GOLDEN / n).unlink()
        unused = []
    assert not unused, f"golden files without a case: {unused}"


def test_every_entry_is_rendered() -> None:
    from qlaunch.launch import plan

    entries = {c.entry if c.entry in plan.ENTRIES else c.entry.split("-")[0] for c in CASES}
    assert entries == set(plan.ENTRIES)


def test_start_plan_names_its_sockets_and_monitor() -> None:
    (case,) = [c for c in CASES if c.name == "default.start"]
    p = render(case)[1]
    assert "-S" in p.argv and "-uuid" in p.argv
    assert [s.what for s in p.sockets] == ["QMP", "serial console", "guest agent"]
    assert [f.what for f in p.fds] == ["supervisor monitor (QMP)"]


def test_exec_plan_names_its_ports() -> None:
    (case,) = [c for c in CASES if c.name == "default.exec"]
    p = render(case)[1]
    assert [f.what for f in p.fds] == [
        f"virtio console port qlaunch.{n}" for n in ("stdout", "stderr", "status")
    ]
    assert "qlaunch.exec=ports" in (p.kernel_cmdline or "")
