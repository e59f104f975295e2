from __future__ import annotations

from pathlib import Path

import pytest

from qlaunch import names
from qlaunch.config import profile
from qlaunch.config.settings import SECTIONS, reference_markdown, size_bytes
from qlaunch.launch import argv as argvmod
from qlaunch.launch.host import HostFacts, Verdict

REPO = Path(__file__).resolve().parent.parent.parent


def test_extends_merges_tables_and_set_wins(tmp_path: Path) -> None:
    (tmp_path / "base.toml").write_text('[machine]\nmemory = "512M"\nsmp = 2\n')
    (tmp_path / "child.toml").write_text('extends = "base"\n[machine]\nsmp = 3\n')
    p = profile.load(str(tmp_path / "child.toml"), ["machine.memory=1G"])
    assert (p.machine.smp, p.machine.memory_mib) == (3, 1024)


def test_set_adds_array_entries(tmp_path: Path) -> None:
    p = profile.load("default", ["disk.0.path=/x,y.img", "disk.0.readonly=true"])
    assert p.disks[0].path == "/x,y.img"
    assert p.disks[0].readonly
    assert p.disks[0].format == "raw"


@pytest.mark.parametrize(
    ("text", "n"),
    [("512M", 512 << 20), ("2G", 2 << 30), ("1.5G", 3 << 29), ("4096", 4096), ("1GiB", 1 << 30)],
)
def test_sizes(text: str, n: int) -> None:
    assert size_bytes(text) == n


def test_memory_as_bare_number_means_mib(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text("[machine]\nmemory = 300\n")
    assert profile.load(str(tmp_path / "p.toml")).machine.memory_mib == 300


def test_boards_fill_in_limits() -> None:
    p = profile.build({"machine": {"arch": "aarch64", "machine": "raspi3b"}}, name="r", source="r")
    assert (p.machine.smp, p.machine.memory_mib) == (4, 1024)


def test_escape_doubles_commas() -> None:
    assert argvmod.esc("a,b,,c") == "a,,b,,,,c"


def test_stable_mac() -> None:
    a = names.stable_mac("vm1", 0)
    assert a == names.stable_mac("vm1", 0)
    assert a != names.stable_mac("vm1", 1)
    assert a.startswith("52:54:00:")


def test_accel_auto_falls_back_with_reason() -> None:
    p = profile.load("default")
    host = HostFacts(arch="x86_64", kvm=Verdict(False, "/dev/kvm is provided by kvm_pvm"))
    accel, note = argvmod.choose_accel(p, host)
    assert accel == "tcg"
    assert note is not None and "kvm_pvm" in note


def test_readme_profile_reference_matches_settings_table() -> None:
    readme = (REPO / "README.md").read_text()
    assert reference_markdown() in readme, "README's profile reference is stale: regenerate it"


def test_every_setting_has_help() -> None:
    for keys in SECTIONS.values():
        for s in keys.values():
            assert s.help
