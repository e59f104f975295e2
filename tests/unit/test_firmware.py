"""Firmware selection from QEMU firmware descriptors: precedence, matching, features, errors."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from qlaunch.boot import firmware as fw
from qlaunch.errors import HostError, UsageError

DATA = Path(__file__).parent / "data" / "firmware"
USER, ETC, SHARE = str(DATA / "user"), str(DATA / "etc"), str(DATA / "share")
ALL = (USER, ETC, SHARE)


def descs(dirs: tuple[str, ...] = ALL, missing: tuple[str, ...] = ()) -> list[fw.Descriptor]:
    return fw.load_descriptors(dirs, exists=lambda p: p not in missing)


def pick(arch: str, machine: str, wanted: str, **kw: object) -> fw.FirmwareChoice:
    return fw.select(descs(**kw), arch, machine, wanted)  # type: ignore[arg-type]


def test_files_in_name_order_with_overrides_and_masks() -> None:
    files = fw.descriptor_files(ALL)
    names = [os.path.basename(f) for f in files]
    assert names == sorted(names)
    assert "README" not in names
    # /etc's file of the same name shadows the package's one
    assert os.path.join(ETC, "60-x86_64.json") in files
    assert os.path.join(SHARE, "60-x86_64.json") not in files
    # an empty file in a higher directory hides the name everywhere
    assert "40-aarch64-secure-enrolled.json" not in names
    assert os.path.join(ETC, "55-x86_64-qcow2.json") in files


def test_broken_descriptor_is_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="qlaunch.firmware"):
        loaded = descs()
    assert "20-broken.json" not in [d.name for d in loaded]
    assert "20-broken.json: not JSON" in caplog.text


def test_override_directory_wins() -> None:
    c = pick("x86_64", "q35", "uefi")
    assert (c.code, c.vars_template) == ("/etc-fw/CODE.fd", "/etc-fw/VARS.fd")
    assert c.descriptor == os.path.join(ETC, "60-x86_64.json")
    assert (c.kind, c.secure_boot, c.requires_smm, c.format) == ("uefi", False, False, "raw")


def test_file_name_order_across_directories() -> None:
    # /etc's 55-... sorts before the 60-... that also matches i440fx
    c = pick("x86_64", "pc", "uefi")
    assert c.code == "/etc-fw/CODE.qcow2"
    assert (c.format, c.vars_format) == ("qcow2", "qcow2")


def test_uefi_secure_takes_enrolled_keys_and_smm() -> None:
    c = pick("x86_64", "q35", "uefi-secure")
    assert c.descriptor == os.path.join(SHARE, "40-x86_64-secure-enrolled.json")
    assert (c.code, c.vars_template) == ("/fw/x86/CODE.secboot.fd", "/fw/x86/VARS.ms.fd")
    assert c.secure_boot and c.requires_smm


def test_plain_uefi_never_takes_a_secure_boot_build() -> None:
    c = pick("x86_64", "q35", "uefi", dirs=(SHARE,))
    assert c.descriptor == os.path.join(SHARE, "60-x86_64.json")
    assert not c.secure_boot


def test_versioned_machine_and_alias_both_match() -> None:
    assert pick("x86_64", "pc-q35-7.2", "uefi") == pick("x86_64", "q35", "uefi")
    assert fw.machine_matches("virt", "virt-*")
    assert fw.machine_matches("virt-2.12", "virt-2.*")
    # an alias's version is unknown: it cannot satisfy a pattern that names some versions
    assert not fw.machine_matches("virt", "virt-2.*")
    assert not fw.machine_matches("q35", "pc-i440fx-*")


def test_aarch64_secure_hidden_by_user_leaves_only_unenrolled() -> None:
    assert pick("aarch64", "virt", "uefi").code == "/fw/aa/CODE.fd"
    with pytest.raises(UsageError) as e:
        pick("aarch64", "virt", "uefi-secure")
    assert e.value.exit_code == 2
    assert "Secure Boot and enrolled keys for machine 'virt' (aarch64)" in e.value.message
    # without the user's mask the enrolled build is there again
    c = pick("aarch64", "virt", "uefi-secure", dirs=(ETC, SHARE))
    assert c.code == "/fw/aa/CODE.ms.fd" and c.secure_boot and not c.requires_smm


def test_descriptor_with_missing_files_is_passed_over() -> None:
    c = pick("aarch64", "virt-2.12", "uefi", missing=("/fw/aa/CODE.fd",))
    assert (c.code, c.format) == ("/fw/aa/OLD_CODE.qcow2", "qcow2")
    with pytest.raises(HostError) as e:
        pick("aarch64", "virt", "uefi-secure", dirs=(SHARE,), missing=("/fw/aa/VARS.ms.fd",))
    assert e.value.exit_code == 3
    assert "/fw/aa/VARS.ms.fd" in e.value.message
    assert "qemu-efi-aarch64" in (e.value.hint or "")


def test_uefi_secure_on_i440fx_is_bad_input() -> None:
    with pytest.raises(UsageError) as e:
        pick("x86_64", "pc", "uefi-secure")
    assert e.value.exit_code == 2
    assert "q35" in (e.value.hint or "")


def test_machine_no_descriptor_covers() -> None:
    with pytest.raises(UsageError) as e:
        pick("x86_64", "microvm", "uefi")
    assert e.value.exit_code == 2
    assert "no UEFI firmware for machine 'microvm' (x86_64)" in e.value.message
    assert "pc-q35-*" in (e.value.hint or "")


def test_stateless_flash_is_not_used() -> None:
    chosen = {pick("x86_64", "q35", w, dirs=(SHARE,)).code for w in ("uefi", "uefi-secure")}
    assert "/fw/x86/STATELESS.fd" not in chosen


@pytest.mark.parametrize("arch", ["aarch64", "arm"])
def test_bios_on_arm_is_bad_input(arch: str) -> None:
    with pytest.raises(UsageError) as e:
        pick(arch, "virt", "bios")
    assert e.value.exit_code == 2
    assert f"no BIOS for {arch}" in e.value.message


def test_unknown_firmware_name() -> None:
    with pytest.raises(UsageError) as e:
        pick("x86_64", "q35", "efi")
    assert e.value.exit_code == 2
    assert "unknown firmware 'efi'" in e.value.message
    assert "uefi-secure" in (e.value.hint or "")


@pytest.mark.parametrize(
    ("arch", "package"),
    [("x86_64", "ovmf"), ("aarch64", "qemu-efi-aarch64"), ("arm", "qemu-efi-arm")],
)
def test_missing_package_is_named(tmp_path: Path, arch: str, package: str) -> None:
    with pytest.raises(HostError) as e:
        fw.choose(arch, "virt" if arch != "x86_64" else "q35", "uefi", dirs=(str(tmp_path),))
    assert e.value.exit_code == 3
    assert f"no UEFI firmware for {arch} guests is installed" in e.value.message
    assert e.value.hint == f"apt-get install {package}"


def test_all_files_gone_names_package_and_files() -> None:
    gone = ("/etc-fw/CODE.fd", "/etc-fw/CODE.qcow2", "/fw/x86/CODE.secboot.fd")
    with pytest.raises(HostError) as e:
        pick("x86_64", "q35", "uefi", missing=gone)
    assert "/etc-fw/CODE.fd" in e.value.message and e.value.hint == "apt-get install ovmf"


def test_bios_from_a_memory_descriptor_or_qemus_own() -> None:
    c = pick("x86_64", "pc", "bios")
    assert (c.kind, c.device, c.code) == ("bios", "memory", "/fw/bios-256k.bin")
    assert fw.qemu_args(c, None) == fw.FirmwareArgs(args=("-bios", "/fw/bios-256k.bin"))
    default = pick("x86_64", "q35", "bios")
    assert default.code is None and default.descriptor is None
    assert fw.qemu_args(default, None) == fw.FirmwareArgs()


def test_qemu_args_split_flash_escapes_commas() -> None:
    c = fw.FirmwareChoice("uefi", "/a,b/CODE.fd", "/t/VARS.fd", "raw", "qcow2", False, False, "d")
    got = fw.qemu_args(c, "/run/vm,1/vars.qcow2")
    assert got.machine_opts == ()
    assert got.args == (
        "-drive",
        "if=pflash,format=raw,unit=0,readonly=on,file=/a,,b/CODE.fd",
        "-drive",
        "if=pflash,format=qcow2,unit=1,file=/run/vm,,1/vars.qcow2",
    )


def test_qemu_args_smm_build() -> None:
    got = fw.qemu_args(pick("x86_64", "q35", "uefi-secure"), "/v.fd")
    assert got.machine_opts == ("smm=on",)
    assert got.args[-2:] == ("-global", "driver=cfi.pflash01,property=secure,value=on")
    # Secure Boot without SMM (aarch64): no SMM, no secure flash
    aa = fw.qemu_args(pick("aarch64", "virt", "uefi-secure", dirs=(SHARE,)), "/v.fd")
    assert aa.machine_opts == () and "-global" not in aa.args


def test_ensure_vars_copies_once_and_keeps_the_vms_own(tmp_path: Path) -> None:
    template = tmp_path / "VARS.fd"
    template.write_bytes(b"template")
    c = fw.FirmwareChoice("uefi", "/c", str(template), "raw", "raw", False, False, "d")
    dest = tmp_path / "vm" / "efivars.fd"
    assert fw.ensure_vars(c, dest) is True
    assert dest.read_bytes() == b"template"
    dest.write_bytes(b"changed by the guest")
    assert fw.ensure_vars(c, dest) is False
    assert dest.read_bytes() == b"changed by the guest"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["efivars.fd"]


def test_ensure_vars_template_missing(tmp_path: Path) -> None:
    c = fw.FirmwareChoice("uefi", "/c", str(tmp_path / "nope"), "raw", "raw", False, False, "d")
    with pytest.raises(HostError):
        fw.ensure_vars(c, tmp_path / "v.fd")
    assert list(tmp_path.iterdir()) == []


def test_auto() -> None:
    assert fw.resolve_auto("x86_64", kernel=True, disk=True) is None
    assert fw.resolve_auto("x86_64", kernel=False, disk=True) == "bios"
    assert fw.resolve_auto("aarch64", kernel=False, disk=True) == "uefi"
    with pytest.raises(UsageError, match="nothing to boot"):
        fw.resolve_auto("arm", kernel=False, disk=False)


def test_this_hosts_debian_descriptors() -> None:
    """The packages .ci/setup-host installs: what a profile on this host gets."""
    assert fw.choose("x86_64", "q35", "uefi").code == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    sec = fw.choose("x86_64", "q35", "uefi-secure")
    assert sec.vars_template == "/usr/share/OVMF/OVMF_VARS_4M.ms.fd" and sec.requires_smm
    assert fw.choose("aarch64", "virt", "uefi").code == "/usr/share/AAVMF/AAVMF_CODE.fd"
    # Debian's 50-edk2-aarch64-secure.json names an AAVMF_CODE.secboot.fd it does not ship
    assert fw.choose("aarch64", "virt", "uefi-secure").code == "/usr/share/AAVMF/AAVMF_CODE.ms.fd"
    assert fw.choose("arm", "virt", "uefi").code == "/usr/share/AAVMF/AAVMF32_CODE.fd"
