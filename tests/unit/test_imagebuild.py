"""`qlaunch image build`: what is refused before anything is made, the recipe's pieces, and
the progress display. (The build itself: tests/integration/test_image_build.py.)"""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlaunch.cli.commands.imagebuild import StepProgress
from qlaunch.errors import HostError, StateError
from qlaunch.storage import build

GIB = 1 << 30


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "aarch64", "--firmware", "bios"], "there is no BIOS for aarch64"),
        (["--size", "1G"], "size 1G is too small"),
        (["--size", "3000000001"], "not a whole number of MiB"),
        (["--size", "lots"], "bad size 'lots'"),
        (["--mirror", "ftp://x/debian"], "is not an http(s) or file URL"),
    ],
)
def test_bad_input_is_refused_first(run_cli, tmp_path: Path, args: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "d.qcow2"
    code, stdout, err = run_cli("image", "build", "debian", *args, str(out))
    assert code == 2, err
    assert err.startswith("qlaunch: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_unknown_distribution_and_arch(run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for args in (["fedora"], ["debian", "--arch", "riscv64"]):
        code, _, err = run_cli("image", "build", *args, str(tmp_path / "d.qcow2"))
        assert code == 2 and "invalid choice" in err, err


def test_existing_output_needs_force(run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "d.qcow2"
    out.write_bytes(b"precious")
    code, _, err = run_cli("image", "build", "debian", str(out))
    assert code == 2
    assert "exists" in err and "refusing to overwrite" in err
    assert "--force" in err
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.qcow2"]


def test_output_that_is_a_directory_or_in_no_directory(run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("image", "build", "debian", str(tmp_path))
    assert code == 2 and "is a directory" in err, err
    code, _, err = run_cli("image", "build", "debian", str(tmp_path / "no" / "d.qcow2"))
    assert code == 2 and "does not exist" in err, err


def test_force_never_replaces_a_file_a_process_holds(tmp_path: Path) -> None:
    out = tmp_path / "d.qcow2"
    out.write_bytes(b"in use")
    holder = subprocess.Popen(
        [sys.executable, "-c", f"f = open({str(out)!r}); import time; time.sleep(60)"]
    )
    try:
        deadline = time.monotonic() + 10
        while not any(
            os.path.realpath(f"/proc/{holder.pid}/fd/{fd}") == str(out)
            for fd in os.listdir(f"/proc/{holder.pid}/fd")
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(StateError) as e:
            build.check_output(str(out), force=True)
        assert e.value.exit_code == 5
        assert f"pid {holder.pid}" in e.value.message
    finally:
        holder.kill()
        holder.wait()
    assert out.read_bytes() == b"in use"


def test_force_asks_the_callers_holder_check(tmp_path: Path) -> None:
    out = tmp_path / "d.qcow2"
    out.write_bytes(b"a disk of VM web")

    def held(path: str) -> None:
        raise StateError(f"{path} is the disk of VM web")

    with pytest.raises(StateError, match="the disk of VM web"):
        build.check_output(str(out), force=True, check_held=held)
    assert build.check_output(str(out), force=True) == str(out)


def test_host_checks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec = build.Spec("x86_64", "uefi")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(HostError, match="needs root"):
        build.check_host(spec, str(tmp_path))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    real_which = build.shutil.which
    monkeypatch.setattr(
        build.shutil, "which", lambda t: None if t in ("mmdebstrap", "mcopy") else real_which(t)
    )
    with pytest.raises(HostError) as e:
        build.check_host(spec, str(tmp_path))
    assert e.value.exit_code == 3
    assert e.value.message == "image build needs mmdebstrap, mtools"
    assert e.value.hint == "apt-get install mmdebstrap mtools"


def test_foreign_arch_needs_binfmt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(build, "binfmt_ready", lambda entry: False)
    with pytest.raises(HostError) as e:
        build.check_host(build.Spec("aarch64", "uefi"), str(tmp_path), host_arch="x86_64")
    assert "cannot run arm64 programs" in e.value.message
    assert "qemu-user-static binfmt-support" in (e.value.hint or "")
    assert "update-binfmts --enable qemu-aarch64" in (e.value.hint or "")
    # the host's own arch needs no emulation
    build.check_host(build.Spec("aarch64", "uefi"), str(tmp_path), host_arch="aarch64")


def test_binfmt_ready(tmp_path: Path) -> None:
    entry = "interpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: {}\noffset 0\n"
    for name, text, ready in [
        ("ok", "enabled\n" + entry.format("PF"), True),
        ("off", "disabled\n" + entry.format("PF"), False),
        ("nofix", "enabled\n" + entry.format("P"), False),
    ]:
        (tmp_path / name).write_text(text)
        assert build.binfmt_ready(name, str(tmp_path)) is ready, name
    assert build.binfmt_ready("missing", str(tmp_path)) is False


def test_packages_per_arch_and_firmware() -> None:
    bios = build.Spec("x86_64", "bios").packages
    assert bios[:2] == ("linux-image-cloud-amd64", "grub-pc")
    assert {"systemd-sysv", "cloud-init", "qemu-guest-agent", "openssh-server"} <= set(bios)
    assert build.Spec("x86_64", "uefi").packages[:2] == (
        "linux-image-cloud-amd64",
        "grub-efi-amd64",
    )
    arm = build.Spec("aarch64", "uefi").packages
    assert arm[:2] == ("linux-image-arm64", "grub-efi-arm64") and "dosfstools" in arm


def test_partition_tables() -> None:
    assert build.sfdisk_script(build.Spec("x86_64", "bios")).splitlines() == [
        "label: gpt",
        f"size=1MiB, type={build.BIOS_BOOT_GUID}, name=bios",
        "type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name=root",
    ]
    arm = build.sfdisk_script(build.Spec("aarch64", "uefi")).splitlines()
    assert arm[1] == f"size={build.ESP_MIB}MiB, type={build.ESP_GUID}, name=esp"
    assert arm[2] == "type=B921B045-1DF0-41C3-AF44-4C6F280D3FAE, name=root"
    table = '{"partitiontable": {"sectorsize": 512, "partitions": [{"start": 2048, "size": 2048},'
    table += '{"start": 4096, "size": 100}]}}'
    assert build.partitions(table) == [(1 << 20, 1 << 20), (2 << 20, 51200)]


def test_mmdebstrap_argv(tmp_path: Path) -> None:
    early = str(tmp_path / "a dir" / "it's early.tar")
    spec = build.Spec("aarch64", "uefi", mirror="http://mirror.example/debian/")
    argv = build.mmdebstrap_argv(spec, "/t/root", early)
    assert argv[:5] == [
        "mmdebstrap",
        "--mode=root",
        "--format=directory",
        "--variant=minbase",
        "--arch=arm64",
    ]
    assert f"--include={','.join(spec.packages)}" in argv
    hook = next(a for a in argv if a.startswith("--essential-hook="))
    # mmdebstrap splits a special hook's words as a shell would (it runs no shell for it)
    assert shlex.split(hook.removeprefix("--essential-hook=")) == ["tar-in", early, "/"]
    assert argv[-5:] == [
        "bookworm",
        "/t/root",
        "deb http://mirror.example/debian bookworm main",
        "deb http://mirror.example/debian bookworm-updates main",
        "deb http://mirror.example/debian-security bookworm-security main",
    ]


@pytest.mark.parametrize(
    ("arch", "firmware", "console", "serial"),
    [
        ("x86_64", "bios", "ttyS0", True),
        ("x86_64", "uefi", "ttyS0", False),
        ("aarch64", "uefi", "ttyAMA0", False),
    ],
)
def test_grub_config(arch: str, firmware: str, console: str, serial: bool) -> None:
    spec = build.Spec(arch, firmware)
    cfg = build.grub_cfg(spec, "1234-uuid", "6.1.0-9-arm64")
    assert "search --no-floppy --fs-uuid --set=root 1234-uuid" in cfg
    args = f"root=UUID=1234-uuid ro console=tty0 console={console},115200"
    linux = f"\tlinux /boot/vmlinuz-6.1.0-9-arm64 {args}"
    assert linux in cfg.splitlines()
    assert "\tinitrd /boot/initrd.img-6.1.0-9-arm64" in cfg.splitlines()
    # UEFI firmware shows its console on the serial port already: GRUB's own serial would
    # draw every line twice
    assert ("terminal_output console serial" in cfg) is serial
    defaults = build.grub_defaults(spec)
    assert f'GRUB_CMDLINE_LINUX="console=tty0 console={console},115200"' in defaults
    assert ('GRUB_TERMINAL="console serial"' in defaults) is serial
    early = build.early_grub_cfg("1234-uuid")
    assert early == "search.fs_uuid 1234-uuid root\nset prefix=($root)'/boot/grub'\n"


def test_early_files(tmp_path: Path) -> None:
    """What is in place before the kernel's initramfs is made: fstab, and the module policy
    with a hook the initramfs runs (executable, or it is skipped)."""
    import tarfile

    path = tmp_path / "early.tar"
    build._early_tar(str(path), build.early_files("r-uuid", None))
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {
            "etc/fstab",
            "etc/initramfs-tools/conf.d/qlaunch-vm.conf",
            "etc/initramfs-tools/hooks/qlaunch-vm",
        }
        assert members["etc/initramfs-tools/hooks/qlaunch-vm"].mode == 0o755
        assert all(m.uid == 0 and m.gid == 0 for m in members.values())
        conf = tar.extractfile("etc/initramfs-tools/conf.d/qlaunch-vm.conf")
        assert conf is not None
        conf_text = conf.read()
        assert b"\nMODULES=list\n" in conf_text
        hook = tar.extractfile("etc/initramfs-tools/hooks/qlaunch-vm")
        assert hook is not None
        text = hook.read().decode()
    assert text.startswith("#!/bin/sh\n")
    listed = " ".join(ln for ln in text.splitlines() if ln.startswith("manual_add_modules"))
    # disks of every bus QEMU gives, and the CD-ROM the cloud-init seed is on
    for module in ("virtio_pci", "virtio_blk", "virtio_scsi", "sr_mod", "nvme", "ahci", "ext4"):
        assert f" {module}" in listed
    assert b"\nFSTYPE=ext4\n" in conf_text


def test_fstab_and_debconf() -> None:
    assert build.fstab("r-uuid", None).splitlines()[1:] == [
        "UUID=r-uuid / ext4 errors=remount-ro 0 1"
    ]
    assert build.fstab("r-uuid", "ABCD1234").splitlines()[2] == (
        "UUID=ABCD-1234 /boot/efi vfat umask=0077,nofail 0 0"
    )
    assert "grub-pc/install_devices_empty boolean true" in build.debconf_selections(
        build.Spec("x86_64", "bios")
    )
    efi = build.debconf_selections(build.Spec("aarch64", "uefi"))
    assert "grub-efi-arm64 grub2/force_efi_extra_removable boolean true" in efi


def test_step_progress_draws_steps_with_their_time() -> None:
    out = io.StringIO()
    p = StepProgress(out)
    p.step(1, 2, "partitioning")
    p.detail("mkfs")
    p.step(2, 2, "installing")
    p.detail("Setting up udev")
    p.end()
    text = out.getvalue()
    lines = text.split("\n")
    # one finished line per step, each redrawn in place ("\r", clear to the end of the line)
    assert lines[0].split("\r\x1b[K")[-1] == "[1/2] partitioning  0:00"
    assert lines[1].split("\r\x1b[K")[-1] == "[2/2] installing  0:00"
    assert "\r\x1b[K[2/2] installing  0:00  Setting up udev" in text
    assert lines[2] == ""
    p.end()  # twice is harmless (an error path ends it early)
