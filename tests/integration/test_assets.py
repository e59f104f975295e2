"""Real Debian kernels under TCG: fetch, build the initramfs, boot, run a command, power off.

Assets are fetched into the real cache (QLAUNCH_CACHE if set) on first use and kept: a
fetch is a few hundred MB. Each boot has an overall timeout so a hang fails, never blocks.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qlaunch.boot import assets, initramfs

BOOT_TIMEOUT = 180.0  # TCG on a loaded 2-core CI machine; a good boot takes 2 to 6 s

MACHINES: dict[str, tuple[list[str], str]] = {
    "x86_64": (["qemu-system-x86_64", "-m", "256"], "ttyS0"),
    "x86_64-generic": (["qemu-system-x86_64", "-m", "256"], "ttyS0"),
    "aarch64": (
        ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a57", "-m", "512"],
        "ttyAMA0",
    ),
    "arm": (["qemu-system-arm", "-M", "virt,highmem=off", "-m", "512"], "ttyAMA0"),
}


def qemu_argv(set_name: str, asset: assets.AssetSet, initrd: Path, *extra: str) -> list[str]:
    base, console = MACHINES[set_name]
    if not shutil.which(base[0]):
        pytest.fail(f"{base[0]} is not installed: run `make setup` (it apt-installs QEMU)")
    return [
        *base,
        "-accel",
        "tcg",
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-kernel",
        str(asset.kernel),
        "-initrd",
        str(initrd),
        "-append",
        f"console={console} panic=-1 quiet",
        *extra,
    ]


def fetched(set_name: str) -> assets.AssetSet:
    (asset,) = assets.fetch([set_name])
    return asset


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short and ours: unix socket paths must stay under 108 bytes.
    d = Path(tempfile.mkdtemp(prefix="qlt-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.boot
def test_fetch_twice_keeps_the_set() -> None:
    first = fetched("x86_64")
    stamp = first.manifest.stat().st_mtime_ns
    assert fetched("x86_64") == first
    assert first.manifest.stat().st_mtime_ns == stamp
    manifest = json.loads(first.manifest.read_text())
    assert manifest["kernel_version"] == first.version
    for p in (first.kernel, first.config, first.busybox, first.modules / "modules.dep"):
        assert p.is_file() and p.stat().st_size > 0
    assert assets.kernel_has("x86_64", "ACPI_BUTTON") == "m"


ARG = "a b 'c' \"d\" $HOME \\e"


@pytest.mark.boot
@pytest.mark.parametrize("set_name", ["x86_64", "aarch64", "arm"])
def test_boot_runs_command_and_reports_exit(set_name: str, workdir: Path) -> None:
    asset = fetched(set_name)
    base = initramfs.build_initramfs(asset)
    script = 'uname -m; printf "<%s>\\n" "$1"; echo "$GREETING from $(pwd)"; exit 42'
    initrd = initramfs.initrd_with_command(
        base,
        ["sh", "-c", script, "sh", ARG],
        workdir / "initrd",
        env={"GREETING": "hello there"},
        workdir="/tmp",
    )
    proc = subprocess.run(
        qemu_argv(set_name, asset, initrd),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=BOOT_TIMEOUT,
    )
    out = proc.stdout.decode(errors="replace").replace("\r\n", "\n")
    assert proc.returncode == 0, out + proc.stderr.decode(errors="replace")
    lines = out.splitlines()
    machine = {"x86_64": "x86_64", "aarch64": "aarch64", "arm": "armv7l"}[asset.arch]
    assert machine in lines
    assert f"<{ARG}>" in lines
    assert "hello there from /tmp" in lines
    assert re.findall(r"QLAUNCH_EXIT=(\d+)$", out, re.M) == ["42"]
    assert "insmod" not in out  # every default module loaded cleanly


def qmp(path: Path, command: str) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(path))
        f = s.makefile("rw")
        f.readline()  # greeting
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}) + "\n")
            f.flush()
            while "return" not in (reply := json.loads(f.readline())):
                assert "error" not in reply, reply


@pytest.mark.boot
@pytest.mark.parametrize("set_name", ["x86_64", "aarch64"])
def test_interactive_guest_powers_off_on_system_powerdown(set_name: str, workdir: Path) -> None:
    asset = fetched(set_name)
    base = initramfs.build_initramfs(asset)
    sock = workdir / "qmp"
    log = workdir / "console"
    argv = qemu_argv(set_name, asset, base, "-qmp", f"unix:{sock},server=on,wait=off")
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while b"shell on the console" not in log.read_bytes():
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)
        # acpid starts before the banner is printed, so the button is watched by now.
        qmp(sock, "system_powerdown")
        assert proc.wait(timeout=BOOT_TIMEOUT) == 0
        assert "QLAUNCH_EXIT" not in log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.boot
def test_9p_share_and_dhcp_on_the_generic_kernel(workdir: Path) -> None:
    asset = fetched("x86_64-generic")
    share = workdir / "share"
    share.mkdir()
    (share / "in.txt").write_text("from the host\n")
    initrd = initramfs.initrd_with_command(
        initramfs.build_initramfs(asset),
        ["sh", "-c", "cat /mnt/h/in.txt; hostname > /mnt/h/out.txt; ip -4 -o addr show eth0"],
        workdir / "initrd",
    )
    argv = qemu_argv(
        "x86_64-generic",
        asset,
        initrd,
        "-virtfs",
        f"local,path={share},mount_tag=h,security_model=none",
        "-nic",
        "user,model=virtio-net-pci",
    )
    argv[argv.index("-append") + 1] += " qlaunch.9p=h:/mnt/h qlaunch.dhcp qlaunch.hostname=g1"
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=BOOT_TIMEOUT)
    out = proc.stdout.decode(errors="replace")
    assert "from the host" in out
    assert "10.0.2.15/24" in out  # QEMU user networking's DHCP answer
    assert "QLAUNCH_EXIT=0" in out
    assert (share / "out.txt").read_text() == "g1\n"
