"""Firmware, boot order and TPM through qlaunch itself, on Debian's kernels under TCG: what a
guest sees (EFI, Secure Boot, /dev/tpm0, the boot order QEMU hands its firmware), and what
qlaunch keeps (a VM's UEFI variables across a stop and a start, gone with `rm`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from vmlab import QLAUNCH, ql, vmroot  # noqa: F401

from qlaunch import paths
from qlaunch.vm import VM

pytestmark = pytest.mark.boot

# The EFI variable a guest writes: attributes (NV+BS+RT = 7) then the data.
VAR = "QlaunchTest-3d1b5c2e-7f4a-4e1b-9c7d-2a6f8e0b1c3d"
EFIVARS = "/sys/firmware/efi/efivars"


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return ql(*args, timeout=timeout)


def test_uefi_boot_hands_the_firmware_the_boot_order(tmp_path: Path) -> None:
    disk, cd = tmp_path / "disk.qcow2", tmp_path / "installer.iso"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    cd.write_bytes(b"\0" * (1 << 20))
    r = run(
        "run", "default",
        "--set", "boot.firmware=uefi",
        "--set", "machine.memory=512M",
        "--set", f"disk.0.path={disk}",
        "--set", f"disk.1.path={cd}",
        "--set", "disk.1.media=cdrom",
        "--set", 'boot.order=["cdrom", "disk"]',
        "--set", 'boot.modules=["qemu_fw_cfg"]',
        "--",
        "sh", "-c",
        "test -d /sys/firmware/efi && echo EFI; tr '\\0' '\\n' "
        "< /sys/firmware/qemu_fw_cfg/by_name/bootorder/raw",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = [x.strip() for x in r.stdout.splitlines() if x.strip().startswith(("EFI", "/"))]
    assert lines[0] == "EFI", r.stdout
    # The kernel QEMU loads for the firmware (bootindex 0), then as [boot] order says: the
    # CD-ROM (on virtio-scsi), then the disk (virtio-blk).
    assert lines[1] == "/rom@genroms/linuxboot_dma.bin", lines
    assert "scsi@" in lines[2] and "/channel@0/disk@0,0" in lines[2], lines
    assert lines[3].startswith("/pci@i0cf8/scsi@1/disk@0"), lines
    assert len(lines) == 4, lines


def test_secure_boot_and_a_tpm(tmp_path: Path) -> None:
    r = run(
        "run", "default",
        "--set", "boot.firmware=uefi-secure",
        "--set", "machine.tpm=true",
        "--set", "machine.memory=512M",
        "--",
        "sh", "-c", "dmesg | grep -o 'Secure boot enabled'; ls /dev/tpm0",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Secure boot enabled" in r.stdout and "/dev/tpm0" in r.stdout, r.stdout
    # swtpm ended with QEMU.
    assert subprocess.run(["pgrep", "-x", "swtpm"], capture_output=True).returncode == 1


def test_aarch64_boots_with_uefi() -> None:
    # (A TPM on virt is a tpm-tis-device, which Debian's arm64 kernel has no driver for:
    # CONFIG_TCG_TIS is not set. The golden case pins its argv; QEMU accepts it there.)
    r = run(
        "run", "aarch64-virt",
        "--set", "boot.firmware=uefi",
        "--", "sh", "-c", "test -d /sys/firmware/efi && echo EFI",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "EFI" in r.stdout, r.stdout


def test_a_vms_uefi_variables_outlive_a_stop(vmroot: Path) -> None:  # noqa: F811
    write = (
        f"mount -t efivarfs none {EFIVARS} && "
        f"printf '\\007\\000\\000\\000kept' > {EFIVARS}/{VAR} && echo written"
    )
    read = f"mount -t efivarfs none {EFIVARS} && tail -c 4 {EFIVARS}/{VAR}; echo"
    common = ["--set", "boot.firmware=uefi", "--set", "machine.memory=512M"]
    common += ["--set", 'boot.modules=["efivarfs"]']
    for cmd, want in ((write, "written"), (read, "kept")):
        # A start with a command: the guest runs it and powers off, the VM ends `stopped`.
        r = ql("start", "default", "--name", "efi", *common, "--", "sh", "-c", cmd)
        assert r.returncode == 0, r.stderr
        VM.get("efi").wait(timeout=240)
        log = (vmroot / "efi" / "console.log").read_text(errors="replace")
        assert want in log, log[-2000:]
        store = paths.vm_data_dir("efi") / "efivars.fd"
        assert store.is_file()
        # The store lives outside the runtime state: a new start of the name finds it.
        assert not str(store).startswith(str(vmroot))
    assert "QlaunchTest".encode("utf-16-le") in store.read_bytes()
    assert ql("rm", "efi").returncode == 0
    assert not store.parent.exists()


@pytest.mark.parametrize(
    ("profile", "sets", "code", "words"),
    [
        ("default", ["boot.firmware=coreboot"], 2, "not one of auto, bios, uefi, uefi-secure"),
        ("aarch64-virt", ["boot.firmware=bios"], 2, "no BIOS for aarch64"),
        ("raspi3b", ["boot.firmware=uefi-secure"], 2, "no UEFI firmware for machine"),
        ("default", ["boot.kernel=", "boot.initrd="], 2, "nothing to boot"),
        ("default", ['boot.order=["floppy"]'], 2, "not a boot device"),
        ("x86_64-microvm", ["machine.tpm=true"], 2, "no TPM for machine microvm"),
    ],
)
def test_bad_machines_are_refused_before_anything_starts(
    vmroot: Path,  # noqa: F811
    profile: str,
    sets: list[str],
    code: int,
    words: str,
) -> None:
    args = [x for s in sets for x in ("--set", s)]
    for cmd in (["cmdline", profile, "--for", "start"], ["start", profile, "--name", "bad"]):
        r = run(*cmd, *args)
        assert r.returncode == code, (cmd, r.stderr)
        assert words in r.stderr and len(r.stderr.strip().splitlines()) <= 2, r.stderr
        assert "Traceback" not in r.stderr
    assert not (vmroot / "bad").exists()
    assert not paths.vm_data_dir("bad").exists()


def test_a_missing_swtpm_is_named(tmp_path: Path) -> None:
    # A PATH without swtpm, and QEMU still found: the host lacks it, exit 3.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "qemu-system-x86_64").symlink_to("/usr/bin/qemu-system-x86_64")
    env = dict(os.environ, PATH=str(bin_dir))
    r = subprocess.run(
        [*QLAUNCH, "cmdline", "default", "--set", "machine.tpm=true"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert r.returncode == 3, r.stderr
    assert "swtpm" in r.stderr and "apt-get install swtpm" in r.stderr
