"""Profile keys for disks and [cloud-init]: what validates, what is refused, and how it reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlaunch.config import profile
from qlaunch.config.profile import SEED_PLACEHOLDER

BASE = 'extends = "default"\n'


def load(tmp_path: Path, body: str, sets: list[str] | None = None) -> profile.Profile:
    p = tmp_path / "p.toml"
    p.write_text(BASE + body)
    return profile.load(str(p), sets)


def test_size_and_format_from_name(tmp_path: Path) -> None:
    p = load(
        tmp_path,
        '[[disk]]\npath = "a.qcow2"\nsize = "1.5G"\n'
        '[[disk]]\npath = "b.vdi"\nsize = 1048576\n'
        '[[disk]]\npath = "c.vmdk"\n'
        '[[disk]]\npath = "d.img"\n',
    )
    assert [(d.format, d.size) for d in p.disks] == [
        ("qcow2", 3 << 29),
        ("vdi", 1 << 20),
        ("vmdk", None),
        ("raw", None),
    ]


def test_cache_defaults_to_writeback(tmp_path: Path) -> None:
    assert load(tmp_path, '[[disk]]\npath = "a.raw"\n').disks[0].cache == "writeback"


@pytest.mark.parametrize(
    "extra", ["snapshot = true", "readonly = true", 'media = "cdrom"', "force_unsafe = true"]
)
def test_unsafe_is_allowed_where_no_data_is_at_stake_or_forced(tmp_path: Path, extra: str) -> None:
    p = load(tmp_path, f'[[disk]]\npath = "a.raw"\ncache = "unsafe"\n{extra}\n')
    assert p.disks[0].cache == "unsafe"


def test_unsafe_on_a_persistent_disk_is_refused(run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "p.toml"
    path.write_text(BASE + '[[disk]]\npath = "root.qcow2"\ncache = "unsafe"\n')
    code, out, err = run_cli("cmdline", str(path))
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0] == (
        f'qlaunch: error: {path}: [[disk]] #0 cache: "unsafe" ignores the guest\'s flushes, so '
        "a crash of QEMU or the host can corrupt root.qcow2 (hint: add snapshot = true for a "
        "throwaway disk, or force_unsafe = true on this disk if its data is expendable)"
    )


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        ('[[disk]]\npath = "a.raw"\nsize = "12X"\n', "[[disk]] #0 size: bad size '12X'"),
        (
            '[[disk]]\npath = "a.raw"\nsize = 1000\n',
            "[[disk]] #0 size: 1000 is not a whole number of 512-byte sectors",
        ),
        (
            '[[disk]]\npath = "a.raw"\nsize = "0"\n',
            "[[disk]] #0 size: '0' is not a whole number of 512-byte sectors",
        ),
        (
            '[[disk]]\npath = "a.iso"\nmedia = "cdrom"\nsize = "1G"\n',
            "[[disk]] #0 size: a read-only disk or CD-ROM cannot start as a new empty image",
        ),
        ("[cloud-init]\nhostname = 'bad_name'\n", "[cloud-init] bad hostname 'bad_name'"),
        ('[cloud-init]\nssh_authorized_keys = ["a\\nb"]\n', "[cloud-init] bad ssh authorized key"),
        ("[cloud-init]\nusr_data = 'x'\n", "[cloud-init] unknown key 'usr_data'"),
    ],
)
def test_bad_disk_and_cloud_init_keys(run_cli, tmp_path: Path, body: str, expect: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "p.toml"
    path.write_text(BASE + body)
    code, _, err = run_cli("cmdline", str(path))
    assert code == 2, err
    assert f"qlaunch: error: {path}: {expect}" in err
    assert "Traceback" not in err


def test_sd_size_must_be_a_power_of_two(tmp_path: Path) -> None:
    body = '[machine]\narch = "arm"\nmachine = "vexpress-a9"\n[[disk]]\npath = "sd.img"\n'
    (tmp_path / "p.toml").write_text('[boot]\nkernel = "k"\n' + body + 'size = "100M"\n')
    with pytest.raises(profile.ProfileError) as exc:
        profile.load(str(tmp_path / "p.toml"))
    assert "SD card images must be a power of two in size, not 100M" in exc.value.message
    assert exc.value.hint == 'size = "128M"'


def test_cloud_init_attaches_a_seed_cdrom_last(tmp_path: Path) -> None:
    p = load(
        tmp_path,
        '[[disk]]\npath = "root.qcow2"\n[cloud-init]\nhostname = "vm1"\n',
        ["cloud-init.ssh_authorized_keys=['ssh-ed25519 AAAA k@h']"],
    )
    assert p.cloud_init == profile.CloudInit("vm1", ("ssh-ed25519 AAAA k@h",), None, None)
    root, seed = p.disks
    assert not root.cloud_init_seed
    assert seed.cloud_init_seed and seed.media == "cdrom" and seed.readonly
    assert seed.path == SEED_PLACEHOLDER


def test_an_empty_cloud_init_table_still_seeds(tmp_path: Path) -> None:
    p = load(tmp_path, "[cloud-init]\n")
    assert p.cloud_init == profile.CloudInit(None, (), None, None)
    assert [d.cloud_init_seed for d in p.disks] == [True]
    assert load(tmp_path, "").cloud_init is None


def test_cloud_init_on_an_sd_only_board(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(
        '[machine]\narch = "aarch64"\nmachine = "raspi3b"\nmemory = "1G"\n[cloud-init]\n'
    )
    with pytest.raises(profile.ProfileError, match="only an SD card slot, no bus for the seed"):
        profile.load(str(tmp_path / "p.toml"))
