"""Every board profile boots a Debian kernel under TCG, runs a command, shows its output, returns.

One boot per board, each checking several things: the guest's own uname, the exit status, no
marker left in the output, nothing on stderr but qlaunch's TCG note, and on boards with an SD
slot, the card the host attached read back in the guest (on vexpress-a9, an ext4 root file
system with its own busybox, chrooted into and written to).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from qlaunch.boot import assets
from qlaunch.errors import AssetError

BOARDS = [
    # profile, `uname -m` in the guest, SD card: None, "raw" (a marker line) or "root" (ext4)
    ("x86_64-q35", "x86_64", None),
    ("x86_64-microvm", "x86_64", None),
    ("aarch64-virt", "aarch64", None),
    ("arm-virt", "armv7l", None),
    ("vexpress-a9", "armv7l", "root"),
    ("vexpress-a15", "armv7l", "raw"),
    ("raspi3b", "aarch64", "raw"),
    ("raspi2b", "armv7l", "raw"),
]

TCG_NOTE = "qlaunch: using TCG (software emulation)"


def only_notes(stderr: str) -> list[str]:
    """stderr lines other than the TCG note: what a user would take for trouble."""
    return [line for line in stderr.splitlines() if line and not line.startswith(TCG_NOTE)]


def raw_card(tmp_path: Path, marker: str) -> Path:
    img = tmp_path / "card.img"
    with img.open("wb") as f:
        f.write(f"{marker}\n".encode())
        f.truncate(1 << 20)  # SD cards are a power of two in size
    return img


def root_card(tmp_path: Path, marker: str) -> Path:
    """An ext4 root file system with the arm busybox, made on the host without mounting."""
    mke2fs = shutil.which("mke2fs") or "/usr/sbin/mke2fs"
    if not Path(mke2fs).exists():
        pytest.fail("mke2fs is missing: .ci/setup-host installs e2fsprogs")
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy(assets.require("arm").busybox, root / "bin" / "busybox")
    (root / "etc" / "qlaunch-sd").write_text(f"{marker}\n")
    img = tmp_path / "root.img"
    subprocess.run(
        [mke2fs, "-q", "-F", "-t", "ext4", "-d", str(root), str(img), "8M"],
        check=True,
        capture_output=True,
    )
    return img


def debugfs_cat(img: Path, path: str) -> str:
    debugfs = shutil.which("debugfs") or "/usr/sbin/debugfs"
    r = subprocess.run(
        [debugfs, "-R", f"cat {path}", str(img)], capture_output=True, text=True, check=True
    )
    return r.stdout


@pytest.fixture(scope="module", autouse=True)
def _assets() -> None:
    for name in ("x86_64", "aarch64", "arm"):
        try:
            assets.require(name)
        except AssetError as e:
            pytest.fail(f"{e.message} ({e.hint})")


@pytest.mark.boot
@pytest.mark.parametrize(("name", "machine_word", "card"), BOARDS, ids=[b[0] for b in BOARDS])
def test_board_boots_and_runs_a_command(
    qlaunch_bin: list[str], tmp_path: Path, name: str, machine_word: str, card: str | None
) -> None:
    marker = f"qlaunch-sd-card-of-{name}"
    sets: list[str] = []
    script = "uname -a"
    img: Path | None = None
    if card == "raw":
        img = raw_card(tmp_path, marker)
        script += "; head -n 1 /dev/mmcblk0"
    elif card == "root":
        img = root_card(tmp_path, marker)
        script += (
            "; mount -t ext4 /dev/mmcblk0 /mnt"
            " && chroot /mnt /bin/busybox cat /etc/qlaunch-sd"
            " && chroot /mnt /bin/busybox sh -c 'echo written-in-guest >/etc/from-guest'"
            " && umount /mnt"
        )
    if img is not None:
        sets = ["--set", f"disk.0.path={img}"]
    try:
        r = subprocess.run(
            [*qlaunch_bin, "run", name, *sets, "--", "sh", "-c", script + "; exit 7"],
            capture_output=True,
            text=True,
            timeout=240,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else ""
        pytest.fail(f"qlaunch run {name} did not return in 240 s; its output: {out[-1500:]!r}")
    assert r.returncode == 7, r.stderr + r.stdout[-2000:]
    lines = [line.strip() for line in r.stdout.splitlines()]
    uname = [line for line in lines if line.startswith("Linux qlaunch ")]
    assert uname, r.stdout[-2000:]
    assert uname[0].split()[-2] == machine_word  # `uname -a` ends "MACHINE GNU/Linux"
    assert "QLAUNCH_EXIT" not in r.stdout
    assert only_notes(r.stderr) == []
    if card is not None:
        assert marker in lines, r.stdout[-2000:]
    if card == "root":
        assert img is not None
        assert debugfs_cat(img, "/etc/from-guest").strip() == "written-in-guest"


@pytest.mark.boot
def test_raspi3b_console_is_a_shell(run_shell) -> None:  # type: ignore[no-untyped-def]
    # The Pi 3's DTB puts a Bluetooth chip on the console UART, which leaves Linux no tty to
    # read from; qlaunch boots a copy without it, so typing into the console works. The halt
    # that poweroff ends in is qlaunch's cue to end QEMU.
    code, out, err = run_shell("raspi3b", b"echo typed-$((40+2)) on $(tty)\npoweroff\n")
    assert code == 0, err
    assert b"typed-42 on /dev/ttyAMA0" in out


@pytest.mark.boot
def test_exec_on_raspi3b_with_a_kernel(qlaunch_bin: list[str]) -> None:
    # raspi halts instead of powering off; exec must end QEMU itself, as run does.
    r = subprocess.run(
        [
            *qlaunch_bin,
            "exec",
            "--profile",
            "raspi3b",
            "--kernel",
            "asset:aarch64",
            "--",
            "sh",
            "-c",
            "cat /proc/device-tree/model; echo; nproc; exit 3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 3, r.stderr
    lines = [line.strip().rstrip("\0") for line in r.stdout.splitlines()]
    assert any(line.startswith("Raspberry Pi 3 Model B") for line in lines), r.stdout
    assert "4" in lines


def test_vexpress_qemu_leaves_stderr_empty(qlaunch_bin: list[str]) -> None:
    # The board's PL041 sound chip would open the host's ALSA and complain on stderr; qlaunch
    # gives it a silent backend. QEMU builds the board, then QMP on stdin makes it quit.
    out = subprocess.run(
        [*qlaunch_bin, "cmdline", "vexpress-a9", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    argv: list[str] = json.loads(out)["argv"]
    i = argv.index("-chardev")
    argv[i + 1] = "null,id=console"
    j = argv.index("-mon")
    del argv[j : j + 2]
    argv += ["-S", "-qmp", "stdio"]
    r = subprocess.run(
        argv,
        input='{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n',
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
